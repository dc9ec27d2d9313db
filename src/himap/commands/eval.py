"""Evaluate methods on a benchmark task; resumable predictions and a summary table.

    himap eval --model builtin --task shapes --method vanilla,fastv,himap --limit 100
    himap eval --model llava-hf/llava-1.5-7b-hf --task pope --data data/pope --method vanilla,himap \\
        --batch-size 8 --out runs/eval
    himap eval ... --method himap --k 3 8                      # stage overrides (one method)
    himap eval ... --method himap,uniform@himap,all@himap      # ablation names (himap.ablations)
    torchrun --nproc_per_node 4 --no-python himap eval ...     # data-parallel shards, merged by rank 0
    himap eval ... --merge                                     # merge shards and summarize only

Predictions: OUT/<task>[-<split>]/<method>.jsonl, one line per item as it is produced; a rerun
skips the ids already there. Summary: OUT/<task>[-<split>]/summary.{json,md}, printed as a
table; the last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import sys


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="builtin", help="model folder or hub id ('builtin': the shipped model)")
    parser.add_argument("--task", required=True, help="task name: scienceqa_img, aokvqa_mc, pope, nocaps, "
                        "flickr30k, llava_bench, mmvet, shapes")
    parser.add_argument("--data", default=None, help="the task's data folder (see the task's DATA_HELP)")
    parser.add_argument("--split", default=None, help="task split(s), e.g. random,popular for pope")
    parser.add_argument("--image-dir", default=None, help="image folder, for tasks whose loader takes one")
    parser.add_argument("--method", default="vanilla,default",
                        help="comma-separated presets, ablation names (uniform@himap, ...) or groups "
                        "(all@himap); 'default' is the task's default method")
    parser.add_argument("--k", nargs="+", metavar="K", help="override stage K values by position ('-' keeps one)")
    parser.add_argument("--ratio", nargs="+", metavar="R", help="override stage ratios (fractions, '-' keeps one)")
    parser.add_argument("--criterion", nargs="+", metavar="C", help="override stage criteria ('-' keeps one)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    parser.add_argument("--batch-size", type=int, default=1, help="items per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    parser.add_argument("--out", default="runs/eval", help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier predictions of these methods")
    parser.add_argument("--merge", action="store_true",
                        help="only merge shard files and write the summary (no model is loaded)")
    parser.add_argument("--merge-timeout", type=float, default=24 * 3600.0,
                        help="seconds rank 0 waits for the other ranks' shards")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--attn-implementation", default="sdpa", help="attention kernel: sdpa, eager, flash_attention_2")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--tokenizer", default="auto", choices=("auto", "java", "python"),
                        help="caption tokenizer for CIDEr")
    parser.add_argument("--judge-base-url", default=None, help="OpenAI-compatible API root for judge tasks")
    parser.add_argument("--judge-model", default=None, help="judge model, e.g. gpt-4o")
    parser.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="variable holding the judge API key")


def parse_overrides(values, cast, flag: str):
    """['3', '-'] -> [3, None] ('-' keeps that stage's value)."""
    if not values:
        return None
    out = []
    for v in values:
        if v in ("-", "none", "None"):
            out.append(None)
            continue
        try:
            out.append(cast(v))
        except ValueError:
            raise ValueError(f"{flag} expects {cast.__name__} values or '-', got {v!r}") from None
    return out


def override_name(name: str, k, ratio, criterion) -> str:
    """A method name that records its overrides, e.g. himap+k=3,8 (distinct prediction files)."""
    parts = [f"{flag}={','.join('-' if v is None else f'{v:g}' if isinstance(v, float) else str(v) for v in vals)}"
             for flag, vals in (("k", k), ("ratio", ratio), ("criterion", criterion)) if vals]
    return "+".join([name] + parts)


def resolve_methods(spec: str, task, arch, k=None, ratio=None, criterion=None):
    """Schedules for the comma-separated method spec ('default' = task.DEFAULT_METHOD, groups
    expanded), with stage overrides applied to a single method."""
    from himap.ablations import ModelShape, expand, resolve
    from himap.schedule import Schedule, with_overrides

    names = []
    for raw in (m.strip() for m in spec.split(",")):
        if not raw:
            continue
        raw = task.DEFAULT_METHOD if raw == "default" else raw.replace("@default", f"@{task.DEFAULT_METHOD}")
        names += [n for n in expand(raw) if n not in names]
    if not names:
        raise ValueError("no method given")
    shape = None
    if arch is not None:
        from himap.flops import paper_flops

        shape = ModelShape(arch.image_tokens, arch.num_layers, cost_fn=lambda s: paper_flops(arch, s))
    overridden = bool(k or ratio or criterion)
    if overridden and len(names) != 1:
        raise ValueError("--k/--ratio/--criterion apply to a single --method")
    schedules = []
    for name in names:
        s = Schedule(resolve(name, shape).stages, name=name)
        if overridden:
            s = with_overrides(s, k=k, ratio=ratio, criterion=criterion)
            s = Schedule(s.stages, name=override_name(name, k, ratio, criterion))
        if arch is not None:
            s.validate_for(arch.num_layers)
        schedules.append(s)
    return schedules


def main(args) -> int:
    from himap.evaluate import (EvalConfig, EvalError, LazyPredictor, arch_of_model, dist_env, evaluate,
                                pick_device)
    from himap.tasks import get_task
    from himap.tasks.base import DataError

    try:
        rank, world = dist_env()
        task = get_task(args.task)
        arch = arch_of_model(args.model)
        schedules = resolve_methods(args.method, task, arch,
                                    parse_overrides(args.k, int, "--k"),
                                    parse_overrides(args.ratio, float, "--ratio"),
                                    parse_overrides(args.criterion, str, "--criterion"))
        cfg = EvalConfig(task=task.NAME, data=args.data, split=args.split, limit=args.limit,
                         image_dir=args.image_dir, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, out=args.out, model=args.model,
                         overwrite=args.overwrite, rank=rank, world_size=world,
                         merge_timeout_s=args.merge_timeout, progress=not args.no_progress)
        predictor = None if args.merge else LazyPredictor(
            args.model, pick_device(args.device, rank, world), args.dtype, args.attn_implementation,
            args.max_new_tokens)
        score_kwargs = {"tokenizer": args.tokenizer, "judge_base_url": args.judge_base_url,
                        "judge_model": args.judge_model, "judge_api_key_env": args.judge_api_key_env,
                        "judge_cache": os.path.join(args.out, f"{task.NAME}.judge_cache.jsonl")}
        result = evaluate(cfg, schedules, predictor, arch=arch, score_kwargs=score_kwargs,
                          merge_only=args.merge)
    except (EvalError, DataError, KeyError, ValueError, OSError) as err:
        print(f"himap eval: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    if rank != 0:
        print(json.dumps({"rank": rank, "world_size": world, "predicted": result.predicted}))
        return 0
    print(result.markdown)
    if any(s.get("flops_note") for s in result.summaries):
        print(f"note: {result.summaries[0]['flops_note']}")
    print(f"predictions and summary in {result.directory}")
    print(json.dumps({"task": task.NAME, "task_version": str(task.VERSION), "model": args.model,
                      "split": args.split, "metric": task.METRIC,
                      "methods": {s["method"]: {"score": s["score"], "tflops_paper": s["tflops_paper"],
                                                "tflops_full": s["tflops_full"],
                                                "latency_s_per_example": s["latency_s_per_example"],
                                                "n_items": s["n_items"]} for s in result.summaries},
                      "predicted": result.predicted}))
    return 0
