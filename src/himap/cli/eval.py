"""Evaluate methods on a benchmark task; resumable predictions and a summary table.

    himap eval --model builtin --task shapes --method vanilla,fastv,himap --limit 100
    himap eval --model llava-hf/llava-1.5-7b-hf --task pope --data data/pope --method vanilla,himap \\
        --batch-size 8 --out runs/eval
    himap eval ... --method himap --k 3 8                      # stage overrides (one method)
    himap eval ... --method himap,uniform@himap,all@himap      # ablation names (himap.evaluation.ablations)
    himap eval --task mmvet --data data/mmvet --skip-missing   # only the items whose image is there
    himap eval ... --ids runs/filter/kept_ids.json             # only these item ids
    torchrun --nproc_per_node 4 --no-python himap eval ...     # data-parallel shards, merged by rank 0
    himap eval ... --merge                                     # merge shards and summarize only

Predictions: OUT/<task>[-<split>]/<method>.jsonl, one line per item as it is produced; a rerun
skips the ids already there. Summary: OUT/<task>[-<split>]/summary.{json,md}, printed as a
table (n: the items the metric covers); the last line printed is one JSON object. A preset
deeper than the model (e.g. himap-caption's K=15 on the built-in model's 10 layers) is scaled to
its depth, with a note.
"""

from __future__ import annotations

import json
import os


def add_arguments(parser) -> None:
    from himap.cli.common import (
        add_model_arguments,
        add_no_cache_argument,
        add_override_arguments,
        add_prompt_format_argument,
        nonnegative_int,
        positive_int,
    )
    from himap.tasks import TASKS

    parser.add_argument("--task", required=True, help="task name: " + ", ".join(TASKS))
    parser.add_argument("--data", default=None, help="the task's data folder (see the task's DATA_HELP)")
    parser.add_argument("--split", default=None, help="task split(s), e.g. random,popular for pope")
    parser.add_argument("--image-dir", default=None, help="image folder, for tasks whose loader takes one")
    parser.add_argument("--method", default="vanilla,default",
                        help="comma-separated presets, ablation names (uniform@himap, ...) or groups "
                        "(all@himap); 'default' is the task's default method")
    add_override_arguments(parser)
    add_prompt_format_argument(parser)
    add_no_cache_argument(parser)
    parser.add_argument("--limit", type=nonnegative_int, default=None, help="evaluate the first N items only")
    parser.add_argument("--ids", metavar="FILE", default=None,
                        help="evaluate only these item ids (JSON list or JSONL, e.g. analyze filter's kept_ids.json)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave out items whose image file is absent (reported) instead of refusing the run")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="items per generate call")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: the task's")
    parser.add_argument("--out", default="runs/eval", help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier predictions of these methods")
    parser.add_argument("--merge", action="store_true",
                        help="only merge shard files and write the summary (no model is loaded)")
    parser.add_argument("--merge-timeout", type=float, default=24 * 3600.0,
                        help="seconds rank 0 waits for the other ranks' shards")
    add_model_arguments(parser, device="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--tokenizer", default="auto", choices=("auto", "java", "python"),
                        help="caption tokenizer for CIDEr")
    parser.add_argument("--judge-base-url", default=None, help="OpenAI-compatible API root for judge tasks")
    parser.add_argument("--judge-model", default=None, help="judge model, e.g. gpt-4o")
    parser.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="variable holding the judge API key")


def main(args) -> int:
    from himap.cli.common import model_shape, overrides_from_args, resolve_methods, set_threads
    from himap.evaluation.runner import (
        EvalConfig,
        LazyPredictor,
        arch_of_model,
        dist_env,
        evaluate,
        pick_device,
    )
    from himap.models.loading import check_attn_implementation, resolve_model_path
    from himap.tasks import get_task

    rank, world = dist_env()
    task = get_task(args.task)
    device = None
    if not args.merge:  # a model that cannot load fails now, not after the data is read
        resolve_model_path(args.model)
        device = pick_device(args.device, rank, world)
        check_attn_implementation(args.attn, device)
        set_threads(args.threads)
    arch = arch_of_model(args.model)
    schedules = resolve_methods(args.method, model_shape(arch) if arch is not None else None,
                                overrides_from_args(args), default=task.DEFAULT_METHOD,
                                single_override=True)
    cfg = EvalConfig(task=task.NAME, data=args.data, split=args.split, limit=args.limit,
                     image_dir=args.image_dir, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, out=args.out, model=args.model,
                     overwrite=args.overwrite, rank=rank, world_size=world,
                     merge_timeout_s=args.merge_timeout, progress=not args.no_progress,
                     prompt_format=args.prompt_format, no_cache=args.no_cache,
                     ids_file=args.ids, skip_missing=args.skip_missing)
    predictor = None if args.merge else LazyPredictor(args.model, device, args.dtype, args.attn,
                                                      args.max_new_tokens, prompt_format=args.prompt_format,
                                                      no_cache=args.no_cache)
    score_kwargs = {"tokenizer": args.tokenizer, "judge_base_url": args.judge_base_url,
                    "judge_model": args.judge_model, "judge_api_key_env": args.judge_api_key_env,
                    "judge_cache": os.path.join(args.out, f"{task.NAME}.judge_cache.jsonl")}
    result = evaluate(cfg, schedules, predictor, arch=arch, score_kwargs=score_kwargs, merge_only=args.merge)
    if rank != 0:
        print(json.dumps({"rank": rank, "world_size": world, "predicted": result.predicted}))
        return 0
    print(result.markdown)
    if any(s.get("flops_note") for s in result.summaries):
        print(f"note: {result.summaries[0]['flops_note']}")
    print(f"predictions and summary in {result.directory}")
    print(json.dumps({"task": task.NAME, "task_version": str(task.VERSION), "model": args.model,
                      "split": args.split, "metric": task.METRIC, "n_items": result.n_items,
                      "skipped_missing": result.skipped_missing,
                      "methods": {s["method"]: {"score": s["score"], "n_metric": s["n_metric"],
                                                "tflops_paper": s["tflops_paper"],
                                                "tflops_full": s["tflops_full"],
                                                "latency_s_per_example": s["latency_s_per_example"],
                                                "n_items": s["n_items"]} for s in result.summaries},
                      "predicted": result.predicted}))
    return 0
