"""LLaVA-Bench (in the wild) (paper section 5 "Open-ended Question Answering").

60 open questions on 24 images in three categories (conv, detail, complex), each with a
reference answer written by GPT-4 from the image's textual context. The model's answer is
graded by a judge with LLaVA's review protocol: the judge sees the context (image caption), the
question, the reference as "Assistant 1" and the candidate as "Assistant 2", plus the category's
rule, and answers with a first line holding two scores 1-10 "a b". The relative score of a
category is mean(candidate) / mean(reference) * 100; the primary metric is that ratio over all
questions. A review whose first line is not exactly two numbers is a judge failure: LLaVA's
summary averages such failures in as (-1, -1); here they are left out and counted.

Item ids are LLaVA's question ids ("0" .. "59"), as in LLaVA's published answer files.
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
    read_jsonl,
    require_predictions,
)
from himap.tasks.base import image_dir as _image_dir

NAME = "llava_bench"
VERSION = "1"
METRIC = "judge_score"
DEFAULT_METHOD = "himap-caption"
MAX_NEW_TOKENS = 512
SPLITS = ("test",)
CATEGORIES = ("conv", "detail", "complex")

# LLaVA's review protocol (llava/eval/eval_gpt_review_bench.py with table/rule.json, rules
# "llava_bench_conv" / "_detail" / "_complex", which share this text): benchmark protocol text.
SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
ROLE = "Assistant"
RULE = ("We would like to request your feedback on the performance of two AI assistants in "
        "response to the user question displayed above. The user asks the question on observing "
        "an image. For your reference, the visual content in the image is represented with a few "
        "sentences describing the image. \nPlease rate the helpfulness, relevance, accuracy, level "
        "of details of their responses. Each assistant receives an overall score on a scale of 1 "
        "to 10, where a higher score indicates better overall performance.\nPlease first output a "
        "single line containing only two values indicating the scores for Assistant 1 and 2, "
        "respectively. The two scores are separated by a space.\nIn the subsequent line, please "
        "provide a comprehensive explanation of your evaluation, avoiding any potential bias and "
        "ensuring that the order in which the responses were presented does not affect your "
        "judgment.")
JUDGE_TEMPERATURE = 0.2
JUDGE_MAX_TOKENS = 1024

DATA_HELP = """LLaVA-Bench (in the wild) (https://huggingface.co/datasets/liuhaotian/llava-bench-in-the-wild):
  DIR/questions.jsonl, DIR/context.jsonl, DIR/answers_gpt4.jsonl (the reference answers);
  DIR/images/001.jpg ...: the 24 images, or pass image_dir / --image-dir.
  Scoring needs the JSONL files and a judge (--judge-base-url, --judge-model)."""


def build_prompt(question: str) -> str:
    """The question as written (LLaVA's evaluation adds nothing to it)."""
    return question.strip()


def review_content(caption: str | list[str], question: str, reference: str, candidate: str) -> str:
    """The judge's user message, LLaVA's layout: context, question, the two answers, the rule."""
    context = "\n".join(caption) if isinstance(caption, list) else caption
    return (f"[Context]\n{context}\n\n"
            f"[Question]\n{question}\n\n"
            f"[{ROLE} 1]\n{reference}\n\n[End of {ROLE} 1]\n\n"
            f"[{ROLE} 2]\n{candidate}\n\n[End of {ROLE} 2]\n\n"
            f"[System]\n{RULE}\n\n")


def parse_review(review: str) -> tuple[float, float] | None:
    """(reference score, candidate score) from the review's first line, LLaVA's rule: commas
    become spaces, the line split on single spaces must give exactly two numbers."""
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return None


def load(data_dir: str, split: str | None = None, limit: int | None = None,
         image_dir: str | None = None) -> list[Item]:
    """The 60 questions in file order, with reference answers and image captions."""
    parse_splits(split, SPLITS, SPLITS)
    questions = read_jsonl(find_file(data_dir, ["questions.jsonl"], DATA_HELP))
    contexts = read_jsonl(find_file(data_dir, ["context.jsonl"], DATA_HELP))
    answers = read_jsonl(find_file(data_dir, ["answers_gpt4.jsonl"], DATA_HELP))
    caption = {c["image"]: c["caption"] for c in contexts}
    reference = {str(a["question_id"]): a["text"] for a in answers}
    images = os.path.abspath(image_dir) if image_dir else _image_dir(data_dir, ["images"])
    items = []
    for q in questions:
        qid = str(q["question_id"])
        if qid not in reference or q["image"] not in caption:
            raise DataError(f"{data_dir}: question {qid} lacks a reference answer or a context")
        items.append(Item(id=qid, image=os.path.join(images, q["image"]),
                          prompt=build_prompt(q["text"]), answer=reference[qid],
                          meta={"split": "test", "category": q["category"], "question": q["text"],
                                "caption": caption[q["image"]], "image_file": q["image"]}))
    return limit_items(items, limit)


def grade(judge, item: Item, candidate: str) -> tuple[tuple[float, float] | None, str]:
    """(scores or None, review text) for one answer."""
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": review_content(item.meta["caption"], item.meta["question"],
                                                           item.answer, candidate)}]
    review = judge.complete(messages, temperature=JUDGE_TEMPERATURE, max_tokens=JUDGE_MAX_TOKENS)
    return parse_review(review), review


def relative_scores(pairs: list[tuple[str, tuple[float, float]]]) -> dict:
    """{category: mean(candidate) / mean(reference) * 100, ..., "all": ...} from
    (category, (reference, candidate)) pairs; categories without pairs are left out."""
    out = {}
    for cat in list(CATEGORIES) + ["all"]:
        rows = [s for c, s in pairs if cat == "all" or c == cat]
        if rows:
            ref = sum(r for r, _ in rows) / len(rows)
            cand = sum(c for _, c in rows) / len(rows)
            out[cat] = 100.0 * cand / ref if ref else 0.0
    return out


def score(items: list[Item], predictions: dict[str, str], **kw) -> dict:
    """Relative judge score overall (judge_score) and per category; needs a judge (judge=Judge
    or judge_base_url / judge_model / judge_api_key_env / judge_cache)."""
    from tqdm import tqdm

    have = require_predictions(items, predictions, NAME)
    judge = judge_lib.require(kw, NAME)
    _, missing = matched(items, predictions)
    pairs, failures = [], []
    for it in tqdm(have, desc="llava_bench judge", leave=False, disable=kw.get("quiet", False)):
        scores, _ = grade(judge, it, predictions[it.id])
        if scores is None:
            failures.append(it.id)
        else:
            pairs.append((it.meta["category"], scores))
    if not pairs:
        raise judge_lib.JudgeError(f"the judge's reviews could not be parsed for any item "
                                   f"(first line must be two scores); see {judge.config.cache_path}")
    rel = relative_scores(pairs)
    return {"judge_score": rel["all"],
            "categories": {c: rel[c] for c in CATEGORIES if c in rel},
            "reference_mean": sum(s[0] for _, s in pairs) / len(pairs),
            "candidate_mean": sum(s[1] for _, s in pairs) / len(pairs),
            "judge_failures": len(failures), "judge_model": judge.config.model,
            "n": len(have), "n_metric": len(pairs), "missing": len(missing)}
