"""Evaluation runner: methods x one task, resumable predictions, data-parallel shards, summary.

Layout of a run (`out` = --out, default runs/eval):

    out/<task>[-<split>]/<method>.jsonl          predictions, one JSON object per line
    out/<task>[-<split>]/<method>.meta.json      what produced them (model, task version, schedule)
    out/<task>[-<split>]/<method>.rank<r>of<w>.jsonl   a rank's shard while a sharded run is going
    out/<task>[-<split>]/summary.json, summary.md      the methods of the last call, side by side

A prediction line holds {"id", "prediction", "method", "task", "split"} plus what the cost
columns need ("n_system", "n_image", "n_instruction", "new_tokens", "latency_s"); `himap score`
reads the same files. Lines are appended and flushed as they are produced, so an interrupted run
loses at most the batch in flight; a rerun skips every id already present in any of the method's
files (the merged file or any shard, whatever world size wrote it).

Sharding (SPEC: several GPUs): rank r of w takes items i % w == r (RANK / WORLD_SIZE from the
environment, as `torchrun` sets them) and writes its own shard file; no process group is
needed. Rank 0 waits until every item has a prediction in some file, merges them into
<method>.jsonl (atomic rename), deletes the shards and writes the summary. `merge_only` (the
CLI's --merge) does that last step alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from himap.prune.schedule import Schedule

PredictBatch = Callable[[list], list[dict]]
"""items -> one dict per item with at least "prediction" (extras are stored with it)."""
PredictorFactory = Callable[[Schedule, int], "contextlib.AbstractContextManager[PredictBatch]"]
"""(schedule, max_new_tokens) -> context manager yielding a PredictBatch that runs the model
under that schedule."""

TIMING_KEYS = ("latency_s_per_example", "latency_s_total")
"""Summary fields that depend on wall-clock time (everything else is reproducible)."""


class EvalError(RuntimeError):
    """An evaluation cannot go on as asked (mismatched earlier run, missing predictions, ...)."""


@dataclass
class EvalConfig:
    """One `himap eval` call: a task, its items and where the outputs go."""

    task: str  # registered task name (himap.tasks.TASKS)
    data: str | None = None  # task data folder (None: the task's own default, if it has one)
    split: str | None = None  # task split(s), e.g. "random,popular" for POPE; None: the task default
    limit: int | None = None  # evaluate the first N items only (a later larger limit continues)
    image_dir: str | None = None  # image folder, for tasks whose loader takes one
    batch_size: int = 1  # items per generate call (left padding, SPEC section 2)
    max_new_tokens: int | None = None  # None: the task's MAX_NEW_TOKENS
    out: str = "runs/eval"  # output root; predictions go under out/<task>[-<split>]/
    model: str = "model"  # model path or id, recorded with the predictions and checked on resume
    overwrite: bool = False  # delete this run's earlier predictions of the same methods first
    rank: int = 0  # this process's rank (RANK); items i % world_size == rank are its share
    world_size: int = 1  # number of processes (WORLD_SIZE)
    merge_timeout_s: float = 24 * 3600.0  # how long rank 0 waits for the other ranks' shards
    ids_file: str | None = None  # evaluate only the ids listed there (JSON list / JSONL; before `limit`)
    skip_missing: bool = False  # leave out items whose image file is absent (before `limit`), counted
    poll_s: float = 0.5  # how often rank 0 looks at the shards while waiting
    progress: bool = True  # show a tqdm progress bar
    prompt_format: str = "hf"  # himap.models.loading.PROMPT_FORMATS; recorded with the predictions
    no_cache: bool = False  # generate as the official code (use_cache=False, re-ranking at every token)


def dist_env(environ=os.environ) -> tuple[int, int]:
    """(rank, world_size) from RANK / WORLD_SIZE (torchrun, accelerate), (0, 1) without them."""
    rank, world = int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise EvalError(f"bad RANK={rank} / WORLD_SIZE={world}")
    return rank, world


# ---------------------------------------------------------------- files

def safe_name(name: str) -> str:
    """A method name as a file name: characters other than letters, digits and ._=@,+- become _."""
    return re.sub(r"[^A-Za-z0-9._=@,+-]", "_", name)


def run_dir(out: str, task: str, split: str | None) -> str:
    """out/<task>[-<split>]: one folder per task and split selection."""
    return os.path.join(out, task if not split else f"{task}-{safe_name(split)}")


def prediction_path(directory: str, method: str) -> str:
    return os.path.join(directory, f"{safe_name(method)}.jsonl")


def shard_path(directory: str, method: str, rank: int, world: int) -> str:
    return os.path.join(directory, f"{safe_name(method)}.rank{rank}of{world}.jsonl")


def method_files(directory: str, method: str) -> list[str]:
    """The merged file (first) and every shard file of `method` in `directory`."""
    if not os.path.isdir(directory):
        return []
    stem = safe_name(method)
    shards = sorted(f for f in os.listdir(directory)
                    if re.fullmatch(re.escape(stem) + r"\.rank\d+of\d+\.jsonl", f))
    merged = [f"{stem}.jsonl"] if os.path.isfile(os.path.join(directory, f"{stem}.jsonl")) else []
    return [os.path.join(directory, f) for f in merged + shards]


def read_records(path: str) -> list[dict]:
    """Records of a prediction file. A final line cut short (crash, or another rank writing it
    right now) is ignored; a bad line elsewhere is an error."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:  # a shard merged and removed by rank 0 meanwhile
        return []
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines):  # the last line has no newline yet: unfinished
                break
            raise EvalError(f"{path}:{n}: not valid JSON ({err}); fix or delete the line") from err
    return records


def collect(directory: str, method: str) -> dict[str, dict]:
    """id -> record over all of the method's files (the first record of an id wins)."""
    records: dict[str, dict] = {}
    for path in method_files(directory, method):
        for rec in read_records(path):
            records.setdefault(str(rec["id"]), rec)
    return records


def repair_tail(path: str) -> None:
    """Cut an unfinished last line (no trailing newline) so appending starts on a fresh line."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def write_json(path: str, obj) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- meta (resume safety)

def schedule_dict(schedule: Schedule) -> list[dict]:
    """Stages as plain dicts (recorded with the predictions and in summaries), as they read back
    from JSON (options become lists), so a resumed run compares equal."""
    out = []
    for stage in schedule.stages:
        d = dataclasses.asdict(stage)
        for name, default in (("keep", None), ("options", ())):  # absent when unused: older files compare equal
            if d[name] == default:
                del d[name]
        out.append(d)
    return json.loads(json.dumps(out))


def method_meta(cfg: EvalConfig, task, schedule: Schedule, max_new_tokens: int) -> dict:
    meta = {"model": cfg.model, "task": task.NAME, "task_version": str(task.VERSION),
            "split": cfg.split, "method": schedule.name, "schedule": schedule_dict(schedule),
            "max_new_tokens": max_new_tokens}
    # recorded only when they differ from the defaults, so earlier runs' files still resume
    if cfg.prompt_format != "hf":
        meta["prompt_format"] = cfg.prompt_format
    if cfg.no_cache:
        meta["no_cache"] = True
    if schedule.positions != "original":
        meta["positions"] = schedule.positions
    return meta


def check_meta(directory: str, meta: dict, overwrite: bool) -> None:
    """Refuse to mix predictions made under a different model, task version, schedule or token
    budget into the same file; with overwrite, delete the old files instead."""
    method = meta["method"]
    meta_path = os.path.join(directory, f"{safe_name(method)}.meta.json")
    if overwrite:
        for path in method_files(directory, method) + ([meta_path] if os.path.isfile(meta_path) else []):
            os.remove(path)
    has_predictions = bool(collect(directory, method))
    if os.path.isfile(meta_path) and not has_predictions:
        with contextlib.suppress(FileNotFoundError):  # another rank may remove it first
            os.remove(meta_path)  # settings of a run that predicted nothing: nothing to protect
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            old = json.load(f)
        diff = {k: (old.get(k), meta.get(k)) for k in {**old, **meta} if old.get(k) != meta.get(k)}
        if diff:
            raise EvalError(
                f"{directory} already holds predictions of {method!r} made with different settings "
                + "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
                + ". Use --overwrite to replace them, or another --out.")
    elif has_predictions:
        raise EvalError(f"{directory} has predictions of {method!r} but no {meta_path}; "
                        "use --overwrite to replace them")
    else:
        os.makedirs(directory, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # several ranks start at once: first one writes
            fd = os.open(meta_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2)


# ---------------------------------------------------------------- running

def shard(items: list, rank: int, world: int) -> list:
    """Items i with i % world == rank (the data-parallel share of one rank)."""
    return [it for i, it in enumerate(items) if i % world == rank]


def batches(items: list, size: int) -> Iterator[list]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run_method(items: list, predict: PredictBatch, path: str, *, method: str, task: str,
               batch_size: int, done: set[str], progress: bool = True, desc: str = "") -> int:
    """Predict every item whose id is not in `done`, appending one line per item to `path` as
    each batch finishes. Returns the number of items predicted."""
    from tqdm.auto import tqdm

    todo = [it for it in items if it.id not in done]
    if not todo:
        return 0
    repair_tail(path)
    with open(path, "a", encoding="utf-8") as f, \
            tqdm(total=len(todo), desc=desc or method, disable=not progress, file=sys.stderr) as bar:
        for batch in batches(todo, batch_size):
            outputs = predict(batch)
            if len(outputs) != len(batch):
                raise EvalError(f"predictor returned {len(outputs)} outputs for {len(batch)} items")
            for item, output in zip(batch, outputs):
                record = {"id": item.id, "prediction": output["prediction"], "method": method,
                          "task": task, "split": item.meta.get("split")}
                record.update({k: v for k, v in output.items() if k != "prediction"})
                f.write(json.dumps(record) + "\n")
            f.flush()
            bar.update(len(batch))
    return len(todo)


def merge(directory: str, method: str, items: list) -> dict[str, dict]:
    """Fold every shard of `method` into <method>.jsonl (items' order first, then any other ids
    from earlier runs), atomically, and delete the shards. Returns id -> record."""
    records = collect(directory, method)
    order = [it.id for it in items if it.id in records]
    order += [i for i in records if i not in set(order)]
    path = prediction_path(directory, method)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in order:
            f.write(json.dumps(records[i]) + "\n")
    os.replace(tmp, path)
    for p in method_files(directory, method):
        if p != path:
            os.remove(p)
    return records


def wait_for_all(directory: str, method: str, items: list, timeout_s: float, poll_s: float) -> None:
    """Rank 0: wait until every item has a prediction in one of the method's files."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [it.id for it in items if it.id not in collect(directory, method)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise EvalError(f"{len(missing)} item(s) of {method!r} still have no prediction after "
                            f"{timeout_s:.0f} s (a rank failed?). Rerun the same command to resume, "
                            "or run it once without torchrun to finish and merge.")
        time.sleep(poll_s)


# ---------------------------------------------------------------- cost and summary

def model_arch(config, name: str = "model"):
    """The cost model's view of a model config (himap.cost.flops.Arch), or None when unavailable."""
    try:
        from himap.cost.flops import Arch
    except ImportError:
        return None
    try:
        return Arch.from_config(config, name=name)
    except ValueError:
        return None


def cost_columns(arch, schedule: Schedule, records: list[dict]) -> dict:
    """TFLOPs of a method: the paper convention (image tokens only, eq. 10; MACs as the paper
    counts them) and the full count (all tokens, every decoder matrix product, decode steps and
    LM head, per example, mean over the items; the vision tower is left out as it is the same for
    every method, a criterion's own work on the vision side (VisionZip's) is included). "unavailable" with the reason when they cannot be computed."""
    out = {"tflops_paper": None, "tflops_paper_ratio": None, "tflops_full": None, "flops_note": ""}
    if arch is None:
        out["flops_note"] = "FLOPs unavailable: no cost model for this model (himap.cost.flops)"
        return out
    from himap.cost.flops import PromptShape, full_cost, paper_flops

    try:
        paper, vanilla = paper_flops(arch, schedule), paper_flops(arch, "vanilla")
        out["tflops_paper"] = paper / 1e12
        out["tflops_paper_ratio"] = paper / vanilla if vanilla else None
    except ValueError as err:
        out["flops_note"] = f"paper FLOPs unavailable: {err}"
    need = ("n_system", "n_image", "n_instruction", "new_tokens")
    shapes = [r for r in records if all(isinstance(r.get(k), int) for k in need)]
    if records and len(shapes) == len(records):
        try:
            per_shape: dict[tuple, int] = {}  # many items share a prompt shape
            for r in shapes:
                key = tuple(r[k] for k in need)
                if key not in per_shape:
                    c = full_cost(arch, schedule, PromptShape(
                        r["n_system"], r["n_instruction"], r["new_tokens"], r["n_image"]))
                    per_shape[key] = c.decoder + c.vision_ranking
            total = sum(per_shape[tuple(r[k] for k in need)] for r in shapes)
            out["tflops_full"] = total / len(shapes) / 1e12
        except ValueError as err:
            out["flops_note"] += f" full FLOPs unavailable: {err}"
    else:
        out["flops_note"] += " full FLOPs unavailable: predictions lack token counts"
    out["flops_note"] = out["flops_note"].strip()
    return out


def score_method(task, items: list, records: dict[str, dict], score_kwargs: dict | None) -> dict:
    """task.score over the items' predictions; a task that cannot score here (a judge task with
    no judge configured) gives {"error": ...} instead of a number."""
    predictions = {it.id: records[it.id]["prediction"] for it in items}
    try:
        return task.score(items, predictions, **(score_kwargs or {}))
    except Exception as err:  # noqa: BLE001 - reported in the summary and on stderr, never hidden
        print(f"warning: {task.NAME} could not be scored here ({type(err).__name__}: {err}); "
              f"score the predictions later with `himap score`", file=sys.stderr)
        return {"error": f"{type(err).__name__}: {err}"}


def summarize(cfg: EvalConfig, task, schedule: Schedule, items: list, records: dict[str, dict],
              arch, max_new_tokens: int, score_kwargs: dict | None = None) -> dict:
    """One method's summary: metric, FLOPs, latency per example and what produced them."""
    from himap import __version__

    missing = [it.id for it in items if it.id not in records]
    if missing:
        raise EvalError(f"{len(missing)} item(s) of {schedule.name!r} have no prediction (e.g. {missing[:3]})")
    chosen = [records[it.id] for it in items]
    scores = score_method(task, items, records, score_kwargs)
    latencies = [r["latency_s"] for r in chosen if isinstance(r.get("latency_s"), (int, float))]
    summary = {
        "task": task.NAME, "task_version": str(task.VERSION), "split": cfg.split, "model": cfg.model,
        "method": schedule.name, "schedule": schedule_dict(schedule), "n_items": len(items),
        "n_metric": scores.get("n_metric", len(items)),
        "metric": task.METRIC, "score": scores.get(task.METRIC), "scores": scores,
        **cost_columns(arch, schedule, chosen),
        "latency_s_per_example": sum(latencies) / len(latencies) if latencies else None,
        "latency_s_total": sum(latencies) if latencies else None,
        "max_new_tokens": max_new_tokens, "himap_version": __version__,
    }
    return summary


def _fmt(value, digits: int = 3) -> str:
    """Fixed decimals; values too small for them (a tiny model's TFLOPs) in 3 significant digits."""
    if value is None:
        return "unavailable"
    if isinstance(value, float):
        return f"{value:.3g}" if value and abs(value) < 10 ** -digits * 10 else f"{value:.{digits}f}"
    return str(value)


def markdown_table(summaries: list[dict]) -> str:
    """Methods side by side: metric and the items it covers (n; "400 of 600" when the metric
    leaves some out, e.g. shapes' accuracy covers mc and pope, not captions), TFLOPs (paper,
    ratio, full), latency per example."""
    if not summaries:
        return ""
    metric = summaries[0]["metric"]
    head = (f"| method | {metric} | n | TFLOPs (paper) | ratio | TFLOPs (full) | latency s/example |\n"
            "|---|---|---|---|---|---|---|\n")
    rows = []
    for s in summaries:
        score = s["score"] if s["score"] is not None else ("unavailable: " + s["scores"].get("error", "")
                                                           if "error" in s["scores"] else None)
        ratio = f"{100 * s['tflops_paper_ratio']:.0f}%" if s.get("tflops_paper_ratio") is not None else "unavailable"
        n_metric = s.get("n_metric", s["n_items"])
        n = str(n_metric) if n_metric == s["n_items"] else f"{n_metric} of {s['n_items']}"
        rows.append(f"| {s['method']} | {_fmt(score, 2)} | {n} | {_fmt(s['tflops_paper'])} | {ratio} | "
                    f"{_fmt(s['tflops_full'])} | {_fmt(s['latency_s_per_example'], 4)} |")
    first = summaries[0]
    title = (f"{first['task']} (version {first['task_version']}"
             + (f", split {first['split']}" if first.get("split") else "") + f"), model {first['model']}\n\n")
    return title + head + "\n".join(rows) + "\n"


# ---------------------------------------------------------------- the model predictor

def image_of(item):
    """The item's image as RGB PIL (None for a text-only item)."""
    if item.image is None:
        return None
    from himap.models.loading import load_image

    return load_image(item.image)


@contextlib.contextmanager
def model_predictor(model, processor, schedule: Schedule, max_new_tokens: int, prompt_format: str = "hf",
                    recompute: bool = False):
    """A PredictBatch that generates greedily with `model` pruned by `schedule` (himap.pruned),
    through himap.models.loading (prompt format, left padding), recording each item's token counts (for
    the full FLOPs count) and its share of the batch's wall-clock time. `recompute`: no KV cache,
    re-ranking at every token, as the official code generates (himap.models.loading.generate_ids)."""

    import himap
    from himap.models.loading import answer_length, build_inputs, generate_ids, stop_ids
    from himap.prune.adapters import visual_token_ids
    from himap.prune.tokens import token_sets

    image_token_id = visual_token_ids(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    stop = stop_ids(model, tokenizer)

    def predict(items: list) -> list[dict]:
        has_image = {it.image is not None for it in items}
        if len(has_image) > 1:
            raise EvalError("a batch mixes items with and without images; use --batch-size 1")
        start = time.perf_counter()
        images = [image_of(it) for it in items] if has_image == {True} else None
        inputs = build_inputs(processor, images, [it.prompt for it in items], device=model.device,
                              prompt_format=prompt_format)
        new = generate_ids(model, inputs, max_new_tokens, recompute=recompute).cpu()  # [B, new]
        texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        seconds = time.perf_counter() - start
        sets = token_sets(inputs["input_ids"].cpu(), image_token_id, inputs["attention_mask"].cpu())
        results = []
        for b, text in enumerate(texts):
            n_new = answer_length(new[b].tolist(), stop)
            results.append({"prediction": text,
                            "n_system": int(sets.system[b].sum()), "n_image": int(sets.image[b].sum()),
                            "n_instruction": int(sets.instruction[b].sum()), "new_tokens": n_new,
                            "latency_s": seconds / len(items), "batch_size": len(items)})
        return results

    with himap.pruned(model, schedule):
        yield predict


# ---------------------------------------------------------------- loading a model lazily

def arch_of_model(model: str):
    """Cost-model sizes from the model's config only (no weights), or None when unreadable."""
    try:
        from himap.models.loading import model_config

        config = model_config(model)
    except (OSError, ValueError, ImportError) as err:
        print(f"warning: could not read the config of {model!r} ({err}); FLOPs unavailable", file=sys.stderr)
        return None
    return model_arch(config, name=model)


def pick_device(device: str, rank: int = 0, world: int = 1) -> str:
    """'auto' -> cuda when available; with several ranks on CUDA each takes cuda:LOCAL_RANK.
    A device torch cannot use raises (himap.models.loading.check_device)."""
    import torch

    from himap.models.loading import check_device

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % max(1, torch.cuda.device_count())}"
    return device


class LazyPredictor:
    """A PredictorFactory over himap.models.loading.load_model that loads the model on first use, so a
    finished run (everything resumed) loads nothing."""

    def __init__(self, model: str, device: str, dtype: str | None, attn_implementation: str,
                 max_new_tokens: int | None, prompt_format: str = "hf", no_cache: bool = False):
        self.model, self.device, self.dtype = model, device, dtype
        self.attn_implementation, self.max_new_tokens = attn_implementation, max_new_tokens
        self.prompt_format, self.no_cache = prompt_format, no_cache
        self._loaded = None

    def load(self):
        if self._loaded is None:
            from himap.models.loading import load_model

            dtype = self.dtype or ("bf16" if self.device.startswith("cuda") else "fp32")
            print(f"loading {self.model} on {self.device} ...", file=sys.stderr, flush=True)
            self._loaded = load_model(self.model, attn_implementation=self.attn_implementation,
                                      dtype=dtype, device=self.device)
        return self._loaded

    def __call__(self, schedule: Schedule, max_new_tokens: int | None = None):
        model, processor = self.load()
        return model_predictor(model, processor, schedule, max_new_tokens or self.max_new_tokens,
                               self.prompt_format, self.no_cache)


# ---------------------------------------------------------------- the whole evaluation

def load_items(cfg: EvalConfig, task) -> tuple[list, int]:
    """(the task's items for this config, how many were left out for lacking an image file).

    image_dir goes only to loaders that take it. With `ids_file` or `skip_missing` the items are
    chosen first and `limit` applies to what remains (spread over the splits as the loaders do)."""
    from himap.tasks import require_data
    from himap.tasks.base import limit_per_group, missing_images, read_ids, select_ids

    skip = cfg.skip_missing and getattr(task, "NEEDS_DATA", True)  # generated tasks render their images
    kwargs = {"split": cfg.split, "limit": None if (cfg.ids_file or skip) else cfg.limit}
    if cfg.image_dir is not None:
        if "image_dir" not in inspect.signature(task.load).parameters:
            raise EvalError(f"task {task.NAME!r} takes no image folder (--image-dir)")
        kwargs["image_dir"] = cfg.image_dir
    require_data(task, cfg.data)
    items = task.load(cfg.data, **kwargs)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise EvalError(f"task {task.NAME!r} gave duplicate item ids; predictions could not be told apart")
    if cfg.ids_file:
        items = select_ids(items, read_ids(cfg.ids_file), cfg.ids_file)
    skipped = 0
    if skip:
        absent = {id(it) for it in missing_images(items)}
        skipped = len(absent)
        items = [it for it in items if id(it) not in absent]
    if kwargs["limit"] is None and cfg.limit is not None:
        splits = list(dict.fromkeys(it.meta.get("split") for it in items))
        items = limit_per_group([[it for it in items if it.meta.get("split") == s] for s in splits], cfg.limit)
    return items, skipped


@dataclass
class EvalResult:
    """What evaluate() produced on this rank."""

    directory: str  # out/<task>[-<split>]
    summaries: list[dict] = field(default_factory=list)  # one per method (rank 0 only)
    predicted: dict[str, int] = field(default_factory=dict)  # method -> items predicted in this call
    markdown: str = ""  # the side-by-side table (rank 0 only)
    n_items: int = 0  # items evaluated
    skipped_missing: int = 0  # items left out for lacking an image file (EvalConfig.skip_missing)


def evaluate(cfg: EvalConfig, schedules: list[Schedule], predictor: PredictorFactory | None,
             arch=None, score_kwargs: dict | None = None, merge_only: bool = False) -> EvalResult:
    """Run every schedule on the task's items (this rank's share), then (rank 0) merge, score and
    write summary.json / summary.md. `predictor` may be None when merge_only or nothing is left
    to predict."""
    from himap.tasks import get_task
    from himap.tasks.base import check_images

    task = get_task(cfg.task)
    max_new = cfg.max_new_tokens or task.MAX_NEW_TOKENS
    items, skipped = load_items(cfg, task)
    if not items:
        raise EvalError(f"task {task.NAME!r} has no items for split={cfg.split!r} limit={cfg.limit!r}"
                        + (f" ({skipped} left out for lacking an image file)" if skipped else ""))
    if skipped and cfg.rank == 0:
        print(f"note: --skip-missing left out {skipped} of {skipped + len(items)} items whose image file is "
              f"absent; evaluating {len(items)}", file=sys.stderr)
    names = [s.name for s in schedules]
    if len(set(map(safe_name, names))) != len(names):
        raise EvalError(f"method names must be distinct (as file names): {names}")
    if cfg.overwrite and cfg.world_size > 1:
        raise EvalError("--overwrite with several ranks would race with the other ranks' writes; "
                        "run once without torchrun with --overwrite, or delete the files first")
    directory = run_dir(cfg.out, task.NAME, cfg.split)
    os.makedirs(directory, exist_ok=True)
    result = EvalResult(directory, n_items=len(items), skipped_missing=skipped)
    mine = shard(items, cfg.rank, cfg.world_size)
    for schedule in schedules:
        if not merge_only:
            check_meta(directory, method_meta(cfg, task, schedule, max_new), cfg.overwrite)
            done = set(collect(directory, schedule.name))
            todo = [it for it in mine if it.id not in done]
            if todo:
                check_images(todo, getattr(task, "DATA_HELP", "") + "\n(--skip-missing evaluates the items "
                             "that have their image; --ids FILE picks items)")
                if predictor is None:
                    raise EvalError(f"{len(todo)} item(s) of {schedule.name!r} need predictions but no model was given")
                path = (prediction_path(directory, schedule.name) if cfg.world_size == 1
                        else shard_path(directory, schedule.name, cfg.rank, cfg.world_size))
                desc = f"{task.NAME} {schedule.name}" + (f" [{cfg.rank}/{cfg.world_size}]" if cfg.world_size > 1 else "")
                with predictor(schedule, max_new) as predict:
                    result.predicted[schedule.name] = run_method(
                        todo, predict, path, method=schedule.name, task=task.NAME,
                        batch_size=cfg.batch_size, done=done, progress=cfg.progress, desc=desc)
        if cfg.rank != 0:
            continue
        if cfg.world_size > 1 and not merge_only:
            wait_for_all(directory, schedule.name, items, cfg.merge_timeout_s, cfg.poll_s)
        records = merge(directory, schedule.name, items)
        result.summaries.append(summarize(cfg, task, schedule, items, records, arch, max_new, score_kwargs))
    if cfg.rank == 0:
        result.markdown = markdown_table(result.summaries)
        write_json(os.path.join(directory, "summary.json"), result.summaries)
        with open(os.path.join(directory, "summary.md"), "w", encoding="utf-8") as f:
            f.write(result.markdown)
    return result
