"""A registered attention function that exposes or blocks the attention of chosen layers.

The analysis experiments (SPEC section 4) need two things from a decoder layer's attention:
- saliency (eq. 1) needs the post-softmax probabilities A of the measured layers inside the
  autograd graph, so that dL/dA can be read;
- disruption (sections 3.2-3.3) needs chosen (query, key) entries set to -inf before softmax.
Both go through one function registered in transformers' AttentionInterface (and the matching
AttentionMaskInterface entry, otherwise the mask silently becomes None). Each decoder layer's
attention module gets a `LayerProbe` attached for the duration of a `probed(...)` block; layers
whose probe asks for nothing call the model's own attention function (SDPA or eager) unchanged,
so only the measured layers pay for an explicit attention matrix.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

PROBE_ATTR = "_himap_flow_probe"
"""Attribute holding a LayerProbe on each decoder layer's attention module (removed on exit)."""

PROBE_NAMES = {"sdpa": "himap_probe_sdpa", "eager": "himap_probe_eager"}
"""Registered implementation name per base implementation (the mask format follows the base)."""

BASES_VIA_SDPA = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
"""Implementations whose layers run on SDPA while probed (their masks have another format)."""


@dataclass
class LayerProbe:
    """What one decoder layer's attention does while probed."""

    base: Callable  # the attention function the layer runs normally (sdpa or eager)
    mask_kind: str  # "bool" (sdpa masks: True = attend) or "float" (eager masks: additive)
    block: object = None  # bool tensor [B, T, T]: (query, key) entries forced to -inf pre-softmax
    expose: Callable | None = None  # f(layer_idx, probs [B, H, q, kv]) -> probs used for the output


def _base_functions(name: str):
    """(attention function, mask function) of a base implementation."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import eager_mask, sdpa_mask

    if name == "sdpa":
        return sdpa_attention_forward, sdpa_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward, eager_mask


def _register(base_name: str) -> str:
    """Register the probe under its himap-specific name (idempotent) and return the name.

    The name stays in the registry after use (transformers has no public unregister); a model
    left on it without a probe attached simply runs its base attention.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = PROBE_NAMES[base_name]
    _, mask_fn = _base_functions(base_name)
    AttentionInterface.register(name, probe_attention)
    AttentionMaskInterface.register(name, mask_fn)
    return name


def causal_allowed(q_len: int, kv_len: int, device) -> "torch.Tensor":
    """[q, kv] bool: query i (the last q of kv positions) may attend key j <= its position."""
    import torch

    offset = kv_len - q_len
    rows = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(kv_len, device=device)[None, :] <= rows


def allowed_mask(attention_mask, batch: int, q_len: int, kv_len: int, device):
    """The layer's mask as bool [B, 1, q, kv] (True = may attend), whatever format it came in:
    None (SDPA without padding, relying on is_causal), bool (SDPA) or additive float (eager:
    0 where allowed, the dtype's minimum elsewhere)."""
    import torch

    if attention_mask is None:
        return causal_allowed(q_len, kv_len, device)[None, None].expand(batch, 1, q_len, kv_len)
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return allowed[..., -q_len:, -kv_len:].expand(batch, 1, q_len, kv_len)


def _blocked_mask(attention_mask, probe: LayerProbe, query, key):
    """The layer's mask with probe.block added, in the base implementation's format."""
    import torch

    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    block = probe.block
    if q_len != kv_len or block.shape[-2:] != (q_len, kv_len):
        raise ValueError(f"a flow block of shape {tuple(block.shape)} needs a single prompt forward without "
                         f"cache (got {q_len} queries over {kv_len} keys)")
    if block.shape[0] != batch:
        raise ValueError(f"flow block batch {block.shape[0]} does not match the input batch {batch}")
    before = allowed_mask(attention_mask, batch, q_len, kv_len, query.device)  # [B, 1, q, kv]
    after = before & ~block[:, None]
    emptied = before.any(-1) & ~after.any(-1)  # [B, 1, q]: rows the block would leave with no key
    if emptied.any():
        b, _, i = (int(x) for x in emptied.nonzero()[0])
        raise ValueError(f"blocking leaves query position {i} of sample {b} with no key to attend to; "
                         "rows must keep at least one (system) token")
    if probe.mask_kind == "bool":
        return after
    if attention_mask is None:
        mask = torch.zeros((batch, 1, q_len, kv_len), dtype=query.dtype, device=query.device)
        return mask.masked_fill(~after, torch.finfo(query.dtype).min)
    return attention_mask.masked_fill(block[:, None], torch.finfo(attention_mask.dtype).min)


def exposed_attention(module, query, key, value, allowed, scaling: float, expose: Callable):
    """Attention with the probabilities computed explicitly and passed through `expose`.

    Same arithmetic as the eager path: scores in the query dtype, softmax in fp32, probabilities
    cast back; `expose` may return a tensor tied to autograd (the saliency anchor).
    """
    import torch

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # GQA: each query head reads its key/value head
        key = key.repeat_interleave(groups, dim=1)  # [B, Hq, kv, D]
        value = value.repeat_interleave(groups, dim=1)  # [B, Hq, kv, D]
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, Hq, q, kv]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # [B, Hq, q, kv]
    probs = expose(module.layer_idx, probs)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # [B, q, Hq, D]
    return out, probs


def probe_attention(module, query, key, value, attention_mask, scaling: float | None = None,
                    dropout: float = 0.0, **kwargs):
    """The registered attention function: dispatch on the module's LayerProbe."""
    probe = getattr(module, PROBE_ATTR, None)
    if probe is None:  # registered name left on a model outside `probed`: behave like SDPA
        base, _ = _base_functions("sdpa")
        return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if probe.block is None and probe.expose is None:
        return probe.base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    mask = attention_mask if probe.block is None else _blocked_mask(attention_mask, probe, query, key)
    if probe.expose is None:
        return probe.base(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout:
        raise ValueError("saliency needs the model in eval mode (attention dropout must be 0)")
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    allowed = allowed_mask(mask, query.shape[0], query.shape[2], key.shape[2], query.device)
    return exposed_attention(module, query, key, value, allowed, scaling, probe.expose)


def decoder_layers(model):
    """The language model's decoder layers (LLaVA: model.model.language_model.layers)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers on {type(model).__name__}")
    return list(layers)


def text_config(model):
    """The config whose attention implementation the decoder layers read."""
    return decoder_layers(model)[0].self_attn.config


def _set_text_implementation(model, name: str) -> None:
    if hasattr(model.config, "text_config"):
        model.set_attn_implementation({"text_config": name})
    else:
        model.set_attn_implementation(name)


@contextlib.contextmanager
def probed(model, blocks: dict | None = None, expose_layers=(), expose: Callable | None = None):
    """Run `model` with flows blocked and/or attention exposed on chosen layers.

    blocks: {layer index: bool [B, T, T]} entries (query, key) set to -inf before softmax in
        that layer only; layers not listed run unchanged.
    expose_layers / expose: layers whose probabilities are computed explicitly and passed
        through expose(layer_idx, probs) (used by saliency); all other layers keep the fast path.
    The model's attention implementation is switched to the probe's registered name and back,
    and the probes are detached, even when the body raises.
    """
    layers = decoder_layers(model)
    blocks = dict(blocks or {})
    expose_layers = set(expose_layers)
    n = len(layers)
    bad = sorted(i for i in set(blocks) | expose_layers if not 0 <= i < n)
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has {n} decoder layers (0..{n - 1})")
    if expose_layers and expose is None:
        raise ValueError("expose_layers needs an expose function")
    cfg = text_config(model)
    original = cfg._attn_implementation
    if original in PROBE_NAMES.values() or any(hasattr(l.self_attn, PROBE_ATTR) for l in layers):
        raise RuntimeError("model is already probed; nested analysis contexts are not supported")
    if original in ("sdpa", "eager"):
        base_name = original
    elif original in BASES_VIA_SDPA:
        base_name = "sdpa"
    else:
        raise ValueError(f"analysis needs a model on sdpa or eager attention, found {original!r} "
                         "(remove pruning with himap.remove(model) first)")
    base_fn, _ = _base_functions(base_name)
    mask_kind = "bool" if base_name == "sdpa" else "float"
    name = _register(base_name)
    try:
        for i, layer in enumerate(layers):
            setattr(layer.self_attn, PROBE_ATTR, LayerProbe(
                base=base_fn, mask_kind=mask_kind, block=blocks.get(i),
                expose=expose if i in expose_layers else None))
        _set_text_implementation(model, name)
        yield model
    finally:
        for layer in layers:
            if hasattr(layer.self_attn, PROBE_ATTR):
                delattr(layer.self_attn, PROBE_ATTR)
        _set_text_implementation(model, original)
