"""Ranking criteria: small pure functions from attention rows or hidden states to image-token
scores (SPEC section 2, paper section 4.1). Higher scores are kept.

Attention-based criteria take `attn` [B, T, T], the head-averaged post-softmax attention of
layer K-1 over the tokens present at that layer (row = query, column = key). The engine fills
only the rows returned by `needed_rows` (the others are zero), so a criterion never reads a row
it did not ask for; a test may pass the dense matrix instead. Every criterion returns scores
[B, T] with -inf at positions that are not image tokens.
"""

from __future__ import annotations

import torch

from himap.prune.tokens import TokenSets


def _image_only(scores: torch.Tensor, sets: TokenSets) -> torch.Tensor:
    return scores.float().masked_fill(~sets.image, float("-inf"))


def last_prompt_position(sets: TokenSets) -> torch.Tensor:
    """[B, T] mask of each sample's last valid position (left padding puts it at T-1)."""
    t = sets.valid.shape[1]
    idx = torch.arange(t, device=sets.valid.device).expand_as(sets.valid)
    last = torch.where(sets.valid, idx, -1).amax(dim=1, keepdim=True)  # [B, 1]
    return idx == last


def phi_sh(attn: torch.Tensor, sets: TokenSets) -> torch.Tensor:
    """Eq. (8): attention image token v receives from the instruction tokens, sum_{i in I} A(i, v)."""
    rows = sets.instruction[:, :, None].to(attn.dtype)  # [B, T, 1]
    return _image_only((attn * rows).sum(dim=1), sets)  # column sums over I rows


def phi_dp(attn: torch.Tensor, sets: TokenSets) -> torch.Tensor:
    """Deep criterion as the official code: column sum over the remaining image rows,
    sum_{i in V'} A(i, v) (SPEC section 2)."""
    rows = sets.image[:, :, None].to(attn.dtype)
    return _image_only((attn * rows).sum(dim=1), sets)


def phi_dp_row(attn: torch.Tensor, sets: TokenSets) -> torch.Tensor:
    """Eq. (9) as printed: row sum sum_{i in V'} A(v, i), attention v pays to image tokens."""
    cols = sets.image[:, None, :].to(attn.dtype)
    return _image_only((attn * cols).sum(dim=2), sets)


def phi_last(attn: torch.Tensor, sets: TokenSets) -> torch.Tensor:
    """FastV: attention from the last prompt token to v."""
    rows = last_prompt_position(sets)[:, :, None].to(attn.dtype)
    return _image_only((attn * rows).sum(dim=1), sets)


def random_scores(sets: TokenSets, seed: int) -> torch.Tensor:
    """Seeded random ranking (ablation); the same seed gives the same scores on any device."""
    g = torch.Generator().manual_seed(int(seed))
    scores = torch.rand(sets.image.shape, generator=g).to(sets.image.device)
    return _image_only(scores, sets)


def embed_norm(hidden: torch.Tensor, sets: TokenSets) -> torch.Tensor:
    """L2 norm of each image token's hidden state entering layer K (ablation)."""
    return _image_only(hidden.float().norm(dim=-1), sets)


def gradient(hidden: torch.Tensor, grad: torch.Tensor, sets: TokenSets) -> torch.Tensor:
    """|h_v . dL/dh_v| with L the cross-entropy of the model's own greedy next token (ablation)."""
    return _image_only((hidden.float() * grad.float()).sum(dim=-1).abs(), sets)


ATTENTION_CRITERIA = {"phi_sh": phi_sh, "phi_dp": phi_dp, "phi_dp_row": phi_dp_row, "phi_last": phi_last}


REDUCTIONS = {"phi_sh": "column", "phi_dp": "column", "phi_last": "column", "phi_dp_row": "row"}
"""How the engine computes each attention criterion in bounded memory: "column" sums the needed
rows' attention per key (phi(v) = sum over rows i of A(i, v)); "row" sums each needed row over the
visual columns (phi(v) = sum over visual j of A(v, j)). Either way the criterion's scores are the
reduction at the visual positions (`from_reduction`), equal to the function above applied to the
dense rows. A criterion missing here gets dense rows [B, T, T] instead."""


def from_reduction(reduced: torch.Tensor, sets: TokenSets) -> torch.Tensor:
    """Scores [B, T] of a criterion in REDUCTIONS from the engine's reduced attention [B, T]."""
    return _image_only(reduced, sets)


def needed_rows(criterion: str, sets: TokenSets) -> torch.Tensor:
    """[B, T] mask of the attention rows (queries) an attention criterion reads."""
    if criterion == "phi_sh":
        return sets.instruction
    if criterion in ("phi_dp", "phi_dp_row"):
        return sets.image
    if criterion == "phi_last":
        return last_prompt_position(sets)
    raise ValueError(f"{criterion!r} is not an attention criterion")


def select_kept(scores: torch.Tensor, sets: TokenSets, ratio: float, drop_all: bool = False,
                groups: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] mask of positions kept after a stage: every non-image position, and per sample the
    n - floor(ratio * n) highest-scoring visual tokens (ties: the earlier position wins).

    `groups` [B, T] (visual token -> its image or video frame, himap.prune.tokens.visual_groups)
    turns on the per-image quota: each group of n_g tokens keeps its own n_g - floor(ratio * n_g).
    """
    from himap.prune.schedule import kept_count

    if groups is None:
        groups = torch.where(sets.image, 0, -1)
    groups = torch.where(sets.image, groups, -1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [B, T] by score
    order = order.gather(1, torch.sort(groups.gather(1, order), dim=1, stable=True).indices)  # by group, then score
    g_sorted = groups.gather(1, order)  # [B, T]
    pos = torch.arange(order.shape[1], device=order.device).expand_as(order)
    first = torch.ones_like(g_sorted, dtype=torch.bool)
    first[:, 1:] = g_sorted[:, 1:] != g_sorted[:, :-1]
    start = torch.cummax(torch.where(first, pos, 0), dim=1).values  # [B, T] where each group starts
    rank_sorted = pos - start  # rank within the group
    counts = torch.zeros((g_sorted.shape[0], int(groups.max()) + 2), dtype=torch.long, device=groups.device)
    counts.scatter_add_(1, g_sorted + 1, torch.ones_like(g_sorted))
    size = counts.gather(1, g_sorted + 1)  # [B, T] size of each token's group
    keep_n = torch.tensor([kept_count(int(n), ratio, drop_all) for n in range(int(size.max()) + 1)],
                          device=scores.device)[size]  # [B, T] kept tokens of each token's group
    keep_sorted = (g_sorted >= 0) & (rank_sorted < keep_n)
    keep_image = torch.zeros_like(sets.image).scatter(1, order, keep_sorted)
    return ~sets.image | keep_image


def select_top(scores: torch.Tensor, sets: TokenSets, keep_n: list[int]) -> torch.Tensor:
    """[B, T] mask: every non-image position and sample b's keep_n[b] highest-scoring visual tokens
    (ties: the earlier position wins); the peers' stages, whose counts are not a ratio of those present."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [B, T]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    keep_image = sets.image & (rank < torch.tensor(keep_n, device=scores.device)[:, None])
    return ~sets.image | keep_image
