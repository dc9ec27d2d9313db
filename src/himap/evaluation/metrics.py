"""Answer parsing and metrics shared by the benchmark tasks (paper section 5).

The parsers reproduce the behaviour of the scorers LLaVA publishes with its answer files, so
numbers computed here sit next to published ones:

- POPE (LLaVA's eval_pope): keep the text before the first '.', drop commas, split on single
  spaces; the answer is "no" when one of the words is exactly "No", "not" or "no", else "yes".
  So "No, there is not." -> no, "There is no dog" -> no, "Yes" -> yes, but "NO" -> yes,
  "Nope" -> yes and "no\\nbecause" -> yes (one word "no\\nbecause"); an empty answer is "yes".
- ScienceQA (LLaVA's eval_science_qa): newlines become ". ", then, in order,
  (1) the stripped text is exactly one of the letters A-E;
  (2) the text (not stripped) is at least 3 characters, starts with a letter A-E followed by ". ";
  (3) the text contains "The answer is " and then "The answer is X." or "The answer is X"
      (X in A-E; the second form also matches "The answer is Apple" -> "A");
  otherwise the answer counts as wrong ("FAILED"). A letter beyond the question's number of
  options also counts as wrong. "A." alone, "(A)", "A)" and " A. cat" are wrong under this rule.

All percentages are in 0-100, as in the paper's tables.
"""

from __future__ import annotations

import math
import re

LETTERS = "ABCDE"

# --- yes / no (POPE) ---------------------------------------------------------------------------


def parse_yes_no(text: str) -> str:
    """'yes' or 'no' from a free-form answer, as LLaVA's POPE scorer reads it (see module doc)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


_YES_NO = re.compile(r"\b(?:yes|no|not)\b", re.IGNORECASE)


def says_yes_or_no(text: str) -> bool:
    """Whether an answer holds a yes/no word at all (parse_yes_no reads anything else as yes):
    tells a POPE answer from an answer to another task."""
    return bool(_YES_NO.search(text))


def binary_metrics(predictions: list[str], labels: list[str]) -> dict:
    """POPE metrics over parallel lists of "yes"/"no": accuracy, precision, recall and F1 of the
    "yes" class, and the ratio of "yes" answers, all in percent, plus the confusion counts.
    An undefined ratio (no positive predictions or labels) is reported as 0.0."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    for value in list(predictions) + list(labels):
        if value not in ("yes", "no"):
            raise ValueError(f"expected 'yes' or 'no', got {value!r}")
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / n if n else 0.0,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / n if n else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n,
    }


# --- option letters (ScienceQA, A-OKVQA) -------------------------------------------------------

_ANSWER_IS_DOT = re.compile(r"The answer is ([A-E])\.")
_ANSWER_IS = re.compile(r"The answer is ([A-E])")


def parse_letter_llava(text: str, n_options: int = 5) -> str | None:
    """The option letter LLaVA's ScienceQA scorer reads from `text`, or None when it counts the
    answer as wrong (see the module docstring for the exact rule)."""
    pred = text.replace("\n", ". ")
    letter = None
    if pred.strip() in tuple(LETTERS):  # exactly one letter (list membership, as LLaVA's)
        letter = pred.strip()
    elif len(pred) >= 3 and pred[0] in LETTERS and pred[1:3] == ". ":
        letter = pred[0]
    elif "The answer is " in pred:
        m = _ANSWER_IS_DOT.search(pred) or _ANSWER_IS.search(pred)
        letter = m.group(1) if m else None
    if letter is None or letter not in LETTERS[:n_options]:
        return None
    return letter


_LEADING = re.compile(r"^\s*[\(\[]?([A-E])(?:[\)\]\.:,]|\s*$)")
_ANSWER_PHRASE = re.compile(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*[\(\[]?([A-E])\b(?![\w'])",
                            re.IGNORECASE)


def parse_letter(text: str, n_options: int = 5) -> str | None:
    """A lenient option-letter parser: LLaVA's rule first, then a leading letter in any common
    dress ("A", "(A)", "A)", "A:", "[A] cat"; not "A cat", an article) or a phrase
    ("Answer: B", "the correct option is (C)"). None when no letter within the first `n_options` is found."""
    letter = parse_letter_llava(text, n_options)
    if letter is not None:
        return letter
    for pattern in (_LEADING, _ANSWER_PHRASE):
        m = pattern.search(text)
        if m and m.group(1).upper() in LETTERS[:n_options]:
            return m.group(1).upper()
    return None


def letter_of(index: int) -> str:
    """0 -> 'A'."""
    if not 0 <= index < len(LETTERS):
        raise ValueError(f"option index {index} out of range 0..{len(LETTERS) - 1}")
    return LETTERS[index]


def accuracy(correct: list[bool]) -> float:
    """Percentage of True values (0.0 for an empty list)."""
    return 100.0 * sum(bool(c) for c in correct) / len(correct) if correct else 0.0


def mean(values: list[float]) -> float:
    """Arithmetic mean; NaN for an empty list (callers report it as missing)."""
    return sum(values) / len(values) if values else math.nan


def letter_scores(items: list, predictions: dict[str, str]) -> dict:
    """Multiple-choice accuracy (percent) of `items` (each with .answer a letter and
    .meta["n_options"]) under LLaVA's strict letter rule and under the lenient parser, with the
    number of answers each could not read."""
    out = {}
    for rule, parse in (("llava", parse_letter_llava), ("lenient", parse_letter)):
        letters = [parse(predictions[it.id], it.meta["n_options"]) for it in items]
        out[rule] = accuracy([p == it.answer for p, it in zip(letters, items)])
        out[f"unparsed_{rule}"] = sum(p is None for p in letters)
    return out
