"""Information-flow saliency: which token sets the prediction depends on, layer by layer.

Paper section 2.2 and 3.1, SPEC section 4. For layer l with post-softmax attention A_l (per
head h) and L the cross-entropy of the logits at the last prompt position against a target token
(the answer's first token, or the model's own greedy token),

    I_l = mean_h |A_{h,l} * dL/dA_{h,l}|                                   (eq. 1)

and I_l(i, j) is the flow from key token j into query token i. Per layer, over the token sets
S (system), V (image), I (instruction) and X = S u V u I (himap.prune.tokens):

    S_sys = sum_{i in X, j in S} I(i, j) / |S|      (eq. 2)
    S_img = sum_{i in X, j in V} I(i, j) / |V|      (eq. 3)
    S_ins = sum_{i in X, j in I} I(i, j) / |I|      (eq. 4)
    S_vv  = sum_{i in V, j in V} I(i, j) / |V|      (eq. 5)
    S_vt  = sum_{i in I, j in V} I(i, j) / |V|      (eq. 6: flow from image into instruction
                                                      tokens; the printed indices put V on the
                                                      rows, which gives zero under causal attention)

The official code (ustc-hyin/HiMAP, src/HiMAP/analysis; docs/official-code.md) computes
something else, offered here as options (`REFERENCES["official"]`, the CLI's --reference official):
- value: it multiplies A by a ones tensor that requires grad, reads that tensor's gradient
  (A * dL/dA) and multiplies it by A again: |A^2 * dL/dA| per head (`value="official"`);
- S_sys, S_img, S_ins sum the set's ROWS over all columns, the flow into the set's tokens
  (`set_direction="rows"`), divided by the set size;
- S_vv and S_vt are the same blocks as above, not divided by |V| (`divide_visual=False`).
The head mean is taken after the absolute value in both (`abs_per_head`; eq. 1 as printed puts
the absolute value outside the head sum, which `abs_per_head=False` selects).

Memory: the measured layers run an explicit attention whose probabilities pass through an
identity autograd function tied to a scalar anchor that requires grad (the official code's
ones tensor costs a copy of A per layer). Its backward receives
dL/dA when the backward pass reaches the layer and reduces the saliency to the five block metrics
at once, so no gradient matrix outlives its layer's backward step (except one layer's head-mean
matrix when asked for). Parameters are frozen while measuring, so autograd records only what
lies between the first measured layer and the loss: per measured layer it keeps the softmax
output (fp32, B x H x T^2 x 4 bytes; plus a copy in the model dtype for bf16/fp16 models).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

METRICS = ("S_sys", "S_img", "S_ins", "S_vv", "S_vt")
"""Per-layer block metrics, in the order the paper introduces them."""

VALUES = ("eq1", "official")
"""Saliency value per head: "eq1" |A * dL/dA| (eq. 1); "official" |A^2 * dL/dA| (the official code)."""

SET_DIRECTIONS = ("columns", "rows")
"""S_sys / S_img / S_ins sum the set's columns (flow out of its tokens, eqs. 2-4) or its rows
(flow into its tokens, the official code)."""

TARGETS = ("answer", "answer-piece", "greedy")
"""Loss targets: the first token of the tokenized answer; the vocabulary piece spelled like the
answer (the official code's convert_tokens_to_ids(answer)); the model's own top-1 token."""

REFERENCES = {
    "paper": {"value": "eq1", "set_direction": "columns", "divide_visual": True, "target": "answer",
              "prompt_format": "hf"},
    "official": {"value": "official", "set_direction": "rows", "divide_visual": False,
                 "target": "answer-piece", "prompt_format": "llava-v1"},
}
"""Every choice that differs between the equations as printed (with himap's default prompt) and
the official code (docs/official-code.md); the CLI's --reference picks one set, single flags
override it."""


@dataclass
class SaliencyConfig:
    """How saliency is measured."""

    layers: tuple[int, ...] | None = None  # decoder layers to measure (0-based); None = every layer
    abs_per_head: bool = True  # |value| per head, then the head mean (SPEC, official code); False: |head mean| (eq. 1 as printed)
    value: str = "eq1"  # one of VALUES: "eq1" A*dL/dA (eq. 1), "official" A^2*dL/dA
    set_direction: str = "columns"  # one of SET_DIRECTIONS, for S_sys / S_img / S_ins
    divide_visual: bool = True  # S_vv, S_vt divided by |V| (eqs. 5-6); the official code does not divide
    matrix_layer: int | None = None  # also return this layer's full head-mean saliency matrix per sample
    top_k: int = 5  # how many top first-token ids to report per sample


@dataclass
class SampleSaliency:
    """Saliency metrics of one sample."""

    layers: list[int]  # measured layers, ascending
    metrics: dict[str, list[float | None]]  # metric name -> value per measured layer (None: empty set)
    target: int  # token id the loss is taken against
    prediction: int  # the model's top-1 token at the last prompt position
    top_ids: list[int]  # top-k token ids at the last prompt position
    loss: float  # cross-entropy against target
    counts: dict[str, int]  # |S|, |V|, |I|
    matrix: object = None  # [n, n] float tensor over the sample's valid positions, or None
    matrix_positions: dict = field(default_factory=dict)  # "system"/"image"/"instruction" -> indices into matrix

    def to_dict(self) -> dict:
        return {"layers": self.layers, "metrics": self.metrics, "target": self.target,
                "prediction": self.prediction, "top_ids": self.top_ids, "loss": self.loss,
                "counts": self.counts}


def config_for(reference: str = "paper", **overrides) -> SaliencyConfig:
    """A SaliencyConfig with a reference's value, direction and normalisation (REFERENCES), then
    `overrides` (other SaliencyConfig fields; None values are ignored)."""
    if reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; choose one of {', '.join(REFERENCES)}")
    fields = {k: v for k, v in REFERENCES[reference].items() if k in ("value", "set_direction", "divide_visual")}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return SaliencyConfig(**fields)


def block_metrics(saliency, sets, set_direction: str = "columns", divide_visual: bool = True) -> dict:
    """The five block metrics of saliency matrices [B, T, T] (query rows, key columns) for the
    token sets `sets` (himap.prune.tokens.TokenSets with masks [B, T]); NaN where the dividing set is
    empty. `set_direction` "columns" (eqs. 2-4) sums each set's columns over the prompt's rows,
    "rows" (official code) each set's rows over the prompt's columns; `divide_visual=False`
    leaves S_vv and S_vt undivided (official code). Returns metric name -> tensor [B]."""
    import torch

    if set_direction not in SET_DIRECTIONS:
        raise ValueError(f"unknown set direction {set_direction!r}; choose one of {', '.join(SET_DIRECTIONS)}")
    m = saliency.float()  # [B, T, T]
    x, s, v, i = (getattr(sets, k).to(m.dtype) for k in ("valid", "system", "image", "instruction"))  # [B, T]
    if set_direction == "columns":
        per_token = torch.einsum("bi,bij->bj", x, m)  # [B, T] flow out of each key into all prompt tokens
    else:
        per_token = torch.einsum("bij,bj->bi", m, x)  # [B, T] flow into each query from all prompt tokens

    def per(total, count):
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))

    n_s, n_v, n_i = s.sum(1), v.sum(1), i.sum(1)  # [B]
    n_vis = n_v if divide_visual else torch.ones_like(n_v)
    return {
        "S_sys": per((per_token * s).sum(1), n_s),
        "S_img": per((per_token * v).sum(1), n_v),
        "S_ins": per((per_token * i).sum(1), n_i),
        "S_vv": per(torch.einsum("bi,bij,bj->b", v, m, v), n_vis),
        "S_vt": per(torch.einsum("bi,bij,bj->b", i, m, v), n_vis),
    }


def last_positions(attention_mask) -> "torch.Tensor":
    """[B] index of each sample's last prompt (non-padding) position."""
    import torch

    t = attention_mask.shape[1]
    idx = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values


def last_logits(model, inputs: dict):
    """Logits [B, V] at each sample's last prompt position from one forward without cache."""
    import torch

    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
        inputs = {**inputs, "attention_mask": mask}
    last = last_positions(mask)  # [B]
    t = mask.shape[1]
    if bool((last == t - 1).all()):  # left padding: one position per sample suffices
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]  # [B, V]
    else:
        logits = model(**inputs, use_cache=False).logits  # [B, T, V]
        logits = logits[torch.arange(logits.shape[0], device=logits.device), last]  # [B, V]
    return logits


@contextlib.contextmanager
def frozen_parameters(model):
    """Parameters temporarily requires_grad=False (restored on exit), so autograd records only
    the path from the saliency anchor to the loss."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def saliency(model, inputs: dict, targets=None, config: SaliencyConfig | None = None) -> list[SampleSaliency]:
    """Per-sample, per-layer saliency block metrics (eqs. 1-6) for a batch of prompts.

    inputs: the model's prompt inputs (input_ids, attention_mask, pixel_values, ...), padded on
        either side; one forward without cache, one backward.
    targets: LongTensor [B] of target token ids (the answer's first token); None takes the
        model's own top-1 token (no label needed).
    The loss sums the per-sample cross-entropies, so each sample's gradient is its own.
    """
    import torch

    from himap.analysis.probe import decoder_layers, probed
    from himap.prune.tokens import token_sets

    config = config or SaliencyConfig()
    if config.value not in VALUES:
        raise ValueError(f"unknown saliency value {config.value!r}; choose one of {', '.join(VALUES)}")
    if config.set_direction not in SET_DIRECTIONS:
        raise ValueError(f"unknown set direction {config.set_direction!r}; choose one of {', '.join(SET_DIRECTIONS)}")
    n_layers = len(decoder_layers(model))
    layers = sorted(set(range(n_layers) if config.layers is None else config.layers))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise ValueError(f"saliency layers {bad or '[]'} invalid: the model has {n_layers} decoder layers")
    if config.matrix_layer is not None and config.matrix_layer not in layers:
        raise ValueError(f"matrix layer {config.matrix_layer} is not among the measured layers")
    if model.training:
        raise ValueError("saliency needs model.eval() (dropout would make A random)")
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    inputs = {**inputs, "attention_mask": mask}
    from himap.prune.adapters import visual_token_ids

    sets = token_sets(ids, visual_token_ids(model), mask)
    if not bool(sets.has_image.all()):
        raise ValueError("every sample needs image tokens for saliency (a sample has none)")

    dtype = next(model.parameters()).dtype
    anchor = torch.ones((), dtype=dtype, device=ids.device, requires_grad=True)
    per_layer: dict[int, dict] = {}
    matrices: list = []

    def reduce(layer: int, probs, grad):
        a = probs.float()  # [B, H, T, T]
        contrib = a * grad.float() if config.value == "eq1" else a * a * grad.float()  # [B, H, T, T]
        sal = contrib.abs().mean(1) if config.abs_per_head else contrib.mean(1).abs()  # [B, T, T]
        metrics = block_metrics(sal, sets, config.set_direction, config.divide_visual)
        per_layer[layer] = {k: v.detach().cpu() for k, v in metrics.items()}
        if layer == config.matrix_layer:
            for b in range(sal.shape[0]):
                keep = sets.valid[b].nonzero().squeeze(1)
                matrices.append(sal[b][keep][:, keep].detach().cpu())  # [n, n]

    expose_fn = _exposure(reduce, anchor)
    with frozen_parameters(model), torch.enable_grad(), probed(model, expose_layers=layers, expose=expose_fn):
        logits = last_logits(model, inputs).float()  # [B, V]
        tgt = logits.argmax(-1).detach() if targets is None else torch.as_tensor(targets, device=logits.device)
        losses = torch.nn.functional.cross_entropy(logits, tgt, reduction="none")  # [B]
        torch.autograd.grad(losses.sum(), anchor, allow_unused=True)
    missing = [l for l in layers if l not in per_layer]
    if missing:
        raise RuntimeError(f"no gradient reached layer(s) {missing}")

    top = logits.detach().topk(config.top_k, dim=-1).indices.tolist()
    counts = sets.counts()
    results = []
    for b in range(ids.shape[0]):
        metrics = {k: [_finite(per_layer[l][k][b]) for l in layers] for k in METRICS}
        positions = {}
        if matrices:
            keep = sets.valid[b]
            positions = {k: getattr(sets, k)[b][keep].nonzero().squeeze(1).tolist()
                         for k in ("system", "image", "instruction")}
        results.append(SampleSaliency(
            layers=layers, metrics=metrics, target=int(tgt[b]), prediction=top[b][0], top_ids=top[b],
            loss=float(losses[b].detach()), counts={k: int(v[b]) for k, v in counts.items()},
            matrix=matrices[b] if matrices else None, matrix_positions=positions))
    return results


def _exposure(reduce, anchor):
    """expose(layer, probs) for the probe: ties probs [B, H, q, kv] to the autograd graph
    through `anchor` (a scalar that requires grad) without copying them, and calls
    reduce(layer, probs, dL/dprobs) when the backward pass reaches that layer."""
    import torch

    class Expose(torch.autograd.Function):
        @staticmethod
        def forward(ctx, probs, anchor_, layer):
            ctx.save_for_backward(probs)
            ctx.layer = layer
            return probs.view_as(probs)  # a view: the matmul with V saves the same storage

        @staticmethod
        def backward(ctx, grad):
            (probs,) = ctx.saved_tensors
            reduce(ctx.layer, probs, grad)
            return grad, None, None

    return lambda layer, probs: Expose.apply(probs, anchor, layer)


def _finite(x) -> float | None:
    v = float(x)
    return None if v != v else v


def mean_metrics(samples: list[dict]) -> dict:
    """Per-layer means over samples (dicts as SampleSaliency.to_dict gives), skipping None.

    Returns {"layers": [...], "n": count, metric: [mean per layer or None]}; all samples must
    share the measured layers."""
    if not samples:
        return {"layers": [], "n": 0, **{k: [] for k in METRICS}}
    layers = samples[0]["layers"]
    if any(s["layers"] != layers for s in samples):
        raise ValueError("samples were measured on different layers; cannot average")
    out = {"layers": layers, "n": len(samples)}
    for k in METRICS:
        means = []
        for j in range(len(layers)):
            vals = [s["metrics"][k][j] for s in samples if s["metrics"][k][j] is not None]
            means.append(sum(vals) / len(vals) if vals else None)
        out[k] = means
    return out
