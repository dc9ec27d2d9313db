"""Analytic FLOPs of a method (paper convention and full count) and KV-cache bytes.

    himap flops --arch llava-1.5-7b --method fastv,himap
    himap flops --model builtin --method himap --k 3 8 --json  # sizes from a model's config

Prints one row per method (vanilla always first, as the reference): image tokens after each
stage, the paper's TFLOPs (eq. 10, image tokens only, 3 decimals; the paper's tables truncate to
2), the full count (every token, real FLOPs) of prefill and of the whole example, ratios to
vanilla, and the KV-cache size after prefill.
"""

from __future__ import annotations

import json

from himap.cost.flops import ARCHS, ATTENTION_MODES, DTYPE_BYTES, SYSTEM_TOKENS, PromptShape

_DEFAULT_SHAPE = PromptShape()


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--arch", choices=sorted(ARCHS), help="architecture preset (no weights needed)")
    src.add_argument("--model", metavar="PATH", help="model folder or id: its config gives the sizes")
    parser.add_argument("--method", default="fastv,himap",
                        help="preset or ablation name(s), comma-separated (vanilla is always shown)")
    from himap.cli.common import add_override_arguments

    add_override_arguments(parser)
    from himap.cli.common import add_prompt_format_argument

    add_prompt_format_argument(parser, default="llava-v1", default_note=(
        "here it only sets the default --system-tokens to LLaVA-1.5's count in that format: "
        f"llava-v1 {SYSTEM_TOKENS['llava-v1']} (default: the format of the paper's numbers), hf {SYSTEM_TOKENS['hf']}"))
    parser.add_argument("--system-tokens", type=int, default=None,
                        help="text tokens before the image, BOS included (default: from --prompt-format)")
    parser.add_argument("--instruction-tokens", type=int, default=_DEFAULT_SHAPE.n_instruction,
                        help="text tokens after the image")
    parser.add_argument("--new-tokens", type=int, default=_DEFAULT_SHAPE.new_tokens,
                        help="generated tokens (1 = prefill only plus the first token)")
    parser.add_argument("--image-tokens", type=int, default=_DEFAULT_SHAPE.n_image,
                        help="image tokens (default: the architecture's)")
    parser.add_argument("--attention", choices=ATTENTION_MODES, default="dense",
                        help="prefill attention pairs: dense (what kernels compute) or causal (unmasked only)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="fp16", help="KV-cache element type")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--measure", action="store_true",
                        help="also run the model (--model, or random weights of --arch) on a synthetic "
                             "prompt under torch.utils.flop_counter and compare with the full count")
    parser.add_argument("--random-weights", action="store_true",
                        help="with --measure and --model: random weights from the config (no weights needed)")


def load_arch(arch_name: str | None, model: str | None):
    """An Arch from a preset name or a model's config (read locally; no weights loaded)."""
    from himap.cost.flops import Arch, get_arch

    if arch_name:
        return get_arch(arch_name)
    from himap.models.loading import model_config

    return Arch.from_config(model_config(model), name=model)


def resolve_methods(names: str, arch, args=None, with_vanilla: bool = True):
    """Schedules for comma-separated preset/ablation names, with --k/--ratio/--criterion applied
    to every pruning method; vanilla first when `with_vanilla` and no listed method is unpruned."""
    from himap.cli.common import model_shape, overrides_from_args
    from himap.cli.common import resolve_methods as resolve_spec
    from himap.prune.schedule import get_schedule

    schedules = resolve_spec(names, model_shape(arch), overrides_from_args(args) if args else None)
    if with_vanilla and all(s.stages for s in schedules):
        schedules.insert(0, get_schedule("vanilla"))
    return schedules


def report(arch, schedules, shape: PromptShape, attention: str, dtype: str) -> dict:
    """Costs of each schedule and ratios to the first (vanilla) row, as a JSON-ready dict."""
    from himap.cost.flops import full_cost

    costs = [full_cost(arch, s, shape, attention, dtype) for s in schedules]
    base = costs[0]
    n_image = arch.image_tokens if shape.n_image is None else shape.n_image
    rows = []
    for s, c in zip(schedules, costs):
        kept = [n_image] + [c.image_tokens_per_layer[st.k] for st in s.stages]
        rows.append({
            "method": s.name, "stages": [[st.k, st.ratio, st.criterion] for st in s.stages],
            "image_tokens_after_stages": kept,
            "paper_tflops": c.paper / 1e12, "paper_ratio": c.paper / base.paper if base.paper else None,
            "prefill_tflops": c.prefill / 1e12, "prefill_ratio": c.prefill / base.prefill,
            "prefill_with_vision_tflops": (c.prefill + c.vision_side) / 1e12,
            "prefill_with_vision_ratio": (c.prefill + c.vision_side) / (base.prefill + base.vision_side),
            "total_tflops": c.total / 1e12, "total_ratio": c.total / base.total,
            "kv_cache_bytes": c.kv_cache_bytes, "kv_cache_ratio": c.kv_cache_bytes / base.kv_cache_bytes,
            "cost": c.to_dict(),
        })
    arch_d = {k: v for k, v in vars(arch).items() if k != "vision"}
    arch_d["vision"] = vars(arch.vision) if arch.vision else None
    return {"arch": arch_d, "shape": vars(shape) | {"n_image": n_image},
            "attention": attention, "kv_dtype": dtype, "methods": rows}


def _unit(flops: float) -> tuple[str, float]:
    """Display unit for a table whose largest value is `flops` (JSON always uses TFLOPs)."""
    for name, scale in (("TF", 1e12), ("GF", 1e9), ("MF", 1e6)):
        if flops >= 0.1 * scale:
            return name, scale
    return "F", 1.0


def format_table(result: dict) -> str:
    a, sh = result["arch"], result["shape"]
    unit, scale = _unit(result["methods"][0]["total_tflops"] * 1e12)
    f = lambda tflops: f"{tflops * 1e12 / scale:.3f}"  # noqa: E731
    w = max([17] + [len(r["method"]) for r in result["methods"]])  # method column width
    lines = [
        f"{a['name']}: d={a['hidden']} m={a['intermediate']} L={a['num_layers']} heads={a['num_heads']}"
        f" kv_heads={a['num_kv_heads']}; prompt {sh['n_system']} system + {sh['n_image']} image + "
        f"{sh['n_instruction']} instruction tokens, {sh['new_tokens']} new token(s); "
        f"attention {result['attention']}, KV cache {result['kv_dtype']}",
        f"{'method':<{w}} {'image tokens':<18} {'paper ' + unit:>9} {'ratio':>6} {'prefill ' + unit:>10} {'ratio':>6}"
        f" {'+vision ' + unit:>10} {'ratio':>6} {'total ' + unit:>9} {'ratio':>6} {'KV MiB':>8}",
    ]
    for r in result["methods"]:
        kept = r["image_tokens_after_stages"]
        kept = ">".join(map(str, kept)) if len(kept) <= 4 else f"{kept[0]}>..>{kept[-1]} ({len(kept) - 1} st)"
        paper_ratio = f"{r['paper_ratio']:.1%}" if r["paper_ratio"] is not None else "-"
        lines.append(
            f"{r['method']:<{w}} {kept:<18} {f(r['paper_tflops']):>9} {paper_ratio:>6}"
            f" {f(r['prefill_tflops']):>10} {r['prefill_ratio']:>6.1%} {f(r['prefill_with_vision_tflops']):>10}"
            f" {r['prefill_with_vision_ratio']:>6.1%} {f(r['total_tflops']):>9} {r['total_ratio']:>6.1%}"
            f" {r['kv_cache_bytes'] / 2 ** 20:>8.1f}")
    if a.get("note"):
        lines.append(f"visual tokens: {a['note']}")
    lines.append(f"paper {unit}: eq. (10), image tokens only, multiply-accumulates (the paper's tables truncate "
                 f"to 2 decimals); prefill/total: every token, 2 FLOPs per MAC, ranking included; total adds "
                 f"the decode steps, LM head and vision tower.")
    return "\n".join(lines)


def main(args) -> int:
    arch = load_arch(args.arch, args.model)
    n_system = args.system_tokens if args.system_tokens is not None else SYSTEM_TOKENS[args.prompt_format]
    shape = PromptShape(n_system=n_system, n_instruction=args.instruction_tokens,
                        new_tokens=args.new_tokens, n_image=args.image_tokens)
    if shape.n_image is not None and shape.n_image != arch.image_tokens:
        import dataclasses

        arch = dataclasses.replace(arch, image_tokens=shape.n_image)
    schedules = resolve_methods(args.method, arch, args)
    result = report(arch, schedules, shape, args.attention, args.dtype)
    if args.measure:
        result["measured"] = measure(args, arch, schedules, shape)
    print(json.dumps(result) if args.json else format_table(result))
    if args.measure and not args.json:
        print(format_measured(result["measured"]))
    if not args.json:
        print(summary_line(result))
    return 0


def summary_line(result: dict) -> str:
    """One line: each pruning method's share of vanilla's paper-convention and total FLOPs."""
    parts = [f"{r['method']} {r['paper_ratio']:.1%} (paper) / {r['total_ratio']:.1%} (total)"
             for r in result["methods"][1:] if r["paper_ratio"] is not None]
    return f"himap flops: {result['arch']['name']}, FLOPs of vanilla's: " + (", ".join(parts) or "nothing pruned")


def measure(args, arch, schedules, shape: PromptShape) -> list[dict]:
    """Measured vs analytic FLOPs (himap.cost.measure.compare) of each schedule on a synthetic prompt."""
    from himap.cost.bench import disable_eos, random_model, synthetic_inputs
    from himap.cost.measure import compare

    if args.attention != "dense":
        raise ValueError("--measure compares with the dense count (what kernels compute): drop --attention causal")
    if args.arch or args.random_weights:
        model = random_model(arch)
    else:
        from himap.models.loading import load_model

        model, _ = load_model(args.model)
        disable_eos(model)
    if shape.n_image is not None and shape.n_image != arch.image_tokens:
        raise ValueError("--measure uses the model's own image token count; drop --image-tokens")
    inputs = synthetic_inputs(model, shape.n_system, shape.n_instruction)
    return [compare(model, inputs, s, shape.new_tokens) for s in schedules]


def format_measured(rows: list[dict]) -> str:
    unit, scale = _unit(max(r["measured"]["total"] for r in rows))
    lines = [f"measured with torch.utils.flop_counter (generate, batch 1) vs the full count, {unit}LOPs:",
             f"{'method':<17} {'part':<8} {'measured':>12} {'analytic':>12} {'rel. error':>10}"]
    for r in rows:
        for part in ("vision", "decoder", "lm_head", "total"):
            lines.append(f"{r['method'] if part == 'vision' else '':<17} {part:<8} {r['measured'][part] / scale:>12.4f}"
                         f" {r['analytic'][part] / scale:>12.4f} {r['rel_error'][part]:>10.2e}")
    return "\n".join(lines)
