"""Measured FLOPs: run a model under torch.utils.flop_counter and compare with the analytic count.

FlopCounterMode counts matrix products (mm, addmm, bmm, convolution, SDPA kernels) at 2 FLOPs per
multiply-accumulate, per module; elementwise work is not counted, exactly like himap.cost.flops'
full count. Two details make the numbers comparable:
- On CPU, SDPA dispatches to `aten._scaled_dot_product_flash_attention_for_cpu`, which torch's
  counter does not know (it would count 0 attention FLOPs); it is registered here with torch's
  own SDPA formula (dense: every query row times every key, no causal saving).
- The ranking's extra QK^T rows run inside the decoder's attention modules, so they are part of
  the measured decoder FLOPs; the analytic count includes them as `Cost.ranking`.

Parts are reported separately and explicitly: `vision` (vision tower + projector), `decoder`
(the language model, ranking included) and `lm_head`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    import torch

    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


@dataclass
class MeasuredFlops:
    """FLOPs counted while running a model, split by part (real FLOPs, 2 per MAC)."""

    vision: int  # vision tower + multimodal projector
    decoder: int  # language model layers (ranking rows included)
    lm_head: int  # output projection
    total: int  # everything counted (= vision + decoder + lm_head for LLaVA)
    by_op: dict = field(default_factory=dict)  # total per aten op name

    def to_dict(self) -> dict:
        return asdict(self)


def _module_names(model) -> dict[str, tuple[str, str]]:
    """FlopCounterMode's keys of each part: root class name + '.' + the submodule's path when it
    runs inside the model's forward, or its own class name when called directly (generate runs
    the vision tower and projector before the first forward)."""
    from himap.prune.adapters import find_adapter

    adapter = find_adapter(model)
    paths = {id(m): name for name, m in model.named_modules()}
    root = type(model).__name__
    parts = {"decoder": adapter.language_model(model), "lm_head": adapter.lm_head(model)}
    mm = adapter.multimodal_model(model)
    for attr in ("vision_tower", "multi_modal_projector"):
        if hasattr(mm, attr):
            parts[attr] = getattr(mm, attr)
    return {part: (f"{root}.{paths[id(m)]}", type(m).__name__) for part, m in parts.items()}


def count_flops(model, fn, *args, **kwargs) -> tuple[object, MeasuredFlops]:
    """Run fn(*args, **kwargs) (a call involving `model`) under FlopCounterMode in no_grad;
    return its result and the FLOPs by part."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    names = _module_names(model)
    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter, torch.no_grad():
        result = fn(*args, **kwargs)
    counts = counter.get_flop_counts()
    part = lambda key: sum(sum(counts.get(k, {}).values()) for k in names.get(key, ()))  # noqa: E731
    return result, MeasuredFlops(
        vision=part("vision_tower") + part("multi_modal_projector"), decoder=part("decoder"),
        lm_head=part("lm_head"), total=counter.get_total_flops(),
        by_op={str(op): n for op, n in counts.get("Global", {}).items()})


def prompt_shape(model, inputs: dict, new_tokens: int):
    """The PromptShape of a batch-1 input (S, V, I counted from input_ids, SPEC section 1)."""
    from himap.cost.flops import PromptShape
    from himap.prune.adapters import find_adapter
    from himap.prune.tokens import token_sets

    ids = inputs["input_ids"]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"FLOPs comparison needs one example (batch 1, no padding); got input_ids {tuple(ids.shape)}")
    sets = token_sets(ids, find_adapter(model).image_token_id(model), inputs.get("attention_mask"))
    counts = {k: v[0] for k, v in sets.counts().items()}
    if int(sets.valid.sum()) != ids.shape[1]:
        raise ValueError("FLOPs comparison needs an input without padding")
    return PromptShape(n_system=counts["system"], n_instruction=counts["instruction"],
                       new_tokens=new_tokens, n_image=counts["image"])


def compare(model, inputs: dict, method="vanilla", new_tokens: int = 0) -> dict:
    """Measured vs analytic FLOPs of one example under `method`.

    new_tokens = 0: one prefill forward (use_cache, logits_to_keep=1), compared with
    Cost.prefill + vision. new_tokens >= 1: `generate(max_new_tokens=new_tokens)`, compared with
    Cost.total. Vanilla runs the unmodified model; other methods run under himap.pruned.
    Returns both counts per part and the relative error of each.
    """
    from himap.cost.flops import Arch, full_cost
    from himap.prune import engine
    from himap.prune.schedule import get_schedule

    schedule = get_schedule(method)
    shape = prompt_shape(model, inputs, max(new_tokens, 1))
    cost = full_cost(Arch.from_config(model.config), schedule, shape, attention="dense")
    with engine.maybe_pruned(model, schedule):
        if new_tokens == 0:
            _, measured = count_flops(model, model, **inputs, use_cache=True, logits_to_keep=1)
        else:
            _, measured = count_flops(model, model.generate, **inputs, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False)
    if new_tokens == 0:
        analytic = {"vision": cost.vision + cost.vision_ranking,
                    "decoder": cost.prefill_linear + cost.prefill_attention + cost.ranking,
                    "lm_head": cost.lm_head_prefill}
    else:
        analytic = {"vision": cost.vision + cost.vision_ranking,
                    "decoder": cost.prefill_linear + cost.prefill_attention + cost.ranking
                    + cost.decode_linear + cost.decode_attention,
                    "lm_head": cost.lm_head_prefill + cost.lm_head_decode}
    analytic["total"] = sum(analytic.values())
    analytic["ranking"] = cost.ranking + cost.vision_ranking
    measured_d = measured.to_dict()
    rel = {k: (measured_d[k] - analytic[k]) / analytic[k] if analytic[k] else float(measured_d[k] != 0)
           for k in ("vision", "decoder", "lm_head", "total")}
    return {"method": schedule.name, "new_tokens": new_tokens, "shape": vars(shape),
            "analytic": analytic, "measured": measured_d, "rel_error": rel,
            "tokens_per_layer": cost.tokens_per_layer}
