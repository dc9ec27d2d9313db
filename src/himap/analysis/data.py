"""Inputs and result files of the analysis commands.

Samples come from a benchmark task's loader (himap.tasks.get_task(name).load) or from a JSONL
file of {"id"?, "image", "question", "answer"} rows (image paths relative to the file). The
analyses look at one forward of the prompt, so "correct" means: the model's top-1 token at the
last prompt position is the answer's first token, compared after normalising case and leading
spaces ("Yes", " yes" and "▁yes" match "yes"; see answer_tokens).

Results are appended to a per-sample JSONL as they are produced; a rerun reads it back, skips
the samples already done and tolerates a line torn by a crash.
"""

from __future__ import annotations

import json
import os
import zlib


def read_jsonl_items(path: str) -> list:
    """Items from a JSONL of {"id"?, "image", "question", "answer"}; ids default to the line
    number (1-based), image paths are resolved relative to the file's folder."""
    from himap.tasks.base import DataError, Item, read_jsonl

    if not os.path.isfile(path):
        raise DataError(f"samples file {path!r} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    items, seen = [], set()
    for n, row in enumerate(read_jsonl(path), 1):
        missing = [k for k in ("question", "answer") if k not in row] if isinstance(row, dict) else None
        if missing or not isinstance(row, dict):
            raise DataError(f"{path}: row {n} lacks {missing or 'an object'}; rows are "
                            '{"id"?, "image", "question", "answer"}')
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise DataError(f"{path}: row {n} has an empty question")
        item_id = str(row.get("id", n))
        if item_id in seen:
            raise DataError(f"{path}: duplicate id {item_id!r} (row {n})")
        seen.add(item_id)
        image = row.get("image")
        image = None if image in (None, "") else os.path.normpath(os.path.join(base, image))
        items.append(Item(id=item_id, image=image, prompt=str(row["question"]), answer=row["answer"],
                          meta={"source": os.path.basename(path)}))
    return items


def load_items(task: str | None = None, data_dir: str | None = None, split: str | None = None,
               jsonl: str | None = None, limit: int | None = None, ids_file: str | None = None) -> list:
    """The samples to analyse: a task's items or a JSONL's, restricted to the ids in `ids_file`
    (when given) and then to the first `limit`."""
    from himap.tasks.base import read_ids, select_ids

    if (task is None) == (jsonl is None):
        raise ValueError("give exactly one of a task (--task) or a samples file (--jsonl)")
    if task is not None:
        from himap.tasks import get_task, require_data

        module = get_task(task)
        require_data(module, data_dir, "--data-dir")
        items = module.load(data_dir, split=split, limit=None if ids_file else limit)
    else:
        items = read_jsonl_items(jsonl)
    if ids_file:
        items = select_ids(items, read_ids(ids_file), ids_file)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        items = items[:limit]
    return items


def _norm(text: str) -> str:
    return text.replace("\u2581", " ").replace("\u0120", " ").strip().lower()


def answer_tokens(tokenizer, answer) -> tuple[int, list[int]]:
    """(target id, accepted ids) for a short text answer.

    The target is the first token of the answer tokenized alone (no special tokens): the loss
    target of saliency. Accepted ids are the first tokens of the answer's first word written
    lower-case, capitalised or upper-case, with or without a leading space, whose text equals the
    target's text up to case and spaces; a prediction among them counts as correct.
    """
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"first-token analysis needs a short text answer (a letter, yes/no, a word), "
                         f"got {answer!r}")
    ids = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {answer!r} tokenizes to nothing")
    target = int(ids[0])
    want = _norm(tokenizer.decode([target]))
    word = answer.strip().split()[0]
    accepted = {target}
    for form in {word, word.lower(), word.capitalize(), word.upper()}:
        for text in (form, " " + form):
            cand = tokenizer(text, add_special_tokens=False)["input_ids"]
            if cand and want and _norm(tokenizer.decode([cand[0]])) == want:
                accepted.add(int(cand[0]))
    return target, sorted(accepted)


def answer_piece_id(tokenizer, answer) -> int:
    """The official code's saliency target: `tokenizer.convert_tokens_to_ids(answer)`, the
    vocabulary piece spelled exactly like the answer. With LLaVA-1.5's tokenizer the answer "A"
    is the piece "A" (id 29909), whereas tokenizing the answer gives "▁A" (id 319), the token
    the model predicts after "ASSISTANT:". Raises when the answer is not one piece of the
    vocabulary (the official code would silently target the unknown token)."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer:
        raise ValueError(f"the answer-piece target needs a text answer, got {answer!r}")
    piece = tokenizer.convert_tokens_to_ids(answer)
    unk = tokenizer.unk_token_id
    if piece is None or (piece == unk and answer != tokenizer.unk_token):
        raise ValueError(f"answer {answer!r} is not a single piece of the tokenizer's vocabulary; the official "
                         "target (convert_tokens_to_ids) needs one: use --target answer")
    return int(piece)


def sample_seed(seed: int, item_id: str) -> int:
    """A per-sample seed that depends only on the run seed and the sample id (stable across
    batch sizes, resumes and item orders)."""
    return (int(seed) * 1_000_003 + zlib.crc32(str(item_id).encode())) % (2**31 - 1)


def build_batch(processor, items: list, device="cpu", dtype=None, prompt_format: str = "hf") -> dict:
    """Model inputs (left-padded, in `prompt_format`, pixel values in `dtype`) for items with
    images, via himap.models.loading.build_inputs."""
    from himap.models.loading import build_inputs, load_image

    images = [load_image(it.image) for it in items]
    return build_inputs(processor, images, [it.prompt for it in items], device=device, dtype=dtype,
                        prompt_format=prompt_format)


def drop_image_tokens(inputs: dict, image_token_id, pad_token_id: int = 0) -> dict:
    """The same prompts without the image: visual-token positions (`image_token_id`: one id or
    every visual id) removed from the sequence
    (the text around them, including the separator after the image, is kept), left-padded
    again; pixel inputs dropped. Returns {input_ids, attention_mask}."""
    import torch

    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    from himap.prune.tokens import visual_mask

    keep = mask.bool() & ~visual_mask(ids, image_token_id)  # [B, T]
    rows = [ids[b][keep[b]] for b in range(ids.shape[0])]
    width = max(1, max(len(r) for r in rows))
    out_ids = torch.full((len(rows), width), pad_token_id, dtype=ids.dtype, device=ids.device)
    out_mask = torch.zeros((len(rows), width), dtype=mask.dtype, device=ids.device)
    for b, r in enumerate(rows):
        if len(r):
            out_ids[b, width - len(r):] = r
            out_mask[b, width - len(r):] = 1
    return {"input_ids": out_ids, "attention_mask": out_mask}


def blank_image(inputs: dict) -> dict:
    """The same prompts with a blank image: pixel values all zero, i.e. an image of the image
    processor's mean colour (token layout unchanged)."""
    pixels = [k for k in ("pixel_values", "pixel_values_videos") if k in inputs]
    if not pixels:
        raise ValueError("inputs have no pixel_values to blank")
    return {**inputs, **{k: inputs[k].new_zeros(inputs[k].shape) for k in pixels}}


class ResultFile:
    """A per-sample JSONL written as results arrive; reading tolerates a torn last line."""

    def __init__(self, path: str):
        self.path = path
        self.records: dict[str, dict] = {}
        if os.path.exists(path):
            self._load()

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        good, torn = [], False
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines) - 1 or all(not l.strip() for l in lines[n + 1:]):
                    torn = True  # a crash in the middle of the last write
                    continue
                raise ValueError(f"{self.path}:{n + 1}: not valid JSON (and not the last line)") from None
            good.append(line)
            self.records[str(rec["id"])] = rec
        if torn:
            with open(self.path, "w", encoding="utf-8") as f:
                f.write("".join(l + "\n" for l in good))

    def __contains__(self, item_id: str) -> bool:
        return str(item_id) in self.records

    def append(self, record: dict) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[str(record["id"])] = record


def check_run_settings(out_dir: str, settings: dict, overwrite: bool = False) -> None:
    """Record the run's settings in out_dir/run.json; a rerun with other settings raises (its
    results would mix with the old ones) unless `overwrite` clears the folder's results. Settings
    of a run that wrote no result (it failed before its first sample) protect nothing and are
    replaced."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "run.json")
    if overwrite:
        for name in ("samples.jsonl", "summary.json", "run.json"):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    if os.path.exists(path) and ResultFile(os.path.join(out_dir, "samples.jsonl")).records:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{out_dir} holds a run with other settings ({shown}); "
                             "use another --out or --overwrite")
        return
    write_json(path, settings)


def write_json(path: str, data) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
