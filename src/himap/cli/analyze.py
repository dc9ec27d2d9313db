"""Information-flow analysis: saliency, attention disruption, Appendix-B filter.

    himap analyze filter   --model M --task scienceqa_img --data-dir D --out runs/filter
    himap analyze saliency --model M --task scienceqa_img --data-dir D --ids runs/filter/kept_ids.json --out runs/sal
    himap analyze disrupt  --model M --task scienceqa_img --data-dir D --ids runs/filter/kept_ids.json --out runs/dis

Samples come from a task (--task, --data-dir, --split) or a JSONL of {id?, image, question,
answer} (--jsonl). Every analysis looks at the first answer token (one forward of the prompt).
`--reference official` (saliency, disrupt) selects every choice of the official HiMAP code where
it differs from the paper as printed (docs/official-code.md); single flags override it.
Each writes OUT/samples.jsonl as it goes (a rerun resumes, skipping the samples already there),
OUT/summary.json and PNG plots, and prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from himap.analysis.disrupt import FLOWS, OFFICIAL_TOKENS, DisruptConfig
from himap.analysis.disrupt import REFERENCES as DISRUPT_REFERENCES
from himap.analysis.filter import WITHOUT_MODES, FilterConfig
from himap.analysis.saliency import REFERENCES as SALIENCY_REFERENCES
from himap.analysis.saliency import SET_DIRECTIONS, TARGETS, VALUES, SaliencyConfig

ANALYSES = {
    "saliency": "Per-layer saliency of system, image and instruction tokens (eqs. 1-6; figures 2-3).",
    "disrupt": "Block img2ins / img2img / img2rnd flows at chosen layers: consistency, E_l, D_l (figures 4-5).",
    "filter": "Keep samples answered correctly with the image and wrongly without it (appendix B).",
}
_SAL, _DIS, _FIL = SaliencyConfig(), DisruptConfig(), FilterConfig()


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    for name, help_text in ANALYSES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p, name)
        if name == "saliency":
            p.add_argument("--reference", choices=tuple(SALIENCY_REFERENCES), default="paper",
                           help="paper: the equations (|A dL/dA| of eq. 1, S_sys/S_img/S_ins over the set's "
                                "columns as eqs. 2-4, S_vv/S_vt divided by |V| as eqs. 5-6), target the answer's first "
                                "token, 'hf' prompts; official: what the official code computes (|A^2 dL/dA|, "
                                "S_sys/S_img/S_ins over the set's rows, S_vv/S_vt not divided by |V|, target "
                                "convert_tokens_to_ids(answer), llava-v1 prompts); the flags below override single "
                                "choices. Both take |.| per head before the head mean (--abs-of-mean: eq. 1's order)")
            p.add_argument("--layers", default="all", help="layers to measure: all, or e.g. 0-5,10 (0-based)")
            p.add_argument("--target", choices=TARGETS, default=None,
                           help="loss target: the answer's first token; the vocabulary piece spelled like the "
                                "answer (official); the model's own top-1 token (default: the reference's)")
            p.add_argument("--value", choices=VALUES, default=None,
                           help="per-head value: eq1 |A*dL/dA|, official |A^2*dL/dA| (default: the reference's)")
            p.add_argument("--set-direction", choices=SET_DIRECTIONS, default=None,
                           help="S_sys/S_img/S_ins: columns = flow out of the set's tokens (eqs. 2-4), rows = "
                                "flow into them (official) (default: the reference's)")
            p.add_argument("--divide-visual", action=argparse.BooleanOptionalAction, default=None,
                           help="divide S_vv and S_vt by |V| (eqs. 5-6; the official code does not) "
                                "(default: the reference's)")
            p.add_argument("--save-matrix-layer", type=int, default=_SAL.matrix_layer, metavar="L",
                           help="also save layer L's full saliency matrix per sample (OUT/matrices/*.npz)")
            p.add_argument("--abs-of-mean", action="store_true",
                           help="|head mean| (eq. 1 as printed) instead of the head mean of |value| (SPEC, official)")
        elif name == "disrupt":
            p.add_argument("--reference", choices=tuple(DISRUPT_REFERENCES), default="paper",
                           help="paper: first-token measures only, blocks exactly the windows' layers, 'hf' prompts; "
                                f"official: also the official label consistency over {OFFICIAL_TOKENS} generated "
                                "tokens, blocks from each window's first layer on, llava-v1 prompts")
            p.add_argument("--official-tokens", type=int, default=None, metavar="N",
                           help="generate N tokens under each block without KV cache and report the official "
                                "label consistency (the label appears in the output); 0: off "
                                f"(default: {OFFICIAL_TOKENS} with --reference official, else 0)")
            p.add_argument("--flows", default=",".join(_DIS.flows),
                           help=f"comma-separated flows to block, from {', '.join(FLOWS)}")
            p.add_argument("--windows", default=_DIS.windows,
                           help="blocked layer windows: first:N, last:N, every:N, each, a-b, a (comma-separated)")
            p.add_argument("--from-layer-on", action=argparse.BooleanOptionalAction, default=None,
                           help="block from each window's first layer to the last layer, as the official code's "
                                "mask alias does (default: only the window; on with --reference official)")
            p.add_argument("--seed", type=int, default=_DIS.seed, help="seed of img2rnd's random rows")
        else:
            p.add_argument("--without", choices=WITHOUT_MODES, default=_FIL.without,
                           help="drop: remove the image tokens from the prompt; blank: mean-colour image")


def _common(p, name: str) -> None:
    from himap.cli.common import add_model_arguments, add_prompt_format_argument, nonnegative_int, positive_int

    add_model_arguments(p)
    if name == "filter":
        add_prompt_format_argument(p)
    else:
        add_prompt_format_argument(p, default=None, default_note="default: the reference's (paper: hf, official: llava-v1)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="benchmark task name (himap.tasks), e.g. scienceqa_img, aokvqa_mc, pope")
    src.add_argument("--jsonl", metavar="FILE",
                     help='samples file: one {"id"?, "image", "question", "answer"} per line')
    p.add_argument("--data-dir", help="the task's data folder")
    p.add_argument("--split", help="the task's split(s)")
    p.add_argument("--ids", metavar="FILE",
                   help="only these sample ids (JSON list or JSONL, e.g. filter's kept_ids.json)")
    p.add_argument("--limit", type=nonnegative_int, help="first N samples (after --ids)")
    p.add_argument("--out", default=os.path.join("runs", f"analyze-{name}"), help="output folder")
    p.add_argument("--batch-size", type=positive_int, default=1, help="samples per forward")
    p.add_argument("--overwrite", action="store_true", help="discard results already in --out")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...] | None:
    """'all' -> None; '0-5,10' -> (0, 1, 2, 3, 4, 5, 10)."""
    if spec.strip().lower() == "all":
        return None
    out = set()
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"bad layer spec {part!r}: use all, a or a-b (comma-separated)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo or hi >= num_layers:
            raise ValueError(f"layers {part!r} outside the model's {num_layers} layers (0..{num_layers - 1})")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def resolve_reference(args) -> None:
    """Fill the choices left unset (None) from --reference: himap.analysis.saliency.REFERENCES or
    himap.analysis.disrupt.REFERENCES (filter has no reference)."""
    references = {"saliency": SALIENCY_REFERENCES, "disrupt": DISRUPT_REFERENCES}.get(args.analysis)
    if references is None:
        return
    for key, value in references[args.reference].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.analysis == "disrupt" and args.official_tokens < 0:
        raise ValueError("--official-tokens must be >= 0")


def _settings(args) -> dict:
    """What a resumed run must share with the results already in --out."""
    keys = {"saliency": ("layers", "target", "save_matrix_layer", "abs_of_mean", "reference", "value",
                         "set_direction", "divide_visual"),
            "disrupt": ("flows", "windows", "from_layer_on", "seed", "reference", "official_tokens"),
            "filter": ("without",)}[args.analysis]
    base = {"analysis": args.analysis, "model": args.model, "task": args.task,
            "jsonl": os.path.abspath(args.jsonl) if args.jsonl else None, "split": args.split,
            "attn": args.attn, "dtype": args.dtype, "prompt_format": args.prompt_format}
    return {**base, **{k: getattr(args, k) for k in keys}}


def _load_model(args):
    from himap.models.loading import load_model

    model, processor = load_model(args.model, attn_implementation=args.attn, dtype=args.dtype, device=args.device)
    return model.eval(), processor, args.device


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _decode(tok, token_id: int) -> str:
    return tok.decode([int(token_id)])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))


def main(args) -> int:
    from tqdm import tqdm

    from himap.analysis.data import ResultFile, check_run_settings, load_items, write_json
    from himap.cli.common import check_model_arguments, note
    from himap.tasks.base import check_images

    check_model_arguments(args)  # a model that cannot load fails before anything is read or written
    resolve_reference(args)
    items = load_items(task=args.task, data_dir=args.data_dir, split=args.split, jsonl=args.jsonl,
                       limit=args.limit, ids_file=args.ids)
    needs_answer = not (args.analysis == "saliency" and args.target == "greedy")
    if needs_answer:
        bad = [it for it in items if not isinstance(it.answer, (str, int, float)) or isinstance(it.answer, bool)]
        if bad:
            raise ValueError(f"first-token analysis needs short text answers; {len(bad)} sample(s) have "
                             f"others (e.g. id {bad[0].id}: {type(bad[0].answer).__name__}); "
                             "use --target greedy for saliency")
    check_images([it for it in items if it.image is not None])
    check_run_settings(args.out, _settings(args), overwrite=args.overwrite)
    results = ResultFile(os.path.join(args.out, "samples.jsonl"))
    todo = [it for it in items if it.id not in results]
    computed = 0
    if todo:
        note(f"loading {args.model} ...")
        model, processor, device = _load_model(args)
        step = {"saliency": _saliency_batch, "disrupt": _disrupt_batch, "filter": _filter_batch}[args.analysis]
        with_image = [it for it in todo if it.image is not None]
        for it in todo:
            if it.image is None:
                results.append({"id": it.id, "skipped": "no image"})
        with tqdm(total=len(with_image), desc=f"analyze {args.analysis}", unit="sample", file=sys.stderr,
                  disable=args.no_progress) as bar:
            for i in range(0, len(with_image), args.batch_size):
                batch = with_image[i:i + args.batch_size]
                for rec in step(args, model, processor, device, batch):
                    results.append(rec)
                computed += len(batch)
                bar.update(len(batch))
    records = [results.records[it.id] for it in items]
    done = [r for r in records if "skipped" not in r]
    summary = {"analysis": args.analysis, "settings": _settings(args), "n_samples": len(items),
               "n_skipped": len(records) - len(done),
               **{"saliency": _saliency_summary, "disrupt": _disrupt_summary,
                  "filter": _filter_summary}[args.analysis](args, done)}
    write_json(os.path.join(args.out, "summary.json"), summary)
    figures = [] if args.no_plots or not done else _plots(args, summary)
    n_skipped = len(records) - len(done)
    line = {"command": f"analyze {args.analysis}", "n": len(items), "computed": computed,
            "reused": len(items) - computed - n_skipped, "skipped": n_skipped,
            "out": args.out, "summary": os.path.join(args.out, "summary.json"), "figures": figures,
            **_headline(args.analysis, summary)}
    print(json.dumps(line))
    return 0


def _answers(processor, batch):
    from himap.analysis.data import answer_tokens

    tok = _tokenizer(processor)
    pairs = [answer_tokens(tok, it.answer) for it in batch]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _saliency_batch(args, model, processor, device, batch):
    import numpy as np

    from himap.analysis.data import build_batch
    from himap.analysis.probe import decoder_layers
    from himap.analysis.saliency import saliency

    n_layers = len(decoder_layers(model))
    cfg = SaliencyConfig(layers=parse_layers(args.layers, n_layers), abs_per_head=not args.abs_of_mean,
                         value=args.value, set_direction=args.set_direction, divide_visual=args.divide_visual,
                         matrix_layer=args.save_matrix_layer)
    tok = _tokenizer(processor)
    targets, accepted = _answers(processor, batch) if args.target != "greedy" else (None, None)
    if args.target == "answer-piece":
        from himap.analysis.data import answer_piece_id

        targets = [answer_piece_id(tok, it.answer) for it in batch]
        accepted = [sorted(set(a) | {t}) for a, t in zip(accepted, targets)]
    if accepted is None:  # greedy target: correctness still reported when the answer is short text
        try:
            accepted = _answers(processor, batch)[1]
        except ValueError:
            accepted = [None] * len(batch)
    inputs = build_batch(processor, batch, device, model.dtype, prompt_format=args.prompt_format)
    out = []
    for it, res, ok in zip(batch, saliency(model, inputs, targets, cfg), accepted):
        rec = {"id": it.id, **res.to_dict(), "target_text": _decode(tok, res.target),
               "prediction_text": _decode(tok, res.prediction),
               "correct": None if ok is None else res.prediction in ok}
        if res.matrix is not None:
            os.makedirs(os.path.join(args.out, "matrices"), exist_ok=True)
            path = os.path.join(args.out, "matrices", f"{_safe(it.id)}_layer{cfg.matrix_layer}.npz")
            np.savez_compressed(path, matrix=res.matrix.numpy(),
                                **{k: np.asarray(v, dtype=np.int64) for k, v in res.matrix_positions.items()})
            rec["matrix_file"] = os.path.relpath(path, args.out)
        out.append(rec)
    return out


def _disrupt_batch(args, model, processor, device, batch):
    from himap.analysis.data import build_batch, sample_seed
    from himap.analysis.disrupt import disrupt_batch

    flows = tuple(f.strip() for f in args.flows.split(",") if f.strip())
    bad = [f for f in flows if f not in FLOWS]
    if bad or not flows:
        raise ValueError(f"unknown flow(s) {bad}; choose from {', '.join(FLOWS)}")
    cfg = DisruptConfig(flows=flows, windows=args.windows, from_layer_on=args.from_layer_on, seed=args.seed,
                        official_tokens=args.official_tokens)
    targets, accepted = _answers(processor, batch)
    inputs = build_batch(processor, batch, device, model.dtype, prompt_format=args.prompt_format)
    seeds = [sample_seed(args.seed, it.id) for it in batch]
    tok = _tokenizer(processor)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    recs = disrupt_batch(model, inputs, targets, accepted, cfg, seeds, labels=[str(it.answer) for it in batch],
                         decode=decode)
    return [{"id": it.id, "target_text": _decode(tok, r["target"]),
             "prediction_text": _decode(tok, r["base"]["pred"]), **r} for it, r in zip(batch, recs)]


def _filter_batch(args, model, processor, device, batch):
    from himap.analysis.data import build_batch
    from himap.analysis.filter import filter_batch

    targets, accepted = _answers(processor, batch)
    inputs = build_batch(processor, batch, device, model.dtype, prompt_format=args.prompt_format)
    tok = _tokenizer(processor)
    recs = filter_batch(model, inputs, accepted, FilterConfig(without=args.without))
    return [{"id": it.id, "answer": it.answer, "target": t, **r,
             "text_with": _decode(tok, r["pred_with"]), "text_without": _decode(tok, r["pred_without"])}
            for it, t, r in zip(batch, targets, recs)]


def _saliency_summary(args, done):
    from himap.analysis.saliency import mean_metrics

    judged = [r for r in done if r.get("correct") is not None]
    correct = [r for r in judged if r["correct"]]
    return {"n": len(done), "accuracy": len(correct) / len(judged) if judged else None,
            "means": mean_metrics(done), "means_correct": mean_metrics(correct)}


def _disrupt_summary(args, done):
    from himap.analysis.disrupt import summarize

    return summarize(done)


def _filter_summary(args, done):
    from himap.analysis.data import write_json

    kept = [r["id"] for r in done if r["keep"]]
    path = os.path.join(args.out, "kept_ids.json")
    write_json(path, kept)
    n = len(done)
    return {"n": n, "kept": len(kept), "kept_ids_file": path, "without": args.without,
            "correct_with": sum(r["correct_with"] for r in done),
            "correct_without": sum(r["correct_without"] for r in done),
            "kept_fraction": len(kept) / n if n else None}


def _plots(args, summary) -> list[str]:
    from himap.analysis import plots

    out = args.out
    if args.analysis == "saliency":
        return [plots.plot_modalities(summary["means"], os.path.join(out, "saliency_modalities.png")),
                plots.plot_visual_flows(summary["means"], os.path.join(out, "saliency_visual_flows.png"))]
    if args.analysis == "disrupt":
        figs = [plots.plot_consistency(summary, os.path.join(out, "disrupt_consistency.png"))]
        if summary["D"]:
            figs.append(plots.plot_d_values(summary, os.path.join(out, "disrupt_D.png")))
        return figs
    return []


def _headline(analysis: str, summary: dict) -> dict:
    """A few key numbers for the final JSON line."""
    if analysis == "saliency":
        return {"accuracy": summary["accuracy"]}
    if analysis == "disrupt":
        line = {"correct_before": summary["correct_before"], "D": {w: d["D"] for w, d in summary["D"].items()}}
        if "label_in_output_before" in summary:
            line["label_consistency_official"] = {k: c["label_consistency_official"]
                                                  for k, c in summary["conditions"].items()}
        return line
    return {"kept": summary["kept"], "kept_ids_file": summary["kept_ids_file"]}
