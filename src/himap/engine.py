"""The pruning engine: plugs a schedule into an unmodified HuggingFace model (SPEC sections 1-2).

How it attaches (all through public extension points, all undone by `remove`):
- the decoder's `forward` is replaced by `_decoder_forward`, bound to the instance; it runs the
  same layers in the same way, but between segments of layers it drops image tokens;
- an attention function wrapping the model's own implementation (sdpa, eager, flash...) is
  registered in AttentionInterface (with the matching mask function in AttentionMaskInterface);
  it passes every call through unchanged except inside a ranking layer K-1 during prefill, where
  it also computes the attention rows the criterion needs (queries x all keys, softmax, head mean);
- a forward pre-hook on the multimodal model records `input_ids`, from which V, S, I are found.

Prefill runs layers 0..K1-1 on every token, ranks, gathers the kept tokens (in order, with their
original RoPE positions) and continues; each layer's KV cache therefore holds only the tokens that
layer saw. Decode steps build one mask per segment from the 2D attention mask, selecting the kept
prompt columns, so they attend to the pruned cache of each layer.
"""

from __future__ import annotations

import contextlib
import sys
import time
import types
from dataclasses import asdict, dataclass, field

import torch

from himap import criteria
from himap.adapters import find_adapter
from himap.schedule import Schedule, Stage, get_schedule
from himap.tokens import TokenSets, token_sets

_WRAPPER_PREFIX = "himap_"


@dataclass
class PruneStats:
    """What the last prefill did (per sample b and layer l)."""

    tokens_per_layer: list[list[int]] = field(default_factory=list)  # [B][L] valid tokens entering layer l
    image_tokens_per_layer: list[list[int]] = field(default_factory=list)  # [B][L]
    kept_image_indices: list[list[list[int]]] = field(default_factory=list)  # [stage][B] kept indices into the sample's image tokens
    kv_cache_lengths: list[int] = field(default_factory=list)  # [L] cache length per layer after the last call
    ranking_seconds: float = 0.0  # time spent ranking and gathering in the last prefill
    pruned: bool = False  # whether any stage ran
    notes: list[str] = field(default_factory=list)  # e.g. "no image tokens: ran unpruned"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Capture:
    """A pending request for attention rows inside one layer."""

    layer: int
    rows: torch.Tensor  # [B, T] query positions to compute
    valid: torch.Tensor  # [B, T] key positions that are not padding
    attn: torch.Tensor | None = None  # [B, T, T] filled rows (head mean), the rest zero


@dataclass
class _Tokens:
    """The tokens present in a segment of layers, as indices into the original prompt."""

    index: torch.Tensor  # [B, T'] original prompt positions
    valid: torch.Tensor  # [B, T'] real tokens (not padding or filler)
    sets: TokenSets  # S, V, I restricted to these tokens
    position_ids: torch.Tensor  # [B, T'] original RoPE positions

    def gather(self, local: torch.Tensor, local_valid: torch.Tensor) -> "_Tokens":
        g = lambda t: t.gather(1, local)  # noqa: E731
        valid = g(self.valid) & local_valid
        s = self.sets
        sets = TokenSets(system=g(s.system) & valid, image=g(s.image) & valid,
                         instruction=g(s.instruction) & valid, valid=valid)
        return _Tokens(g(self.index), valid, sets, g(self.position_ids))


class PruneHandle:
    """Returned by `apply`: the schedule in force and the statistics of the last call."""

    def __init__(self, model, schedule: Schedule, adapter, base_impl: str, sync_timing: bool,
                 replay: list | None = None):
        self.model = model
        self.replay = replay  # kept_image_indices [stage][B] to reuse instead of ranking
        self.schedule = schedule
        self.adapter = adapter
        self.base_impl = base_impl  # the attention implementation the wrapper delegates to
        self.sync_timing = sync_timing  # synchronise CUDA around ranking to time it exactly
        self.stats: PruneStats | None = None
        self._input_ids = None  # recorded by the pre-hook for the next decoder call
        self._capture: _Capture | None = None
        self._segments = None  # [(start, end, _Tokens)] of the last prefill, for decode
        self._prompt_len = 0
        self._hooks = []

    def __repr__(self):
        return f"PruneHandle(schedule={self.schedule!r})"


# ----------------------------------------------------------------------------- attention rows

def attention_rows(query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, key_valid: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """Head-averaged causal softmax attention for the query rows marked in `rows` (prefill).

    query [B, Hq, T, D] and key [B, Hkv, T, D] are post-RoPE; GQA keys are repeated to the query
    heads before the mean. Returns [B, T, T] with the asked rows filled and zeros elsewhere.
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


def _base_attention(module, base_impl: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base_impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base_impl]


def _wrapped_attention(module, query, key, value, attention_mask, **kwargs):
    """Registered attention function: the model's own implementation, plus ranking rows in K-1."""
    handle: PruneHandle = module._himap_handle
    cap = handle._capture
    if cap is not None and cap.layer == module.layer_idx and cap.attn is None:
        t0 = _clock(query, handle.sync_timing)
        scaling = kwargs.get("scaling") or module.scaling
        cap.attn = attention_rows(query, key, cap.rows, cap.valid, scaling)
        handle.stats.ranking_seconds += _clock(query, handle.sync_timing) - t0
    return _base_attention(module, handle.base_impl)(module, query, key, value, attention_mask, **kwargs)


def _clock(tensor: torch.Tensor, sync: bool) -> float:
    if sync and tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()


def _register_wrapper(base_impl: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if base_impl.startswith(_WRAPPER_PREFIX):
        raise RuntimeError("himap is already applied to this model; call himap.remove(model) first")
    if base_impl not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {base_impl!r} has no mask function; himap supports "
                         f"{', '.join(k for k in ALL_MASK_ATTENTION_FUNCTIONS)}")
    name = _WRAPPER_PREFIX + base_impl
    AttentionInterface.register(name, _wrapped_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_impl])
    return name


# ----------------------------------------------------------------------------- selection

def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of kept positions, in order and right-aligned, for `keep` [B, T].

    Samples that keep fewer positions than the longest get filler slots at the left (like left
    padding), so every sample's last prompt token stays at the last index. Returns
    (index [B, T'], valid [B, T']).
    """
    t = keep.shape[1]
    pos = torch.arange(t, device=keep.device).expand_as(keep)
    ordered = torch.where(keep, pos, -1).sort(dim=1).values  # dropped (-1) first, kept ascending
    n = int(keep.sum(dim=1).max())
    tail = ordered[:, t - n:]  # [B, T']
    return tail.clamp(min=0), tail >= 0


def _image_index(sets: TokenSets) -> torch.Tensor:
    """[B, T] index of each image token among its sample's image tokens (0..N-1), -1 elsewhere."""
    return torch.where(sets.image, sets.image.long().cumsum(dim=1) - 1, -1)


def _replay_scores(kept: list[list[int]], tokens: _Tokens, image_index: torch.Tensor) -> torch.Tensor:
    """Scores that select exactly the recorded image indices (1 for kept, 0 otherwise)."""
    idx = image_index.gather(1, tokens.index)  # [B, T'] image index of each present token
    if len(kept) != idx.shape[0]:
        raise ValueError(f"replayed kept set has {len(kept)} samples, the batch has {idx.shape[0]}")
    wanted = torch.zeros_like(idx, dtype=torch.bool)
    for b, k in enumerate(kept):
        wanted[b] = torch.isin(idx[b], torch.tensor(k, dtype=idx.dtype, device=idx.device))
    return criteria._image_only(wanted.float(), tokens.sets)


def _stage_scores(handle: PruneHandle, stage: Stage, tokens: _Tokens, hidden: torch.Tensor, grad_fn) -> torch.Tensor:
    if stage.drop_all:
        return torch.zeros(tokens.valid.shape, device=hidden.device)
    if stage.criterion in criteria.ATTENTION_CRITERIA:
        return criteria.ATTENTION_CRITERIA[stage.criterion](handle._capture.attn, tokens.sets)
    if stage.criterion == "random":
        return criteria.random_scores(tokens.sets, stage.seed)
    if stage.criterion == "embed_norm":
        return criteria.embed_norm(hidden, tokens.sets)
    if stage.criterion == "gradient":
        return criteria.gradient(hidden, grad_fn(hidden), tokens.sets)
    raise ValueError(f"unknown criterion {stage.criterion!r}")


# ----------------------------------------------------------------------------- decoder forward

def _check_cache(cache) -> None:
    from transformers.cache_utils import DynamicCache

    if cache is not None and not isinstance(cache, DynamicCache):
        raise TypeError(f"himap pruning needs a cache that holds a different length per layer "
                        f"(DynamicCache); got {type(cache).__name__}. Use the default cache "
                        f"(cache_implementation='dynamic').")


def _segment_mask(lm, hidden, mask2d, cache, layer_idx):
    from transformers.masking_utils import create_causal_mask

    # position_ids=None: gapped kept positions must not be mistaken for packed sequences.
    return create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=mask2d,
                              past_key_values=cache, position_ids=None, layer_idx=layer_idx)


def _run_layers(lm, hidden, layers, mask, pos_emb, position_ids, cache, use_cache, kwargs):
    for layer_idx in layers:
        hidden = lm.layers[layer_idx](hidden, attention_mask=mask, position_embeddings=pos_emb,
                                      position_ids=position_ids, past_key_values=cache,
                                      use_cache=use_cache, **kwargs)
    return hidden


def _prefill(lm, handle: PruneHandle, ids, hidden, mask2d, position_ids, cache, use_cache, kwargs):
    b, t = hidden.shape[:2]
    num_layers = len(lm.layers)
    sets = token_sets(ids, handle.adapter.image_token_id(handle.model), mask2d)
    stats = handle.stats = PruneStats()
    stages = list(handle.schedule.stages)
    if stages and not bool(sets.image.any()):
        stats.notes.append("no image tokens in the prompt: ran unpruned")
        stages = []
    elif stages and not bool(sets.image.any(dim=1).all()):
        stats.notes.append("some samples have no image tokens: nothing pruned in those")
    stats.pruned = bool(stages)
    tokens = _Tokens(torch.arange(t, device=hidden.device).expand(b, t), sets.valid, sets, position_ids)
    image_index = _image_index(sets)
    bounds = [s.k for s in stages] + [num_layers]
    segments, start = [], 0
    per_layer_tokens, per_layer_images = [], []
    for stage_i, end in enumerate(bounds):
        stage = stages[stage_i] if stage_i < len(stages) else None
        seg_mask2d = mask2d.gather(1, tokens.index) & tokens.valid
        mask = _segment_mask(lm, hidden, seg_mask2d, cache, start)
        pos_emb = lm.rotary_emb(hidden, position_ids=tokens.position_ids)
        layer_pos = position_ids if start == 0 else None
        replaying = handle.replay is not None
        if stage is not None and stage.criterion in criteria.ATTENTION_CRITERIA and not stage.drop_all \
                and not replaying:
            handle._capture = _Capture(end - 1, criteria.needed_rows(stage.criterion, tokens.sets), tokens.valid)
        hidden = _run_layers(lm, hidden, range(start, end), mask, pos_emb, layer_pos, cache, use_cache, kwargs)
        per_layer_tokens += [tokens.valid.sum(1).tolist()] * (end - start)
        per_layer_images += [tokens.sets.image.sum(1).tolist()] * (end - start)
        segments.append((start, end, tokens))
        if stage is not None:
            t0 = _clock(hidden, handle.sync_timing)
            grad_fn = lambda h: _greedy_loss_grad(lm, handle, h, range(end, num_layers), mask, pos_emb)  # noqa: E731
            if replaying:
                scores = _replay_scores(handle.replay[stage_i], tokens, image_index)
            else:
                scores = _stage_scores(handle, stage, tokens, hidden, grad_fn)
            keep = criteria.select_kept(scores, tokens.sets, stage.ratio, stage.drop_all)
            local, local_valid = compact(keep)
            hidden = hidden.gather(1, local[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, T', d]
            tokens = tokens.gather(local, local_valid)
            kept = image_index.gather(1, tokens.index)
            stats.kept_image_indices.append(
                [kept[i][tokens.sets.image[i]].tolist() for i in range(b)])
            handle._capture = None
            stats.ranking_seconds += _clock(hidden, handle.sync_timing) - t0
        start = end
    stats.tokens_per_layer = [list(x) for x in zip(*per_layer_tokens)]
    stats.image_tokens_per_layer = [list(x) for x in zip(*per_layer_images)]
    handle._segments = segments if stages else None
    handle._prompt_len = t
    return hidden


def _greedy_loss_grad(lm, handle, hidden, layers, mask, pos_emb):
    """dL/dh for h entering layer K, L the cross-entropy of the model's own greedy next token,
    through the remaining layers run without cache (gradient criterion)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("the gradient criterion needs autograd: run under torch.no_grad(), "
                           "not torch.inference_mode()")
    with torch.enable_grad():
        h0 = hidden.detach().requires_grad_(True)
        h = _run_layers(lm, h0, layers, mask, pos_emb, None, None, False, {})
        logits = handle.adapter.lm_head(handle.model)(lm.norm(h[:, -1])).float()  # [B, V]
        loss = torch.nn.functional.cross_entropy(logits, logits.argmax(-1), reduction="sum")
        return torch.autograd.grad(loss, h0)[0]


def _decode(lm, handle: PruneHandle, hidden, mask2d, position_ids, cache, use_cache, kwargs):
    pos_emb = lm.rotary_emb(hidden, position_ids=position_ids)
    p = handle._prompt_len
    for start, end, tokens in handle._segments:
        prompt_part = mask2d[:, :p].gather(1, tokens.index) & tokens.valid
        seg_mask2d = torch.cat([prompt_part, mask2d[:, p:].bool()], dim=1)
        mask = _segment_mask(lm, hidden, seg_mask2d, cache, start)
        hidden = _run_layers(lm, hidden, range(start, end), mask, pos_emb,
                             position_ids if start == 0 else None, cache, use_cache, kwargs)
    return hidden


def _decoder_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                     inputs_embeds=None, use_cache=None, **kwargs):
    """Replacement for the decoder's forward while a schedule is applied (see module docstring)."""
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast

    handle: PruneHandle = self._himap_handle
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    ids = input_ids if input_ids is not None else handle._input_ids
    handle._input_ids = None
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=self.config)
    if handle.schedule.stages:
        _check_cache(past_key_values)
    b, t = inputs_embeds.shape[:2]
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    if position_ids is None:
        position_ids = (torch.arange(t, device=inputs_embeds.device) + past)[None]
    position_ids = position_ids.expand(b, -1)
    if attention_mask is None:
        attention_mask = torch.ones((b, past + t), dtype=torch.bool, device=inputs_embeds.device)
    if attention_mask.dim() != 2:
        raise ValueError("himap needs a 2D attention mask [batch, length] to build per-layer masks; "
                         f"got shape {tuple(attention_mask.shape)}")
    attention_mask = attention_mask.bool()
    if past == 0:
        if ids is None or tuple(ids.shape) != (b, t):
            raise ValueError("himap needs the prompt's input_ids to find image tokens; call the model "
                             "with input_ids (not only inputs_embeds)")
        hidden = _prefill(self, handle, ids, inputs_embeds, attention_mask, position_ids,
                          past_key_values, use_cache, kwargs)
    elif handle._segments is None:
        _require_uniform_cache(past_key_values, len(self.layers))
        mask = _segment_mask(self, inputs_embeds, attention_mask, past_key_values, 0)
        hidden = _run_layers(self, inputs_embeds, range(len(self.layers)), mask,
                             self.rotary_emb(inputs_embeds, position_ids=position_ids), position_ids,
                             past_key_values, use_cache, kwargs)
    else:
        hidden = _decode(self, handle, inputs_embeds, attention_mask, position_ids, past_key_values,
                         use_cache, kwargs)
    if handle.stats is not None and past_key_values is not None:
        handle.stats.kv_cache_lengths = [past_key_values.get_seq_length(i) for i in range(len(self.layers))]
    return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), past_key_values=past_key_values)


def _require_uniform_cache(cache, num_layers: int) -> None:
    lengths = {cache.get_seq_length(i) for i in range(num_layers)}
    if len(lengths) > 1:
        raise RuntimeError("this cache was pruned by a different call (per-layer lengths differ) and "
                           "himap has no record of its kept tokens; start from a fresh cache")


def _decorate(fn):
    """Wrap like the library's own decoder forward, so output_hidden_states/attentions still work."""
    try:
        from transformers.utils.generic import merge_with_config_defaults
        from transformers.utils.output_capturing import capture_outputs
    except ImportError:  # older layouts: outputs capture unavailable, pruning unaffected
        return fn
    return merge_with_config_defaults(capture_outputs(fn))


_DECORATED_FORWARD = _decorate(_decoder_forward)


# ----------------------------------------------------------------------------- public API

def apply(model, method: "str | Schedule" = "himap", *, sync_timing: bool = False,
          replay: list | None = None) -> PruneHandle:
    """Attach a pruning schedule (preset name or Schedule) to `model` in place; return its handle.

    Every layer keeps its attention implementation; `model.generate` and `model(...)` prune once
    per prefill. Raises for unsupported model classes and schedules that do not fit the model.
    `sync_timing` synchronises CUDA around the ranking so stats.ranking_seconds is exact.
    `replay` (a previous stats.kept_image_indices) keeps exactly those image tokens at each stage
    instead of ranking: the same pruning on another implementation, batch or sequence.
    """
    adapter = find_adapter(model)
    schedule = get_schedule(method)
    lm = adapter.language_model(model)
    schedule.validate_for(len(lm.layers))
    if replay is not None and len(replay) != len(schedule.stages):
        raise ValueError(f"replay has {len(replay)} stage(s), the schedule has {len(schedule.stages)}")
    if getattr(lm, "_himap_handle", None) is not None:
        raise RuntimeError("himap is already applied to this model; call himap.remove(model) first")
    base_impl = lm.config._attn_implementation or "eager"
    name = _register_wrapper(base_impl)
    handle = PruneHandle(model, schedule, adapter, base_impl, sync_timing, replay)
    lm._himap_handle = handle
    for layer in lm.layers:
        layer.self_attn._himap_handle = handle
    lm.forward = types.MethodType(_DECORATED_FORWARD, lm)
    handle._hooks.append(adapter.multimodal_model(model).register_forward_pre_hook(
        lambda mod, args, kw: setattr(handle, "_input_ids", kw.get("input_ids", args[0] if args else None)),
        with_kwargs=True))
    model.set_attn_implementation({"text_config": name})
    return handle


def remove(model) -> None:
    """Detach himap from `model`: the original forward, attention implementation and no hooks."""
    adapter = find_adapter(model)
    lm = adapter.language_model(model)
    handle = getattr(lm, "_himap_handle", None)
    if handle is None:
        return
    for h in handle._hooks:
        h.remove()
    if "forward" in lm.__dict__:
        del lm.forward
    for layer in lm.layers:
        layer.self_attn.__dict__.pop("_himap_handle", None)
    del lm._himap_handle
    model.set_attn_implementation({"text_config": handle.base_impl})


@contextlib.contextmanager
def pruned(model, method: "str | Schedule" = "himap", **kwargs):
    """`with himap.pruned(model, "himap") as handle:` applies a schedule for the block only."""
    handle = apply(model, method, **kwargs)
    try:
        yield handle
    finally:
        remove(model)


@contextlib.contextmanager
def maybe_pruned(model, method: "str | Schedule" = "himap", **kwargs):
    """`pruned`, except that a schedule without stages (vanilla) leaves the model untouched and
    yields None: the unmodified model, the baseline that timings and FLOP counts compare with."""
    schedule = get_schedule(method)
    if not schedule.stages:
        yield None
        return
    with pruned(model, schedule, **kwargs) as handle:
        yield handle
