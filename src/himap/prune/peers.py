"""The peer methods' selection rules as small pure functions (docs/peers.md).

Each takes the tensors its paper ranks by and returns what the engine keeps; none touches a model.
The engine (himap.prune.engine, himap.prune.vision) gathers the inputs at the right layer:

- PyramidDrop (Xing et al., CVPR 2025, sec. 3.2): at the end of each stage, the attention of the
  last instruction token to the image tokens, computed with the *next* layer's query and key
  projections (the official `pdrop_rank_drop`); the highest-scoring keep; `pdrop_scores`.
- DART (Wen et al., 2025, sec. 3): at layer K, pivot tokens (the image and instruction tokens whose
  layer-(K-1) keys have the largest L1 norm); each pivot keeps the image tokens least similar to it
  (cosine of the final-norm'd hidden states); `dart_keep`.
- DivPrune (Alvar et al., CVPR 2025, alg. 1): greedy max-min diversity on the visual tokens'
  cosine distances; `divprune_order`.
- VisionZip (Yang et al., CVPR 2025, sec. 3.2): dominant tokens by the vision encoder's [CLS]
  attention, contextual tokens merged by key similarity; `visionzip_select`, `visionzip_merge`.

Ties go to the earlier position everywhere (the official code's topk leaves them unspecified).
"""

from __future__ import annotations

import torch

from himap.prune.criteria import from_reduction
from himap.prune.tokens import TokenSets

MERGE_RULES = ("official", "mean")
"""VisionZip merging: `official` = the target token plus the mean of the tokens assigned to it (the
released code, `target_hidden + aggregated_hidden`); `mean` = the mean of the whole group."""


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, largest first, ties to the lower index ([n] -> [k])."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def pdrop_scores(last_row: torch.Tensor, sets: TokenSets) -> torch.Tensor:
    """PyramidDrop's ranking: attention from the last instruction (prompt) token to each image
    token, head-averaged ([B, T] that row -> [B, T], -inf off the image tokens)."""
    return from_reduction(last_row, sets)


def dart_keep(key_l1: torch.Tensor, hidden: torch.Tensor, sets: TokenSets, positions: torch.Tensor,
              n_keep: list[int], pivot_image: list[int], pivot_text: int) -> torch.Tensor:
    """DART's kept image tokens, per sample ([B, T] bool, True on kept image tokens).

    key_l1 [B, T]: L1 norm of each token's keys in layer K-1 (all heads, post-RoPE);
    hidden [B, T, d]: the hidden states entering layer K after the model's final norm;
    positions [B, T]: each token's position counted from the sample's first token (the official
    code runs one unpadded sample, so these are its indices).

    Pivots: the pivot_image[b] image tokens and pivot_text instruction tokens with the largest key
    L1 norm. They are visited in the order the official code does (`list(set(image + text))` of their
    positions, CPython's set order). Each pivot takes, from the image tokens not yet kept, those with
    the lowest cosine similarity to it; the n_keep[b] - pivot_image[b] picks are split evenly over the
    pivots (the first ones take one more when it does not divide; the official TOKEN_TOPK is the
    even share). Kept: the image pivots and every pick.
    """
    b_size, t = key_l1.shape
    keep = torch.zeros((b_size, t), dtype=torch.bool, device=key_l1.device)
    for b in range(b_size):
        img = sets.image[b].nonzero().squeeze(1)  # [n] ascending
        txt = sets.instruction[b].nonzero().squeeze(1)
        if img.numel() == 0:
            continue
        target = min(n_keep[b], img.numel())
        p_img = min(pivot_image[b], target)
        img_piv = img[top_indices(key_l1[b, img].float(), p_img)]
        txt_piv = txt[top_indices(key_l1[b, txt].float(), min(pivot_text, txt.numel()))]
        local_of = {int(positions[b, i]): int(i) for i in torch.cat([img_piv, txt_piv])}
        # the official loop: `for item in list(indices_set)`, indices_set = set(image_indices + query_indices)
        pivots = [local_of[p] for p in set([int(positions[b, i]) for i in img_piv]
                                           + [int(positions[b, i]) for i in txt_piv])]
        keep[b, img_piv] = True
        valid = [int(i) for i in img if not keep[b, i]]  # candidates, ascending
        picks = target - p_img
        h = hidden[b].float()
        h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        sims = h[torch.tensor(pivots, device=h.device)] @ h[img].T  # [P, n] cosine similarities
        column = {int(i): j for j, i in enumerate(img)}
        for j, pivot in enumerate(pivots):
            quota = picks // len(pivots) + (1 if j < picks % len(pivots) else 0)
            if quota == 0 or not valid:
                continue
            s = sims[j, torch.tensor([column[i] for i in valid], device=h.device)]
            chosen = [valid[i] for i in top_indices(-s, min(quota, len(valid))).tolist()]
            keep[b, chosen] = True
            valid = [i for i in valid if i not in set(chosen)]
    return keep


def divprune_order(features: torch.Tensor, n_keep: int) -> list[int]:
    """DivPrune's greedy max-min diverse subset of the rows of `features` [n, d], in the order
    chosen (alg. 1 as released): distances d(i, j) = 1 - cos(f_i, f_j); the first pick is the token
    whose nearest other token is farthest (the second smallest of its distance column, the smallest
    being its own ~0), then repeatedly the not yet picked token whose minimum distance to the picked
    ones is largest (ties: the lower index)."""
    x = features.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    dist = 1.0 - x @ x.T  # [n, n]
    n = dist.shape[0]
    if n_keep <= 0 or n == 0:
        return []
    if n == 1:
        return [0]
    picked = [int(torch.argmax(dist.kthvalue(2, dim=0).values))]
    nearest = dist[picked[0]].clone()  # min distance of every token to the picked set
    nearest[picked[0]] = float("-inf")
    for _ in range(min(n_keep, n) - 1):
        nxt = int(torch.argmax(nearest))
        picked.append(nxt)
        nearest = torch.minimum(nearest, dist[nxt])
        nearest[picked] = float("-inf")  # never twice (the released code can repeat a pick when every
        # remaining token duplicates a picked one: all distances 0)
    return picked


def visionzip_select(cls_attention: torch.Tensor, metric: torch.Tensor, n_keep: int, n_dominant: int):
    """VisionZip's token choice for one image's P patch tokens.

    cls_attention [P]: attention of the [CLS] query to each patch in the feature layer of the vision
    encoder (post-softmax, summed over heads); metric [P, h]: that layer's keys averaged over heads.
    Returns (dominant, targets, others, assign): the n_dominant patches with the most [CLS]
    attention (ascending), the contextual targets (every step-th of the remaining patches in order,
    step = remaining // contextual, as released), the other remaining patches (ascending) and the
    target slot each is merged into (highest dot product of the normalised metrics, ties: the
    lower slot). Kept: dominant + targets (n_keep in all).
    """
    p = cls_attention.shape[0]
    n_keep = min(n_keep, p)
    n_dominant = min(n_dominant, n_keep)
    dominant = torch.sort(top_indices(cls_attention.float(), n_dominant)).values
    rest = torch.ones(p, dtype=torch.bool, device=cls_attention.device)
    rest[dominant] = False
    remaining = rest.nonzero().squeeze(1)  # ascending
    contextual = n_keep - n_dominant
    empty = remaining[:0]
    if contextual <= 0 or remaining.numel() == 0:
        return dominant, empty, remaining, empty
    step = max(1, remaining.numel() // contextual)
    slots = torch.arange(0, remaining.numel(), step, device=remaining.device)[:contextual]
    is_target = torch.zeros(remaining.numel(), dtype=torch.bool, device=remaining.device)
    is_target[slots] = True
    targets, others = remaining[is_target], remaining[~is_target]
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True)
    assign = torch.argmax(m[others] @ m[targets].T, dim=1) if others.numel() else empty  # [n_others]
    return dominant, targets, others, assign


def visionzip_merge(features: torch.Tensor, targets: torch.Tensor, others: torch.Tensor,
                    assign: torch.Tensor, rule: str = "official") -> torch.Tensor:
    """The merged contextual tokens [c, d] of one image's features [P, d] (the projector's input).

    official: feature(target) + mean of the features assigned to it (0 when none), the released
    code's `target_hidden + aggregated_hidden`; mean: the mean over the target and its members."""
    if rule not in MERGE_RULES:
        raise ValueError(f"unknown VisionZip merge rule {rule!r}; choose one of {', '.join(MERGE_RULES)}")
    c = targets.numel()
    sums = features.new_zeros((c, features.shape[-1]), dtype=torch.float32)
    sums.index_add_(0, assign, features[others].float())
    counts = torch.zeros(c, dtype=torch.float32, device=features.device)
    counts.index_add_(0, assign, torch.ones(others.numel(), dtype=torch.float32, device=features.device))
    target = features[targets].float()
    if rule == "official":
        merged = target + sums / counts.clamp(min=1)[:, None]
    else:
        merged = (target + sums) / (counts + 1)[:, None]
    return merged.to(features.dtype)
