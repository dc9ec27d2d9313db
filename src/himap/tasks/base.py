"""Shared pieces of the benchmark tasks (paper section 5, appendix E).

A task is a module (one per benchmark, STYLE habit 6) defining NAME, VERSION, METRIC,
DEFAULT_METHOD, MAX_NEW_TOKENS, DATA_HELP, `load(data_dir, split=None, limit=None)`,
`build_prompt(...)` and `score(items, predictions, **kw)`, and NEEDS_DATA = False when it
generates its items (data_dir may then be None). `score` returns "n" (items with a prediction)
and "missing", and "n_metric" when the primary metric covers fewer items than "n". A task with
a fixed kind of answer defines ANSWER_FORM and `looks_like_answer(item, text)`, with which
`himap score` refuses another task's answer file. This file holds the Item record and
the small helpers the task modules share: reading files with clear errors, finding images,
limiting item lists, and matching predictions to items.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass
class Item:
    """One benchmark question, ready for generation and scoring."""

    id: str  # unique within the task (all splits); the key of predictions
    image: str | None  # absolute path of the image file (may not exist yet), None for text-only
    prompt: str  # the full user text after the image, built by the task's build_prompt
    answer: object  # gold: a letter, "yes"/"no", a list of reference captions, or reference text
    meta: dict = field(default_factory=dict)  # split, category, options, question, ...


class DataError(ValueError):
    """A benchmark file is missing or not in the published format."""


def find_file(data_dir: str, names: list[str], data_help: str) -> str:
    """Return the first of `names` (paths relative to data_dir) that exists, else raise a
    DataError that lists what was looked for and where to get the files."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data folder {data_dir!r} does not exist.\n{data_help}")
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return os.path.abspath(path)
    tried = ", ".join(names)
    raise DataError(f"none of [{tried}] found in {os.path.abspath(data_dir)!r}.\n{data_help}")


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


def read_jsonl(path: str) -> list[dict]:
    """One JSON object per line; blank lines are skipped; a bad line names its number."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err})") from err
    return rows


def read_json_or_jsonl(path: str):
    """A JSON document (list or dict), or JSON lines when the file is not one document."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return read_jsonl(path)


def read_ids(path: str) -> list[str]:
    """Item ids from a JSON list (of ids or {"id": ...} objects), a JSON {"ids": [...]} or a JSONL
    of either (e.g. `himap analyze filter`'s kept_ids.json, or a prediction file)."""
    if not os.path.isfile(path):
        raise DataError(f"ids file {path!r} does not exist")
    data = read_json_or_jsonl(path)
    if isinstance(data, dict) and "ids" in data:
        data = data["ids"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of ids (or JSON lines)")
    ids = []
    for x in data:
        if isinstance(x, dict):
            if "id" not in x:
                raise DataError(f"{path}: entry {x!r} has no 'id'")
            x = x["id"]
        ids.append(str(x))
    return ids


def select_ids(items: list[Item], ids: list[str], source: str) -> list[Item]:
    """The items whose id is in `ids` (in the items' order); raise when none is."""
    wanted = set(ids)
    chosen = [it for it in items if it.id in wanted]
    if wanted and not chosen:
        raise DataError(f"none of the {len(wanted)} ids in {source} is among the {len(items)} items "
                        f"(ids there look like {sorted(wanted)[:3]}; wrong task, split or file?)")
    return chosen


def image_dir(data_dir: str, candidates: list[str]) -> str:
    """The first existing candidate folder under data_dir, else the first candidate (so items
    carry the documented path and eval reports the missing files clearly)."""
    for name in candidates:
        path = os.path.join(data_dir, name)
        if os.path.isdir(path):
            return os.path.abspath(path)
    return os.path.abspath(os.path.join(data_dir, candidates[0]))


def missing_images(items: list[Item]) -> list[Item]:
    """Items whose image file is not on disk (loading questions for scoring never needs them)."""
    return [it for it in items if it.image is not None and not os.path.isfile(it.image)]


def check_images(items: list[Item], data_help: str = "") -> None:
    """Raise a DataError naming the missing image files (first few) and how many are missing."""
    missing = missing_images(items)
    if missing:
        shown = "\n  ".join(it.image for it in missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{len(missing)} of {len(items)} items have no image file:\n  {shown}{more}"
                        + (f"\n{data_help}" if data_help else ""))


def parse_splits(split: str | None, known: tuple[str, ...], default: tuple[str, ...]) -> list[str]:
    """'a,b' -> ['a', 'b']; None -> default; unknown names raise."""
    names = list(default) if split in (None, "", "all") else [s.strip() for s in split.split(",")]
    bad = [s for s in names if s not in known]
    if bad:
        raise DataError(f"unknown split(s) {bad}; choose from {list(known)}")
    return names


def limit_items(items: list[Item], limit: int | None) -> list[Item]:
    """The first `limit` items (all when limit is None)."""
    if limit is None:
        return items
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return items[:limit]


def limit_per_group(groups: list[list[Item]], limit: int | None) -> list[Item]:
    """Concatenate groups (e.g. splits), keeping `limit` items in total spread evenly: each group
    gives its first ceil(limit / n_groups) items, then the list is cut to `limit`, so a small
    limit still covers every group."""
    if limit is None:
        return [it for g in groups for it in g]
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    per = -(-limit // max(1, len(groups)))
    picked = [it for g in groups for it in g[:per]]
    return picked[:limit]


def matched(items: list[Item], predictions: dict[str, str]) -> tuple[list[Item], list[str]]:
    """(items that have a prediction, ids of items without one)."""
    have = [it for it in items if it.id in predictions]
    missing = [it.id for it in items if it.id not in predictions]
    return have, missing


def require_predictions(items: list[Item], predictions: dict[str, str], task: str) -> list[Item]:
    """Items that have a prediction; raise when none has (wrong task or id scheme)."""
    have, _ = matched(items, predictions)
    if not have:
        sample = list(predictions)[:3]
        raise DataError(f"{task}: none of the {len(items)} items has a prediction "
                        f"(prediction ids look like {sample}); wrong task, split or id scheme?")
    return have


def percent(numerator: float, denominator: float) -> float:
    """100 * numerator / denominator, 0.0 when the denominator is 0."""
    return 100.0 * numerator / denominator if denominator else 0.0
