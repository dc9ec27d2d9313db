"""`himap demo`: the whole system on the built-in model and the built-in synthetic test set.

    himap demo                      # the whole test set (600 items), about 2 minutes on one core
    himap demo --quick              # a few items per step, for a smoke test
    himap demo --out runs/demo --limit 300

1. Evaluates vanilla, FastV, HiMAP and random pruning (himap.evaluation.runner: greedy decoding through
   himap.models.loading, predictions in OUT/shapes/<method>.jsonl) and reports accuracy per split,
   TFLOPs in the paper's convention (image tokens only, eq. 10) and in full (every decoder
   product, himap.cost.flops), and the prefill time of each method relative to vanilla (one forward
   pass over a fixed batch, methods interleaved round-robin, median over rounds).
2. Shows where the visual information moves into the text (the paper's shallow-layer
   injection, sections 3.2-3.3): first-token accuracy when every image token is removed from
   layer K on (himap.prune.schedule.drop_all_from), for each K; K = 0 removes the image tokens from the
   input, and a blank image gives the no-information baseline (appendix B). Also counts, per
   pruning method and stage, the items whose object's image token is still kept.
3. Measures the per-layer saliency flows S_vv and S_vt (eqs. 5-6, himap.analysis.saliency) and
   plots them with the accuracy-vs-TFLOPs plot.

Writes OUT/demo.json, OUT/accuracy_vs_tflops.png, OUT/drop_all.png, OUT/saliency_flows.png,
OUT/saliency_modalities.png; prints the tables and ends with one JSON line
{"methods": {"vanilla": {"accuracy": ...}, ...}, ...}.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

METHODS = ("vanilla", "fastv", "himap", "random")
"""The methods compared (himap.prune.schedule presets)."""


@dataclass
class DemoConfig:
    """What `himap demo` runs; the CLI's flags come from these fields."""

    model: str = "builtin"  # model folder or "builtin"
    out: str = "runs/demo"  # output folder (predictions, plots, demo.json)
    limit: int | None = None  # test items in total, spread over mc / pope / caption (None: all 600)
    probe_limit: int = 200  # mc + pope items for the drop-all-from-K probe
    saliency_samples: int = 32  # mc + pope items for the saliency flows
    timing_reps: int = 5  # round-robin rounds of prefill timing (after one warm-up round)
    batch_size: int = 32  # items per forward / generate call
    threads: int = 1  # torch.set_num_threads (1: robust on a shared 2-core machine, where 2 threads stall)
    progress: bool = True  # tqdm progress bars


def first_token_correct(model, processor, items, schedule, batch_size: int, inputs_fn=None) -> list[bool]:
    """Whether the greedy first answer token (one prefill, last prompt position) is the gold
    answer's first token, for mc / pope items, under `schedule` (vanilla: unpatched).
    `inputs_fn` may transform the batch inputs (e.g. drop the image)."""
    import torch

    from himap.analysis.data import answer_tokens, build_batch
    from himap.prune.engine import maybe_pruned

    tok = processor.tokenizer
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        inputs = build_batch(processor, chunk)
        if inputs_fn is not None:
            inputs = inputs_fn(inputs)
        with torch.no_grad(), maybe_pruned(model, schedule or "vanilla"):
            logits = model(**inputs, logits_to_keep=1).logits[:, -1]  # [B, V]
        pred = logits.argmax(-1).tolist()
        for it, p in zip(chunk, pred):
            out.append(p in answer_tokens(tok, it.answer)[1])
    return out


def _bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr (disabled: a no-op bar)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False)


def prefill_times(model, processor, items, methods: list, reps: int, progress: bool = False) -> dict:
    """Median prefill seconds per method and median per-round ratio to vanilla: one forward pass
    (logits_to_keep=1) over one fixed batch, methods interleaved, the start rotating per round."""
    import torch

    from himap.analysis.data import build_batch
    from himap.prune.engine import maybe_pruned
    from himap.prune.schedule import get_schedule

    inputs = build_batch(processor, items)
    names = [get_schedule(m).name for m in methods]

    def run(method):
        with torch.no_grad():
            t0 = time.perf_counter()
            with maybe_pruned(model, method):
                model(**inputs, logits_to_keep=1)
            return time.perf_counter() - t0

    with _bar((reps + 1) * len(methods), "prefill timing", progress) as bar:
        for m in methods:  # warm-up round
            run(m)
            bar.update()
        times = {n: [] for n in names}
        for r in range(reps):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for m in order:
                times[get_schedule(m).name].append(run(m))
                bar.update()
    base = times.get("vanilla")
    out = {}
    for n in names:
        ratio = statistics.median(t / b for t, b in zip(times[n], base)) if base else None
        out[n] = {"prefill_s": statistics.median(times[n]), "prefill_ratio": ratio}
    return out


def drop_all_probe(model, processor, items, batch_size: int, progress: bool = False) -> list[dict]:
    """First-token accuracy (percent; `accuracy` over all items and one key per split, e.g.
    `mc`, `pope`) with every image token removed from layer K on, for K = 0 (no image tokens in
    the input) .. L - 1, plus `blank` (a blank image, all layers) and `full` (vanilla)."""
    from himap.analysis.data import blank_image, drop_image_tokens
    from himap.prune.schedule import drop_all_from

    cfg = model.config
    pad = processor.tokenizer.pad_token_id or 0
    no_image = lambda x: drop_image_tokens(x, cfg.image_token_id, pad)  # noqa: E731
    layers = cfg.text_config.num_hidden_layers
    run = functools.partial(first_token_correct, model, processor, items, batch_size=batch_size)
    settings = ([(0, None, no_image)] + [(k, drop_all_from(k), None) for k in range(1, layers)]
                + [("blank", None, blank_image), ("full", None, None)])
    rows = []
    with _bar(len(settings), "drop-all-from-K probe", progress) as bar:
        for k, schedule, inputs_fn in settings:
            rows.append(_split_accuracy(k, items, run(schedule=schedule, inputs_fn=inputs_fn)))
            bar.update()
    return rows


def object_kept(model, processor, items, methods: list, batch_size: int, progress: bool = False) -> dict:
    """Per pruning method, the share (percent) of items whose object survives each stage: at
    least one of the image tokens holding an object (item.meta["objects"] cells) is kept.
    {method: [stage 1 share, stage 2 share, ...]}."""
    import torch

    import himap
    from himap.analysis.data import build_batch
    from himap.prune.schedule import get_schedule

    v = model.config.vision_config
    grid = v.image_size // v.patch_size
    cells = [{r * grid + c for _, _, (r, c) in it.meta.get("objects", [])} for it in items]
    out = {}
    pruning = [m for m in methods if get_schedule(m).stages]
    with _bar(len(pruning) * len(items), "object tokens kept", progress) as bar:
        for method in pruning:
            schedule = get_schedule(method)
            hits = [0] * len(schedule.stages)
            for i in range(0, len(items), batch_size):
                inputs = build_batch(processor, items[i:i + batch_size])
                with torch.no_grad(), himap.pruned(model, schedule) as handle:
                    model(**inputs, logits_to_keep=1)
                for j, kept in enumerate(handle.stats.kept_image_indices):
                    hits[j] += sum(bool(cells[i + b] & set(k)) for b, k in enumerate(kept))
                bar.update(len(items[i:i + batch_size]))
            out[method] = [100.0 * h / len(items) for h in hits]
    return out


def format_kept_table(kept: dict) -> str:
    stages = max((len(v) for v in kept.values()), default=0)
    lines = ["| method | " + " | ".join(f"stage {j + 1}" for j in range(stages)) + " |", "|---|" + "---|" * stages]
    for method, shares in kept.items():
        lines.append(f"| {method} | " + " | ".join(f"{x:.1f}" for x in shares) + " |" * (stages - len(shares) + 1))
    return "\n".join(lines) + "\n"


def _split_accuracy(k, items, correct: list[bool]) -> dict:
    """{"k": k, "accuracy": overall, <split>: accuracy of that split's items, ...} (percent)."""
    from himap.evaluation import metrics

    row = {"k": k, "accuracy": metrics.accuracy(correct)}
    for split in dict.fromkeys(it.meta.get("split", "all") for it in items):
        row[split] = metrics.accuracy([c for it, c in zip(items, correct) if it.meta.get("split", "all") == split])
    return row


def saliency_flows(model, processor, items, batch_size: int, progress: bool = False) -> dict:
    """Per-layer mean saliency metrics (S_sys, S_img, S_ins, S_vv, S_vt) over `items`, with the
    gold answer's first token as the loss target."""
    import torch

    from himap.analysis.data import answer_tokens, build_batch
    from himap.analysis.saliency import mean_metrics, saliency

    tok = processor.tokenizer
    samples = []
    with _bar(len(items), "saliency flows", progress) as bar:
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            inputs = build_batch(processor, chunk)
            targets = torch.tensor([answer_tokens(tok, it.answer)[0] for it in chunk])
            samples += [{"layers": s.layers, "metrics": s.metrics} for s in saliency(model, inputs, targets)]
            bar.update(len(chunk))
    return mean_metrics(samples)


def plot_accuracy_vs_tflops(methods: dict, path: str) -> str:
    """Accuracy (mean of mc and pope) against TFLOPs (paper convention), one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, m in methods.items():
        x = m.get("tflops_paper")
        if x is None or m.get("accuracy") is None:
            continue
        ax.scatter([x * 1e3], [m["accuracy"]], s=40)
        ax.annotate(name, (x * 1e3, m["accuracy"]), textcoords="offset points", xytext=(5, 4))
    ax.set_xlabel("GFLOPs, image tokens only (paper convention, eq. 10)")
    ax.set_ylabel("accuracy (mean of mc and pope, %)")
    ax.set_title("Built-in model: accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_drop_all(rows: list[dict], path: str) -> str:
    """Accuracy against the layer K from which all image tokens are removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r for r in rows if isinstance(r["k"], int)]
    splits = [key for key in ks[0] if key not in ("k", "accuracy")] if ks else []
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, style in [("accuracy", "-")] + [(sp, "--") for sp in splits]:
        label = (" + ".join(splits) or "all") if key == "accuracy" else key
        line, = ax.plot([r["k"] for r in ks], [r[key] for r in ks], marker="o", ls=style, label=f"{label}: image removed from K on")
        for r in rows:
            if r["k"] == "full":
                ax.axhline(r[key], color=line.get_color(), ls=":", lw=1)
            if r["k"] == "blank" and key == "accuracy":
                ax.axhline(r[key], color="gray", ls="-.", lw=1, label="blank image (all)")
    ax.set_xlabel("K (layers 0..K-1 see the image tokens)")
    ax.set_ylabel("first-token accuracy (%); dotted: vanilla")
    ax.set_title("Where visual information moves into the text")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_methods_table(methods: dict) -> str:
    """Markdown table of the methods; FLOPs in GFLOPs per example (the JSON keeps TFLOPs), the
    paper-convention FLOPs also as a share of vanilla's."""
    head = ("| method | mc acc | pope acc | mean | caption obj-F1 | GFLOPs (paper) | GFLOPs (full) | "
            "FLOPs vs vanilla (paper) | prefill time / vanilla |\n|---|---|---|---|---|---|---|---|---|\n")
    f = lambda v, d=1, scale=1.0: "n/a" if v is None else f"{v * scale:.{d}f}"  # noqa: E731
    base = (methods.get("vanilla") or {}).get("tflops_paper")
    rows = []
    for n, m in methods.items():
        share = f"{100 * m['tflops_paper'] / base:.0f}%" if base and m.get("tflops_paper") is not None else "n/a"
        rows.append(f"| {n} | {f(m.get('mc_accuracy'))} | {f(m.get('pope_accuracy'))} | {f(m.get('accuracy'))} | "
                    f"{f(m.get('caption_object_f1'))} | {f(m.get('tflops_paper'), 3, 1e3)} | "
                    f"{f(m.get('tflops_full'), 3, 1e3)} | {share} | {f(m.get('prefill_ratio'), 2)} |")
    return head + "\n".join(rows) + "\n"


def format_drop_table(rows: list[dict]) -> str:
    splits = [key for key in rows[0] if key not in ("k", "accuracy")]
    lines = ["| K | " + " | ".join(str(r["k"]) for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for key in ["accuracy"] + splits:
        label = (" + ".join(splits) or "accuracy") if key == "accuracy" else key
        lines.append(f"| {label} | " + " | ".join("n/a" if r.get(key) is None else f"{r[key]:.1f}" for r in rows) + " |")
    return "\n".join(lines) + "\n"


def format_flow_table(means: dict) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.2e}"  # noqa: E731
    lines = ["| layer | S_vt (image -> instruction) | S_vv (image -> image) | S_vt / S_vv |", "|---|---|---|---|"]
    for j, layer in enumerate(means["layers"]):
        vt, vv = means["S_vt"][j], means["S_vv"][j]
        ratio = f"{vt / vv:.2f}" if vt is not None and vv else "n/a"
        lines.append(f"| {layer} | {f(vt)} | {f(vv)} | {ratio} |")
    return "\n".join(lines) + "\n"


def run(cfg: DemoConfig) -> dict:
    """Run the demo; returns the result dict (also written to OUT/demo.json)."""
    import torch

    from himap.analysis.plots import plot_modalities, plot_visual_flows
    from himap.evaluation.runner import (
        EvalConfig,
        evaluate,
        model_arch,
        model_predictor,
    )
    from himap.models.loading import load_model
    from himap.prune.schedule import get_schedule
    from himap.tasks import shapes

    torch.set_num_threads(cfg.threads)
    t_start = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    model, processor = load_model(cfg.model)
    arch = model_arch(model.config, name=cfg.model)
    schedules = [get_schedule(m) for m in METHODS]

    # 1. accuracy, FLOPs and latency per method, through the evaluation loop
    ecfg = EvalConfig(task="shapes", limit=cfg.limit, batch_size=cfg.batch_size, out=cfg.out,
                      model=cfg.model, overwrite=True, progress=cfg.progress)
    result = evaluate(ecfg, schedules, functools.partial(model_predictor, model, processor), arch=arch)
    items = shapes.load(None, split="mc,pope")
    timing = prefill_times(model, processor, items[: cfg.batch_size // 2] + items[-(cfg.batch_size // 2):],
                           list(METHODS), cfg.timing_reps, progress=cfg.progress)
    methods = {}
    for s in result.summaries:
        sc = s["scores"]
        methods[s["method"]] = {
            "accuracy": sc.get("accuracy"), "mc_accuracy": sc.get("mc_accuracy"),
            "pope_accuracy": sc.get("pope_accuracy"), "caption_object_f1": sc.get("caption_object_f1"),
            "tflops_paper": s.get("tflops_paper"), "tflops_paper_ratio": s.get("tflops_paper_ratio"),
            "tflops_full": s.get("tflops_full"), **timing.get(s["method"], {}), "n_items": s["n_items"],
        }

    # 2. where visual information moves into the text
    probe_items = shapes.load(None, split="mc,pope", limit=cfg.probe_limit)
    drop_rows = drop_all_probe(model, processor, probe_items, cfg.batch_size, progress=cfg.progress)
    kept = object_kept(model, processor, probe_items, list(METHODS), cfg.batch_size, progress=cfg.progress)

    # 3. saliency flows
    flow_items = shapes.load(None, split="mc,pope", limit=cfg.saliency_samples)
    flows = saliency_flows(model, processor, flow_items, min(cfg.batch_size, 16), progress=cfg.progress)

    plots = {
        "accuracy_vs_tflops": plot_accuracy_vs_tflops(methods, os.path.join(cfg.out, "accuracy_vs_tflops.png")),
        "drop_all": plot_drop_all(drop_rows, os.path.join(cfg.out, "drop_all.png")),
        "saliency_flows": plot_visual_flows(flows, os.path.join(cfg.out, "saliency_flows.png"),
                                            title="Built-in model: S_vv vs S_vt per layer"),
        "saliency_modalities": plot_modalities(flows, os.path.join(cfg.out, "saliency_modalities.png"),
                                               title="Built-in model: saliency per token set"),
    }
    out = {"config": asdict(cfg), "methods": methods, "drop_all_from_k": drop_rows, "object_kept": kept, "saliency": flows,
           "plots": plots, "predictions": result.directory, "seconds": round(time.time() - t_start, 1)}
    with open(os.path.join(cfg.out, "demo.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def report(out: dict) -> str:
    """The printed tables."""
    lines = ["## Pruning methods on the built-in model (shapes test set)", "",
             format_methods_table(out["methods"]),
             "accuracy: greedy answers scored by himap.tasks.shapes; TFLOPs per example; prefill time: "
             "one forward over a fixed batch, median ratio over interleaved rounds.", "",
             "## Accuracy (first token, mc + pope) when every image token is dropped from layer K on", "",
             format_drop_table(out["drop_all_from_k"]),
             "K = 0: no image tokens at all; blank: a blank image; full: vanilla.", "",
             "## Items whose object token survives each pruning stage (%, mc + pope)", "",
             format_kept_table(out["object_kept"]),
             f"## Saliency flows per layer (mean over {out['saliency']['n']} samples)", "",
             format_flow_table(out["saliency"]), "",
             "plots: " + ", ".join(out["plots"].values()), f"({out['seconds']} s)"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command

QUICK = {"limit": 12, "probe_limit": 8, "saliency_samples": 4, "timing_reps": 1, "batch_size": 8}
"""--quick: sizes for a smoke test (seconds)."""


def add_arguments(parser) -> None:
    from himap.cli.common import add_dataclass_arguments, nonnegative_int, positive_int

    add_dataclass_arguments(parser, DemoConfig, skip=("progress",),
                            types={"limit": nonnegative_int, "probe_limit": positive_int,
                                   "saliency_samples": positive_int, "timing_reps": positive_int,
                                   "batch_size": positive_int, "threads": positive_int})
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes for a smoke test: {QUICK}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig) if f.name != "progress"}
    if args.quick:
        values.update(QUICK)
    cfg = DemoConfig(**values, progress=not args.no_progress)
    if cfg.progress:
        from himap.cli.common import note

        note(f"himap demo: loading {cfg.model} and the built-in test set ...")
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
