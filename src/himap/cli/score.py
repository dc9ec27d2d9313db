"""Score an existing prediction file (ours or LLaVA's published answers) on a task.

    himap score --task pope --data data/pope --predictions runs/eval/pope/himap.jsonl
    himap score --task scienceqa_img --data data/scienceqa --predictions llava-v1.5-7b.jsonl --label llava
    himap score --task shapes --predictions runs/eval/shapes/vanilla.jsonl runs/eval/shapes/himap.jsonl
    himap score --task mmvet --data data/mmvet --predictions results.json \
        --judge-base-url https://api.openai.com/v1 --judge-model gpt-4-0613

Reads, one method per table row:
- the project's prediction JSONL (`himap eval` output): {"id", "prediction", "method", ...} per
  line; a file holding several methods is scored per method;
- LLaVA's answer files: JSONL with {"question_id", "text", ...} (scored as one method, named by
  --label or the file name);
- a JSON object {id: answer} (MM-Vet's results format) or a JSON list of either kind of row.
Only the question files are read (no image; `shapes` needs no --data). A file whose answers do
not look like the task's at all (no yes/no for pope, no option letter for scienceqa_img) is an
error: it holds another task's answers. Prints a markdown table and ends with one JSON line
{"task", "version", "split", "methods"}.
"""

from __future__ import annotations

import json
import os
import sys

from himap.tasks.base import DataError

CAPTION_TOKENIZERS = ("auto", "java", "python")


def add_arguments(parser) -> None:
    from himap.tasks import TASKS

    parser.add_argument("--task", required=True, help="task name: " + ", ".join(TASKS))
    parser.add_argument("--data", default=None,
                        help="the task's data folder (question files; not needed for shapes)")
    parser.add_argument("--predictions", required=True, nargs="+",
                        help="prediction file(s): himap eval JSONL, LLaVA answer JSONL or {id: answer} JSON")
    parser.add_argument("--split", default=None, help="task split(s), e.g. random,popular for pope")
    parser.add_argument("--method", default=None, help="score only this method of a multi-method file")
    parser.add_argument("--label", default=None,
                        help="method name for files without a method field (default: file name)")
    parser.add_argument("--tokenizer", choices=CAPTION_TOKENIZERS, default="auto",
                        help="caption tokenizer for CIDEr: java PTBTokenizer, pure python, or auto")
    parser.add_argument("--judge-base-url", default=None,
                        help="OpenAI-compatible API root for judge-scored tasks, "
                        "e.g. https://api.openai.com/v1")
    parser.add_argument("--judge-model", default=None, help="judge model, e.g. gpt-4o")
    parser.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the judge API key")
    parser.add_argument("--judge-cache", default=None,
                        help="JSONL cache of judge answers (default: <predictions>.judge_cache.jsonl)")
    parser.add_argument("--output", default=None, help="also write the JSON result to this file")


def read_predictions(path: str, label: str | None = None, canonical=str,
                     task: str | None = None) -> dict[str, dict[str, str]]:
    """{method: {id: prediction}} from one file in any of the accepted formats; a later line
    for the same (method, id) replaces an earlier one. Rows naming another task than `task`
    are an error."""
    from himap.tasks.base import read_json_or_jsonl, read_jsonl

    if not os.path.isfile(path):
        raise DataError(f"prediction file {path!r} not found")
    data = read_jsonl(path) if path.endswith(".jsonl") else read_json_or_jsonl(path)
    default = label or os.path.splitext(os.path.basename(path))[0]
    if isinstance(data, dict) and not _is_row(data):  # {id: answer}
        bad = [k for k, v in data.items() if not isinstance(v, str)]
        if bad:
            raise DataError(f"{path}: expected {{id: answer text}} or rows with id+prediction or "
                            f"question_id+text; the value of {bad[0]!r} is not text")
        return {default: {canonical(k): v for k, v in data.items()}}
    rows = [data] if isinstance(data, dict) else data
    out: dict[str, dict[str, str]] = {}
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: entry {n} is not a JSON object")
        if "prediction" in row and "id" in row:
            rid, text = row["id"], row["prediction"]
        elif "text" in row and "question_id" in row:
            rid, text = row["question_id"], row["text"]
        else:
            raise DataError(f"{path}: entry {n} has neither id+prediction nor question_id+text "
                            f"(keys: {sorted(row)})")
        if not isinstance(text, str):
            raise DataError(f"{path}: entry {n} prediction is not text: {text!r}")
        if task and row.get("task") and row["task"] != task:
            raise DataError(f"{path}: entry {n} holds a prediction for task {row['task']!r}, not {task!r}")
        out.setdefault(str(row.get("method") or default), {})[canonical(rid)] = text
    if not out:
        raise DataError(f"{path}: no predictions")
    return out


def _is_row(obj: dict) -> bool:
    return ("id" in obj and "prediction" in obj) or ("question_id" in obj and "text" in obj)


def flat_columns(result: dict, metric: str) -> dict[str, float]:
    """Table columns of a score result: the primary metric, other top-level numbers, and one
    level of nested groups (their metric / f1 when they are dicts, else the number itself)."""
    skip = {"n", "n_metric", "missing", "tp", "fp", "tn", "fn"}
    cols = {metric: result.get(metric)}
    for key, value in result.items():
        if key in skip or key == metric:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            cols[key] = value
        elif isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, dict):
                    for k in (metric, "f1"):
                        if k in v:
                            cols[f"{sub}.{k}"] = v[k]
                elif isinstance(v, (int, float)):
                    cols[f"{key}.{sub}"] = v
    n, n_metric = result.get("n"), result.get("n_metric", result.get("n"))
    cols["n"] = n if n_metric == n else f"{n_metric} of {n}"  # the items the metric covers
    cols["missing"] = result.get("missing")
    return cols


def markdown_table(rows: dict[str, dict], metric: str) -> str:
    """One row per method."""
    flat = {m: flat_columns(r, metric) for m, r in rows.items()}
    header = list(dict.fromkeys(k for cols in flat.values() for k in cols))

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    lines += ["| " + m + " | " + " | ".join(fmt(cols.get(k)) for k in header) + " |"
              for m, cols in flat.items()]
    return "\n".join(lines)


def score_file(task, items, predictions: dict[str, dict[str, str]], method: str | None = None,
               **kw) -> dict[str, dict]:
    """{method: task.score(...) result} for each method (or only `method`)."""
    methods = [method] if method else list(predictions)
    unknown = [m for m in methods if m not in predictions]
    if unknown:
        raise DataError(f"method {unknown[0]!r} not in the predictions (have {sorted(predictions)})")
    return {m: task.score(items, predictions[m], **kw) for m in methods}


def check_answer_form(task, items, predictions: dict[str, dict[str, str]]) -> None:
    """Raise when a method's predictions do not read as the task's kind of answer at all (another
    task's file whose ids happen to overlap); warn when fewer than half do."""
    from himap.tasks import answer_form_count

    for m, preds in predictions.items():
        counted = answer_form_count(task, items, preds)
        if counted is None or not counted[1]:
            continue
        like, n = counted
        if like == 0:
            example = next(preds[it.id] for it in items if it.id in preds)
            raise DataError(f"{m}: none of the {n} predictions for {task.NAME} items reads as "
                            f"{task.ANSWER_FORM} (e.g. {example[:60]!r}); is this another task's answer file?")
        if like < n / 2:
            print(f"warning: {m}: only {like} of {n} predictions read as {task.ANSWER_FORM}",
                  file=sys.stderr)


def main(args) -> int:
    from himap.tasks import get_task, load_for_scoring

    task = get_task(args.task)
    items = load_for_scoring(task, args.data, split=args.split)
    canonical = getattr(task, "canonical_id", str)
    predictions: dict[str, dict[str, str]] = {}
    for path in args.predictions:
        for m, preds in read_predictions(path, args.label, canonical, task.NAME).items():
            predictions.setdefault(m, {}).update(preds)
    if args.method:
        if args.method not in predictions:
            raise DataError(f"method {args.method!r} not in the predictions (have {sorted(predictions)})")
        predictions = {args.method: predictions[args.method]}
    ids = {it.id for it in items}
    for m, preds in predictions.items():
        extra = [i for i in preds if i not in ids]
        absent = len(ids) - (len(preds) - len(extra))
        if extra:
            print(f"note: {m}: {len(extra)} predictions have ids outside the {task.NAME} items "
                  f"loaded (e.g. {extra[:3]}); ignored", file=sys.stderr)
        if absent:
            print(f"warning: {m}: {absent} of {len(ids)} items have no prediction; the score "
                  "covers the rest", file=sys.stderr)
    check_answer_form(task, items, predictions)
    kw = {"tokenizer": args.tokenizer, "judge_base_url": args.judge_base_url,
          "judge_model": args.judge_model, "judge_api_key_env": args.judge_api_key_env,
          "judge_cache": args.judge_cache or (args.predictions[0] + ".judge_cache.jsonl")}
    results = score_file(task, items, predictions, **kw)
    print(f"{task.NAME} v{task.VERSION} ({task.METRIC}), split {args.split or 'default'}:")
    print(markdown_table(results, task.METRIC))
    summary = {"task": task.NAME, "version": task.VERSION, "split": args.split,
               "metric": task.METRIC, "methods": results}
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return 0
