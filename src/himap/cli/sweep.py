"""Run a grid of schedules over tasks from a YAML config; table and Pareto plot.

    himap sweep configs/sweep_ablations.yaml
    himap sweep configs/sweep_ablations.yaml --model builtin --tasks shapes --limit 200
    himap sweep configs/sweep_ablations.yaml --arch llava-1.5-7b --dry-run   # schedules and TFLOPs only
    torchrun --nproc_per_node 4 --no-python himap sweep CONFIG  # data-parallel, as himap eval

Writes OUT/results.{md,csv,json} and OUT/pareto.png; predictions are himap eval's files under
OUT/<task>[-<split>]/ (a rerun resumes). Ends with one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import sys


def add_arguments(parser) -> None:
    from himap.cli.common import nonnegative_int, positive_int

    parser.add_argument("config", help="sweep YAML (see configs/sweep_ablations.yaml)")
    parser.add_argument("--model", default=None, help="override the config's model")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated task names: picked from the config, or added with default data")
    parser.add_argument("--methods", default=None, help="override the config's methods (comma-separated)")
    parser.add_argument("--limit", type=nonnegative_int, default=None, help="items per task")
    parser.add_argument("--out", default=None, help="override the config's output folder")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="override the config's batch size")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (override the config's)")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                        help="weights dtype (default: the config's; none there: fp32 on CPU, bf16 on CUDA)")
    from himap.cli.common import add_prompt_format_argument

    add_prompt_format_argument(parser, default=None, default_note="default: the config's prompt_format (hf)")
    parser.add_argument("--no-plot", action="store_true", help="skip pareto.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--dry-run", action="store_true", help="print the planned schedules and their TFLOPs; run nothing")
    parser.add_argument("--arch", default=None,
                        help="model sizes from a himap.cost.flops preset (e.g. llava-1.5-7b) instead of the model's config")


def apply_overrides(cfg, args):
    """The config with the command-line overrides applied."""
    from himap.evaluation.sweep import TaskSpec

    changes = {k: v for k, v in (("model", args.model), ("limit", args.limit), ("out", args.out),
                                 ("batch_size", args.batch_size), ("device", args.device),
                                 ("dtype", args.dtype), ("prompt_format", getattr(args, "prompt_format", None)),
                                 ("threads", getattr(args, "threads", None)))
               if v is not None}
    if args.methods:
        changes["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.tasks:
        by_name = {t.name: t for t in cfg.tasks}
        picked = [by_name.get(n, TaskSpec(n)) for n in (s.strip() for s in args.tasks.split(",")) if n]
        changes["tasks"] = [dataclasses.replace(t, optional=False) for t in picked]  # named: run
    if args.no_plot:
        changes["plot"] = False
    return dataclasses.replace(cfg, **changes)


def dry_run(cfg, arch) -> dict:
    """{task: [{method, stages, tflops_paper, same_as}]} without loading weights."""
    from himap.evaluation.runner import schedule_dict
    from himap.evaluation.sweep import plan, stages_text

    out, skipped = {}, []
    for spec, names, schedules, alias in plan(cfg, arch, skipped):
        by = {s.name: s for s in schedules}
        rows = []
        for n in names:
            s = by[alias.get(n, n)]
            tf = None
            if arch is not None:
                from himap.cost.flops import paper_flops

                tf = paper_flops(arch, s) / 1e12
            rows.append({"method": n, "stages": stages_text(schedule_dict(s)), "tflops_paper": tf,
                         "same_as": alias.get(n)})
        rows += [{"method": m, "stages": "not run", "tflops_paper": None, "same_as": None, "reason": why}
                 for t, m, why in skipped if t == spec.name]
        out[spec.name] = rows
    return out


def main(args) -> int:
    from himap.cli.common import set_threads
    from himap.evaluation.runner import LazyPredictor, arch_of_model, dist_env, pick_device
    from himap.evaluation.sweep import final_line, load_config, run_sweep
    from himap.models.loading import check_attn_implementation, resolve_model_path

    cfg = apply_overrides(load_config(args.config), args)
    rank, world = dist_env()
    if args.arch:
        from himap.cost.flops import get_arch

        arch = get_arch(args.arch)
    else:
        arch = arch_of_model(cfg.model)
    if args.dry_run:
        planned = dry_run(cfg, arch)
        for task, rows in planned.items():
            print(f"{task}:")
            for r in rows:
                if "reason" in r:
                    print(f"  {r['method']:<28} not run: {r['reason']}")
                    continue
                tf = r["tflops_paper"]
                tf = "unavailable" if tf is None else f"{tf:.3f}" if tf >= 0.01 else f"{tf:.3g}"
                same = f" (= {r['same_as']})" if r["same_as"] else ""
                print(f"  {r['method']:<28} {tf:>11} TFLOPs  {r['stages']}{same}")
        print(json.dumps({"plan": planned}))
        return 0
    resolve_model_path(cfg.model)  # a model that cannot load fails before any task runs
    set_threads(cfg.threads)
    device = pick_device(cfg.device, rank, world)
    check_attn_implementation(cfg.attn_implementation, device)
    predictor = LazyPredictor(cfg.model, device, cfg.dtype, cfg.attn_implementation, cfg.max_new_tokens,
                              prompt_format=cfg.prompt_format)
    result = run_sweep(cfg, predictor, arch, rank=rank, world_size=world, progress=not args.no_progress)
    if rank != 0:
        print(json.dumps({"rank": rank, "world_size": world, "predicted": result.predicted}))
        return 0
    for task, method, why in result.skipped:
        print(f"himap sweep: not run on {task}: {method}: {why}", file=sys.stderr)
    print(result.markdown)
    print(f"tables in {cfg.out}/results.{{md,csv,json}}" + (f", plot {result.plot}" if result.plot else ""))
    print(final_line(result))
    return 0
