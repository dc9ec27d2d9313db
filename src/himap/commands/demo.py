"""Built-in model and synthetic benchmark: vanilla vs FastV vs HiMAP vs random, offline.

    himap demo                      # the whole test set (600 items), under 3 minutes on 2 cores
    himap demo --quick              # a few items per step, for a smoke test
    himap demo --out runs/demo --limit 300

Prints the methods table (accuracy per split, TFLOPs in the paper's convention and in full,
prefill time relative to vanilla), the drop-all-image-tokens-from-layer-K table and the
per-layer saliency flows; writes OUT/demo.json and PNG plots; ends with one JSON line.
"""

from __future__ import annotations

import dataclasses
import json

QUICK = {"limit": 12, "probe_limit": 8, "saliency_samples": 4, "timing_reps": 1, "batch_size": 8}
"""--quick: sizes for a smoke test (seconds)."""


def add_arguments(parser) -> None:
    from himap.demo import DemoConfig

    for f in dataclasses.fields(DemoConfig):
        if f.name == "progress":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = int if f.name == "limit" else type(f.default)
        parser.add_argument(flag, type=kind, default=f.default, help=f"(default {f.default})")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes for a smoke test: {QUICK}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    from himap.demo import DemoConfig, report, run

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig) if f.name != "progress"}
    if args.quick:
        values.update(QUICK)
    cfg = DemoConfig(**values, progress=not args.no_progress)
    out = run(cfg)
    print(report(out))
    summary = {"methods": {name: {k: m.get(k) for k in ("accuracy", "mc_accuracy", "pope_accuracy",
                                                        "caption_object_f1", "tflops_paper", "tflops_full",
                                                        "prefill_ratio")}
                           for name, m in out["methods"].items()},
               "drop_all_from_k": {str(r["k"]): r["accuracy"] for r in out["drop_all_from_k"]},
               "seconds": out["seconds"]}
    print(json.dumps(summary))
    return 0
