"""POPE object-hallucination benchmark (paper section 5 "Object Hallucination", appendix E).

Yes/no questions "Is there a <object> in the image?" over COCO val2014 images, in three splits
that sample the absent objects at random, by popularity, or adversarially (co-occurring). Scored
with LLaVA's answer parsing (himap.evaluation.metrics.parse_yes_no): accuracy, precision, recall, F1 and
yes-ratio per split. The primary metric is the mean accuracy over the splits scored.

Item ids are LLaVA's question ids from llava_pope_test.jsonl (adversarial: 1..3000, random:
10000001..10002910, popular: 20000001..20003000), so LLaVA's published answer files score as-is.
"""

from __future__ import annotations

import os

from himap.evaluation import metrics
from himap.tasks.base import (
    DataError,
    Item,
    find_file,
    limit_per_group,
    matched,
    parse_splits,
    read_json_or_jsonl,
    require_predictions,
)
from himap.tasks.base import image_dir as _image_dir

NAME = "pope"
VERSION = "1"
METRIC = "accuracy"
DEFAULT_METHOD = "himap"
MAX_NEW_TOKENS = 16
SPLITS = ("random", "popular", "adversarial")
PROMPT = "question: {question} Please just answer yes or no."
# Offsets LLaVA's llava_pope_test.jsonl adds to each split's own question_id.
ID_OFFSET = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}

DATA_HELP = """POPE data (the 2023-08 COCO version LLaVA evaluates on):
  DIR/coco_pope_random.json, coco_pope_popular.json, coco_pope_adversarial.json
      (JSON lines {question_id, image, text, label}; also found under DIR/coco/), from
      https://github.com/AoiDragon/POPE (output/coco) or LLaVA's eval data
      (playground/data/eval/pope/coco);
  DIR/val2014/COCO_val2014_*.jpg: COCO 2014 val images (http://images.cocodataset.org/zips/val2014.zip),
      or pass image_dir / --image-dir. Scoring needs the question files only."""


def build_prompt(question: str) -> str:
    """Appendix E: "question: {question} Please just answer yes or no." """
    return PROMPT.format(question=question.strip())


def _load_split(data_dir: str, split: str, images: str) -> list[Item]:
    path = find_file(data_dir, [f"coco_pope_{split}.json", f"coco/coco_pope_{split}.json"], DATA_HELP)
    rows = read_json_or_jsonl(path)
    if isinstance(rows, dict):
        rows = [rows]
    items = []
    for row in rows:
        try:
            qid, text, label, image = row["question_id"], row["text"], row["label"], row["image"]
        except (KeyError, TypeError) as err:
            raise DataError(f"{path}: row without {err} (expected question_id, image, text, label)") from err
        label = str(label).strip().lower()
        if label not in ("yes", "no"):
            raise DataError(f"{path}: question {qid} has label {label!r}, expected yes/no")
        items.append(Item(
            id=str(ID_OFFSET[split] + int(qid)),
            image=os.path.join(images, image),
            prompt=build_prompt(text),
            answer=label,
            meta={"split": split, "question": text, "question_id": int(qid), "image_file": image},
        ))
    return items


def load(data_dir: str, split: str | None = None, limit: int | None = None,
         image_dir: str | None = None) -> list[Item]:
    """Items of the given splits ("random", "popular", "adversarial", comma-separated, or None
    for all three). `limit` keeps that many items in total, spread evenly over the splits."""
    splits = parse_splits(split, SPLITS, SPLITS)
    images = os.path.abspath(image_dir) if image_dir else _image_dir(data_dir, ["val2014", "coco/val2014"])
    return limit_per_group([_load_split(data_dir, s, images) for s in splits], limit)


ANSWER_FORM = "a yes/no answer"


def looks_like_answer(item: Item, text: str) -> bool:
    """Whether `text` reads as an answer to this task (a yes/no word); `himap score` refuses a
    file where none does (another task's answers)."""
    return metrics.says_yes_or_no(text)


def score(items: list[Item], predictions: dict[str, str], **_) -> dict:
    """Per-split accuracy, precision, recall, F1 and yes-ratio (percent) with LLaVA's parsing;
    top level: the mean of each over the splits scored, and the pooled accuracy."""
    have = require_predictions(items, predictions, NAME)
    _, missing = matched(items, predictions)
    per_split = {}
    for split in SPLITS:
        rows = [it for it in have if it.meta["split"] == split]
        if rows:
            parsed = [metrics.parse_yes_no(predictions[it.id]) for it in rows]
            per_split[split] = metrics.binary_metrics(parsed, [it.answer for it in rows])
    pooled = metrics.binary_metrics([metrics.parse_yes_no(predictions[it.id]) for it in have],
                                    [it.answer for it in have])
    result = {key: metrics.mean([m[key] for m in per_split.values()])
              for key in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    result.update({"pooled_accuracy": pooled["accuracy"], "n": len(have), "missing": len(missing),
                   "splits": per_split})
    return result
