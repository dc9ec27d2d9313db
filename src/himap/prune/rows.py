"""Ranking rows: the attention a criterion reads, from a layer's queries and keys (SPEC section 2).

Pure functions on tensors. `reduced_attention` computes the column (or row) sums a criterion needs
chunk by chunk, never the whole [T, T] attention; `attention_rows` is the dense form (criteria
without a reduction, tests); `next_layer_rows` recomputes a layer's own rows from its projections
(PyramidDrop). The engine (himap.prune.engine) calls them inside the registered attention function.
"""

from __future__ import annotations

import sys

import torch

ROW_CHUNK_BYTES = 16 * 2 ** 20
"""Default budget of one chunk of ranking rows: the fp32 logits and probabilities of the query rows
computed at once ([B, Hq, c, T] each), so the ranking's extra memory stays bounded however many
visual tokens a prompt has (see `reduced_attention`)."""


def attention_rows(query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, key_valid: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """Head-averaged causal softmax attention for the query rows marked in `rows` (prefill).

    query [B, Hq, T, D] and key [B, Hkv, T, D] are post-RoPE; under GQA each query head uses its
    key head (the same as repeat_kv before the mean). Returns [B, T, T] with the asked rows filled
    and zeros elsewhere.
    """
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    row_idx = rows.any(dim=0).nonzero().squeeze(1)  # [r] union of asked rows over the batch
    out = query.new_zeros((b, t, key.shape[2]), dtype=torch.float32)
    if row_idx.numel() == 0:
        return out
    r = row_idx.numel()
    # GQA without repeat_kv: query head h uses key head h // (Hq / Hkv)
    q = query[:, :, row_idx].float().reshape(b, hkv, (hq // hkv) * r, d)  # [B, Hkv, g*r, D]
    logits = torch.matmul(q, key.float().transpose(-1, -2)).view(b, hq, r, -1)  # [B, Hq, r, T]
    logits.mul_(scaling)
    key_pos = torch.arange(key.shape[2], device=query.device)
    blocked = ~((key_pos[None, :] <= row_idx[:, None])[None] & key_valid[:, None, :])  # [B, r, T]
    # a finite minimum: a row with no allowed key (padding) becomes uniform, not NaN; it is zeroed below
    logits.masked_fill_(blocked[:, None], torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1).mean(dim=1)  # [B, r, T]
    out[:, row_idx] = probs * rows[:, row_idx, None]
    return out


def chunk_rows(batch: int, heads: int, keys: int, budget_bytes: int) -> int:
    """Query rows per chunk so that one chunk's fp32 logits and probabilities fit `budget_bytes`
    (2 x B x Hq x c x T x 4 bytes); at least one row."""
    return max(1, int(budget_bytes) // (2 * 4 * batch * heads * keys))


def reduced_attention(query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, key_valid: torch.Tensor,
                      scaling: float, reduce: str, columns: torch.Tensor | None = None,
                      budget_bytes: int = ROW_CHUNK_BYTES) -> torch.Tensor:
    """A linear reduction of the head-averaged causal softmax attention A over the asked rows,
    computed chunk by chunk without materialising A (prefill):

    - reduce="column": out[b, j] = sum over asked rows i of A(i, j)  (phi_sh, phi_dp, phi_last);
    - reduce="row": out[b, i] = sum over `columns` j of A(i, j) for each asked row i, 0 elsewhere
      (phi_dp_row).

    Memory: besides the [B, T] result, one chunk of c rows holds two fp32 buffers of [B, Hq, c, T]
    at a time (the mask-and-logits accumulator, then the probabilities; c from `chunk_rows`, so at
    most `budget_bytes`, or one row if a single row is larger), the chunk's queries [B, Hq, c, D]
    and an fp32 transposed copy of the keys [B, Hkv, D, T]. Under causal attention a chunk's rows
    see no key after its last row, so the keys are cut there (exact, and about half the work for
    rows spread over the prompt).
    """
    b, hq, t, d = query.shape
    hkv, n_keys = key.shape[1], key.shape[2]
    g = hq // hkv
    out = query.new_zeros((b, n_keys), dtype=torch.float32)
    row_idx = rows.any(dim=0).nonzero().squeeze(1)  # [r] union of asked rows over the batch, ascending
    if row_idx.numel() == 0:
        return out
    if reduce not in ("column", "row"):
        raise ValueError(f"unknown reduction {reduce!r}")
    keys_t = key.float().transpose(-1, -2).contiguous()  # [B, Hkv, D, T], once for every chunk
    key_pos = torch.arange(n_keys, device=query.device)
    weights = rows.float() / hq  # [B, T]: the head mean, and 0 for rows a sample did not ask
    blocked = torch.finfo(torch.float32).min
    step = chunk_rows(b, hq, n_keys, budget_bytes)
    for start in range(0, row_idx.numel(), step):
        idx = row_idx[start:start + step]  # [c]
        c = idx.numel()
        kmax = int(idx[-1]) + 1  # causal: no row of the chunk sees a key after the chunk's last row
        allowed = (key_pos[None, :kmax] <= idx[:, None])[None] & key_valid[:, None, :kmax]  # [B, c, k]
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=query.device).masked_fill_(~allowed, blocked)
        # the mask rides in the GEMM's accumulator: logits = bias + scaling * q k^T, one pass
        bias = bias[:, None, None].expand(b, hkv, g, c, kmax).reshape(b * hkv, g * c, kmax)
        # GQA without repeat_kv: query head h uses key head h // g
        q = query[:, :, idx].float().reshape(b * hkv, g * c, d)  # [B*Hkv, g*c, D]
        logits = torch.baddbmm(bias, q, keys_t[..., :kmax].reshape(b * hkv, d, kmax), alpha=scaling)
        probs = torch.softmax(logits, dim=-1).view(b, hq * c, kmax)  # [B, Hq*c, k], heads major
        del logits, bias
        w = weights[:, idx]  # [B, c]
        if reduce == "column":
            w_heads = w[:, None, :].expand(b, hq, c).reshape(b, 1, hq * c)
            out[:, :kmax] += torch.bmm(w_heads, probs).squeeze(1)
        else:
            cols = columns[:, :kmax, None].float()  # [B, k, 1]
            out[:, idx] = torch.bmm(probs, cols).view(b, hq, c).sum(dim=1) * w
        del probs
    return out


def next_layer_rows(layer, hidden: torch.Tensor, position_embeddings, rows: torch.Tensor,
                    key_valid: torch.Tensor, budget_bytes: int = ROW_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """PyramidDrop's ranking attention: the attention the rows `rows` would get in `layer` on
    `hidden` (its input), from the layer's own input norm, query and key projections and RoPE
    (the official `pdrop_rank_drop` does the same before the layer runs on fewer tokens).

    Only the asked rows' queries are projected. Returns (the column sums of those rows, head-mean,
    [B, T], as `reduced_attention`; the post-RoPE keys [B, Hkv, T, D] for the run-time check)."""
    attn = layer.self_attn
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    b, t, _ = hidden.shape
    hd = attn.head_dim
    normed = layer.input_layernorm(hidden)
    row_idx = rows.any(dim=0).nonzero().squeeze(1)  # [r]
    key = attn.k_proj(normed).view(b, t, -1, hd)  # [B, T, Hkv, D]
    q_rows = attn.q_proj(normed[:, row_idx]).view(b, row_idx.numel(), -1, hd)  # [B, r, Hq, D]
    if hasattr(attn, "k_norm"):  # per-head norms before RoPE (Qwen3)
        key, q_rows = attn.k_norm(key), attn.q_norm(q_rows)
    key, q_rows = key.transpose(1, 2), q_rows.transpose(1, 2)  # [B, H, T|r, D]
    cos, sin = position_embeddings
    key, _ = rope(key, key, cos, sin)
    q_rows, _ = rope(q_rows, q_rows, cos[:, row_idx], sin[:, row_idx])
    query = q_rows.new_zeros((b, q_rows.shape[1], t, hd))
    query[:, :, row_idx] = q_rows
    return reduced_attention(query, key, rows, key_valid, attn.scaling, "column", budget_bytes=budget_bytes), key


def pair_norms(key: torch.Tensor) -> torch.Tensor:
    """Norms of the (i, i + D/2) pairs RoPE rotates together: the same before and after RoPE."""
    half = key.shape[-1] // 2
    return (key[..., :half].float() ** 2 + key[..., half:].float() ** 2).sqrt()
