"""ScienceQA, image subset (the paper's "Sci-VQA", section 5 multiple-choice QA, appendix E).

LLaVA's test file llava_test_CQM-A.json holds 4,241 questions; the 2,017 with an image are this
task. Each human turn already reads "Context: ...\\n{question}\\nA. ...\\nB. ...", i.e. the paper's
"{question} Options: {options}" with LLaVA's layout, so the prompt appends the instruction on a
new line exactly as the official HiMAP / LLaVA evaluation does. Answers are parsed with LLaVA's
ScienceQA rule (himap.evaluation.metrics.parse_letter_llava); unparsable answers count as wrong. A lenient
parse (himap.evaluation.metrics.parse_letter) is reported beside it as accuracy_lenient.

Item ids are the file's ids ("5", ...), the question_id of LLaVA's published answer files.
"""

from __future__ import annotations

import os
import re

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

NAME = "scienceqa_img"
VERSION = "1"
METRIC = "accuracy"
DEFAULT_METHOD = "himap"
MAX_NEW_TOKENS = 16
SPLITS = ("test",)
INSTRUCTION = "Answer with the option's letter from the given choices directly."

DATA_HELP = """ScienceQA (image subset of LLaVA's test file):
  DIR/llava_test_CQM-A.json (also found under DIR/scienceqa/): LLaVA's eval file
      (playground/data/eval/scienceqa/llava_test_CQM-A.json in LLaVA's eval data);
  DIR/images/test/<id>/image.png: ScienceQA test images (https://scienceqa.github.io, the
      test.zip of the images folder), or pass image_dir / --image-dir. Scoring needs the JSON only."""

_OPTION = re.compile(r"^([A-E])\. (.*)$")


def build_prompt(question: str) -> str:
    """Appendix E: "{question} Options: {options}. Answer with the option's letter from the given
    choices directly.", where LLaVA's question text already ends with its lettered option lines."""
    return f"{question.strip()}\n{INSTRUCTION}"


def split_options(text: str) -> tuple[str, list[str]]:
    """'...question\\nA. x\\nB. y' -> ('...question', ['x', 'y']): the trailing lettered lines."""
    lines = text.split("\n")
    letters, options = [], []
    while lines and (m := _OPTION.match(lines[-1])):
        letters.insert(0, m.group(1))
        options.insert(0, m.group(2))
        lines.pop()
    if not options or "".join(letters) != metrics.LETTERS[: len(options)]:
        raise DataError(f"no options lettered A, B, ... at the end of question text {text[-80:]!r}")
    return "\n".join(lines), options


def _item(row: dict, images: str, path: str) -> Item:
    try:
        human, gpt = row["conversations"][0]["value"], row["conversations"][1]["value"]
    except (KeyError, IndexError, TypeError) as err:
        raise DataError(f"{path}: item {row.get('id')} lacks the two conversation turns") from err
    question = human.replace("<image>", "").strip()
    stem, options = split_options(question)
    answer = gpt.strip()
    if answer not in metrics.LETTERS[: len(options)]:
        raise DataError(f"{path}: item {row['id']} answer {answer!r} is not one of its "
                        f"{len(options)} option letters")
    return Item(id=str(row["id"]), image=os.path.join(images, row["image"]),
                prompt=build_prompt(question), answer=answer,
                meta={"split": "test", "question": stem, "options": options,
                      "n_options": len(options), "image_file": row["image"]})


def load(data_dir: str, split: str | None = None, limit: int | None = None,
         image_dir: str | None = None) -> list[Item]:
    """The questions with an image, in file order (2,017 in LLaVA's test file)."""
    parse_splits(split, SPLITS, SPLITS)
    path = find_file(data_dir, ["llava_test_CQM-A.json", "scienceqa/llava_test_CQM-A.json"], DATA_HELP)
    rows = read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of LLaVA conversation items")
    images = os.path.abspath(image_dir) if image_dir else _image_dir(data_dir, ["images/test", "test"])
    return limit_items([_item(r, images, path) for r in rows if r.get("image")], limit)


ANSWER_FORM = "an option letter"


def looks_like_answer(item: Item, text: str) -> bool:
    """Whether `text` reads as an answer to this task (an option letter, lenient parser);
    `himap score` refuses a file where none does (another task's answers)."""
    return metrics.parse_letter(text, item.meta["n_options"]) is not None


def score(items: list[Item], predictions: dict[str, str], **_) -> dict:
    """Accuracy (percent) with LLaVA's letter parsing; accuracy_lenient with the lenient one;
    unparsed: answers LLaVA's rule could not read."""
    have = require_predictions(items, predictions, NAME)
    _, missing = matched(items, predictions)
    scores = metrics.letter_scores(have, predictions)
    return {
        "accuracy": scores["llava"],
        "accuracy_lenient": scores["lenient"],
        "unparsed": scores["unparsed_llava"],
        "n": len(have),
        "missing": len(missing),
    }
