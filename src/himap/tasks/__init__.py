"""Benchmark tasks of the paper's section 5 (and the built-in synthetic one), one module each.

    from himap.tasks import get_task
    task = get_task("pope")
    items = task.load("data/pope", split="random", limit=100)
    result = task.score(items, {"10000001": "Yes, there is a snowboard."})

Modules are imported only when asked for, so listing tasks stays cheap.
"""

from __future__ import annotations

import importlib

from himap.tasks.base import DataError, Item

TASKS = {
    "scienceqa_img": "himap.tasks.scienceqa_img",
    "aokvqa_mc": "himap.tasks.aokvqa_mc",
    "pope": "himap.tasks.pope",
    "nocaps": "himap.tasks.nocaps",
    "flickr30k": "himap.tasks.flickr30k",
    "llava_bench": "himap.tasks.llava_bench",
    "mmvet": "himap.tasks.mmvet",
    "shapes": "himap.tasks.shapes",
}

__all__ = ["TASKS", "get_task", "require_data", "load_for_scoring", "answer_form_count", "Item", "DataError",
           "UnknownTask"]


class UnknownTask(DataError, KeyError):
    """No task is registered under that name (a DataError, and a KeyError for lookups)."""


def get_task(name: str):
    """The task module registered under `name` (dashes and case are forgiven)."""
    key = name.strip().lower().replace("-", "_")
    if key not in TASKS:
        raise UnknownTask(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return importlib.import_module(TASKS[key])


def require_data(task, data_dir: str | None, flag: str = "--data") -> None:
    """Raise a DataError naming `flag` when `task` reads files and no data folder was given
    (a task that makes its own data, like shapes, sets NEEDS_DATA = False)."""
    if data_dir is None and getattr(task, "NEEDS_DATA", True):
        raise DataError(f"task {task.NAME!r} needs its data folder ({flag} DIR).\n{getattr(task, 'DATA_HELP', '')}".rstrip())


def load_for_scoring(task, data_dir: str | None, split: str | None = None) -> list[Item]:
    """The task's items for scoring predictions: only question files are read, no image is
    needed (a task that renders its images, like shapes, renders none)."""
    import inspect

    require_data(task, data_dir)
    kwargs = {"render": False} if "render" in inspect.signature(task.load).parameters else {}
    return task.load(data_dir, split=split, **kwargs)


def answer_form_count(task, items: list[Item], predictions: dict[str, str]) -> tuple[int, int] | None:
    """(predictions that read as the task's kind of answer, predictions for its items), or None
    for tasks whose answers are free text (captions, judged answers). A file where none does
    holds another task's answers (task.looks_like_answer, task.ANSWER_FORM)."""
    looks = getattr(task, "looks_like_answer", None)
    if looks is None:
        return None
    have = [it for it in items if it.id in predictions]
    return sum(bool(looks(it, predictions[it.id])) for it in have), len(have)
