"""A-OKVQA, multiple-choice setting (paper section 5 multiple-choice QA, appendix E).

Questions on COCO 2017 images needing outside knowledge, each with four choices and
correct_choice_idx (the published aokvqa_v1p0_{split}.json). The prompt is the paper's
appendix-E template with the options written "(A) ... (B) ..."; answers are read with the
lenient letter parser (himap.evaluation.metrics.parse_letter: LLaVA's ScienceQA rule first, then "(A)",
"A)", "Answer: A", ...), since LLaVA publishes no A-OKVQA scorer. The strict LLaVA rule is
reported beside it as accuracy_llava_rule.

Item ids are A-OKVQA's question_id strings.
"""

from __future__ import annotations

import os

from himap.evaluation import metrics
from himap.tasks.base import (
    DataError,
    Item,
    find_file,
    limit_items,
    matched,
    parse_splits,
    read_json,
    require_predictions,
)
from himap.tasks.base import image_dir as _image_dir

NAME = "aokvqa_mc"
VERSION = "1"
METRIC = "accuracy"
DEFAULT_METHOD = "himap"
MAX_NEW_TOKENS = 16
SPLITS = ("val", "test", "train")
PROMPT = ("Analyse the image and choose the best answer for the following question: {question} "
          "Options: {options}. Output the letter of the correct answer.")

DATA_HELP = """A-OKVQA (https://github.com/allenai/aokvqa, "Downloading the dataset"):
  DIR/aokvqa_v1p0_val.json (and _test / _train; also found under DIR/aokvqa/): lists of
      {question_id, image_id, question, choices, correct_choice_idx, ...};
  DIR/val2017/000000xxxxxx.jpg: COCO 2017 images of the split (also DIR/coco/val2017), from
      http://images.cocodataset.org/zips/val2017.zip, or pass image_dir / --image-dir.
  The test split hides correct_choice_idx: it loads for generation but cannot be scored."""


def format_options(choices: list[str]) -> str:
    """['cat', 'dog'] -> '(A) cat (B) dog'."""
    return " ".join(f"({metrics.letter_of(i)}) {c.strip()}" for i, c in enumerate(choices))


def build_prompt(question: str, choices: list[str]) -> str:
    """Appendix E: "Analyse the image and choose the best answer for the following question:
    {question} Options: {options}. Output the letter of the correct answer." """
    return PROMPT.format(question=question.strip(), options=format_options(choices))


def _item(row: dict, split: str, images: str, path: str) -> Item:
    try:
        qid, question, choices, image_id = (row["question_id"], row["question"], row["choices"],
                                            row["image_id"])
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: question without {err} (expected question_id, image_id, "
                        "question, choices)") from err
    if not 2 <= len(choices) <= len(metrics.LETTERS):
        raise DataError(f"{path}: question {qid} has {len(choices)} choices")
    idx = row.get("correct_choice_idx")
    answer = metrics.letter_of(int(idx)) if idx is not None else None
    return Item(id=str(qid), image=os.path.join(images, f"{int(image_id):012d}.jpg"),
                prompt=build_prompt(question, choices), answer=answer,
                meta={"split": split, "question": question, "options": list(choices),
                      "n_options": len(choices), "image_id": int(image_id)})


def load(data_dir: str, split: str | None = None, limit: int | None = None,
         image_dir: str | None = None) -> list[Item]:
    """Items of one split (default "val", the one with public answers)."""
    names = parse_splits(split, SPLITS, ("val",))
    if len(names) != 1:
        raise DataError(f"A-OKVQA loads one split at a time, got {names}")
    name = names[0]
    path = find_file(data_dir, [f"aokvqa_v1p0_{name}.json", f"aokvqa/aokvqa_v1p0_{name}.json"],
                     DATA_HELP)
    rows = read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of questions")
    images = (os.path.abspath(image_dir) if image_dir
              else _image_dir(data_dir, [f"{name}2017", f"coco/{name}2017"]))
    return limit_items([_item(r, name, images, path) for r in rows], limit)


ANSWER_FORM = "an option letter"


def looks_like_answer(item: Item, text: str) -> bool:
    """Whether `text` reads as an answer to this task (an option letter, lenient parser);
    `himap score` refuses a file where none does (another task's answers)."""
    return metrics.parse_letter(text, item.meta["n_options"]) is not None


def score(items: list[Item], predictions: dict[str, str], **_) -> dict:
    """Multiple-choice accuracy (percent)."""
    have = require_predictions(items, predictions, NAME)
    if any(it.answer is None for it in have):
        raise DataError("A-OKVQA items without correct_choice_idx (the test split) cannot be "
                        "scored locally; submit to the A-OKVQA leaderboard or use split val")
    _, missing = matched(items, predictions)
    scores = metrics.letter_scores(have, predictions)
    return {
        "accuracy": scores["lenient"],
        "accuracy_llava_rule": scores["llava"],
        "unparsed": scores["unparsed_lenient"],
        "n": len(have),
        "missing": len(missing),
    }
