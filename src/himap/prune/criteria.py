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


def needed_rows(criterion: str, sets: TokenSets) -> torch.Tensor:
    """[B, T] mask of the attention rows (queries) an attention criterion reads."""
    if criterion == "phi_sh":
        return sets.instruction
    if criterion in ("phi_dp", "phi_dp_row"):
        return sets.image
    if criterion == "phi_last":
        return last_prompt_position(sets)
    raise ValueError(f"{criterion!r} is not an attention criterion")


def select_kept(scores: torch.Tensor, sets: TokenSets, ratio: float, drop_all: bool = False) -> torch.Tensor:
    """[B, T] mask of positions kept after a stage: every non-image position, and per sample the
    n - floor(ratio * n) highest-scoring image tokens (ties: the earlier position wins)."""
    from himap.prune.schedule import kept_count

    n = sets.image.sum(dim=1).tolist()
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [B, T]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    keep_n = torch.tensor([kept_count(int(c), ratio, drop_all) for c in n], device=scores.device)
    keep_image = sets.image & (rank < keep_n[:, None])
    return ~sets.image | keep_image
