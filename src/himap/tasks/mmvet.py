"""MM-Vet (paper section 5 "Open-ended Question Answering").

218 open questions over six capabilities (rec, ocr, know, gen, spat, math). A judge grades each
answer against the ground truth with MM-Vet's few-shot prompt, giving a correctness score in
0.0-1.0 (ground truths may join alternatives with <OR> or required parts with <AND>). The score
of a capability is the mean correctness of its questions x 100; the primary metric is the mean
over all questions x 100. The grading follows MM-Vet's evaluator (mm-vet_evaluator.py): user
message = prompt + "\\n" + "question | ground truth | prediction | ", temperature 0, 3 tokens;
the reply's first space-separated word must be a number in [0, 1]; otherwise it asks again with
"\\nPredict the correctness of the answer (digit): " appended, at temperatures 0, 0.5, 1.0 and
1.5, and gives 0.0 when all fail.

Item ids are MM-Vet's ("v1_0" ...); LLaVA's answer files (question_id 0 ..) map to them through
canonical_id, and MM-Vet's own results format ({"v1_0": "answer", ...}) is read by `himap score`.
"""

from __future__ import annotations

import os

from himap.evaluation import judge as judge_lib
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

NAME = "mmvet"
VERSION = "1"
METRIC = "judge_score"
DEFAULT_METHOD = "himap-caption"
MAX_NEW_TOKENS = 512
SPLITS = ("test",)
CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")

# MM-Vet's grader prompt (yuweihao/MM-Vet, mm-vet_evaluator.py): benchmark protocol text.
GRADER_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""
RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
RETRY_TEMPERATURES = (0.0, 0.5, 1.0, 1.5)
JUDGE_MAX_TOKENS = 3

DATA_HELP = """MM-Vet (https://github.com/yuweihao/MM-Vet/releases, mm-vet.zip):
  DIR/mm-vet.json: {"v1_0": {imagename, question, answer, capability}, ...} (218 questions);
  DIR/images/v1_0.png ...: the images, or pass image_dir / --image-dir.
  Scoring needs mm-vet.json and a judge (--judge-base-url, --judge-model)."""


def build_prompt(question: str) -> str:
    """The question as written (LLaVA's MM-Vet evaluation adds nothing to it)."""
    return question.strip()


def canonical_id(raw) -> str:
    """LLaVA's answer files number MM-Vet questions 0..217: 0 -> 'v1_0'; 'v1_3' stays."""
    text = str(raw).strip()
    return f"v1_{text}" if text.isdigit() else text


def grader_message(question: str, ground_truth: str, prediction: str, retry: bool = False) -> str:
    """The judge's user message: the few-shot prompt and this sample's table row, left open."""
    gt = ground_truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    text = GRADER_PROMPT + "\n" + " | ".join([question, gt, prediction, ""])
    return text + RETRY_SUFFIX if retry else text


def parse_grade(reply: str) -> float | None:
    """MM-Vet's rule: the first space-separated word of the reply as a number in [0, 1]."""
    try:
        value = float(reply.split(" ")[0].strip())
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None


def grade(judge, item: Item, prediction: str) -> tuple[float, int]:
    """(correctness in [0, 1], judge requests used) following MM-Vet's retry protocol."""
    question = item.meta["question"]
    reply = judge.complete([{"role": "user", "content": grader_message(question, item.answer, prediction)}],
                           temperature=0.0, max_tokens=JUDGE_MAX_TOKENS)
    value, asked = parse_grade(reply), 1
    for temperature in RETRY_TEMPERATURES:
        if value is not None:
            break
        msg = grader_message(question, item.answer, prediction, retry=True)
        reply = judge.complete([{"role": "user", "content": msg}], temperature=temperature,
                               max_tokens=JUDGE_MAX_TOKENS)
        value, asked = parse_grade(reply), asked + 1
    return (0.0 if value is None else value), asked


def load(data_dir: str, split: str | None = None, limit: int | None = None,
         image_dir: str | None = None) -> list[Item]:
    """The 218 questions in file order."""
    parse_splits(split, SPLITS, SPLITS)
    path = find_file(data_dir, ["mm-vet.json", "mm-vet/mm-vet.json"], DATA_HELP)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object keyed by question id")
    images = os.path.abspath(image_dir) if image_dir else _image_dir(data_dir, ["images", "mm-vet/images"])
    try:
        items = [Item(id=qid, image=os.path.join(images, row["imagename"]),
                      prompt=build_prompt(row["question"]), answer=row["answer"],
                      meta={"split": "test", "question": row["question"],
                            "capability": list(row["capability"]), "image_file": row["imagename"]})
                 for qid, row in data.items()]
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: question without {err} (expected imagename, question, answer, "
                        "capability)") from err
    return limit_items(items, limit)


def score(items: list[Item], predictions: dict[str, str], **kw) -> dict:
    """Mean correctness x 100 overall (judge_score), per capability and per capability
    combination; needs a judge (judge=Judge or judge_base_url / judge_model / ...)."""
    from tqdm import tqdm

    have = require_predictions(items, predictions, NAME)
    judge = judge_lib.require(kw, NAME)
    _, missing = matched(items, predictions)
    grades, unparsed = {}, 0
    for it in tqdm(have, desc="mmvet judge", leave=False, disable=kw.get("quiet", False)):
        value, asked = grade(judge, it, predictions[it.id])
        grades[it.id] = value
        unparsed += asked > 1
    caps: dict[str, list[float]] = {}
    combos: dict[str, list[float]] = {}
    for it in have:
        for c in set(it.meta["capability"]):
            caps.setdefault(c, []).append(grades[it.id])
        combos.setdefault("_".join(sorted(set(it.meta["capability"]))), []).append(grades[it.id])
    return {"judge_score": 100.0 * sum(grades.values()) / len(grades),
            "capabilities": {c: 100.0 * sum(v) / len(v) for c, v in sorted(caps.items())},
            "integrations": {c: 100.0 * sum(v) / len(v) for c, v in sorted(combos.items())},
            "judge_retried": unparsed, "judge_model": judge.config.model,
            "n": len(have), "missing": len(missing)}
