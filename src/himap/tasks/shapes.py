"""The built-in synthetic benchmark "shapes" (himap.builtin.synthetic), in the paper's task shapes.

Splits: `mc` (multiple choice, letter answers, ScienceQA prompt), `pope` (yes/no presence, POPE
prompt, categories `shape` and `colour`), `caption` (one-sentence caption prompt). The test set
(200 items per split) is generated deterministically (seed himap.builtin.synthetic.TEST_SEED) and needs
no download: its images are rendered once into a cache folder (the data folder when given, else
$HIMAP_CACHE/shapes-v{VERSION}-{config hash} or ~/.cache/himap/shapes-v{VERSION}-{config hash}).

Scores (percent): mc accuracy with the lenient letter parser (himap.evaluation.metrics.parse_letter), pope
accuracy / F1 / yes-ratio with LLaVA's parsing, caption exact match and object F1 (the
(colour, shape) pairs named). The primary metric `accuracy` is the mean of the mc and pope
accuracies. Chance: 25% (mc), 50% (pope).
"""

from __future__ import annotations

import os
import re

from himap.builtin import synthetic
from himap.evaluation import metrics
from himap.tasks.base import (
    Item,
    limit_per_group,
    matched,
    parse_splits,
    require_predictions,
)

NAME = "shapes"
VERSION = "1"
METRIC = "accuracy"
DEFAULT_METHOD = "himap"
MAX_NEW_TOKENS = 24
SPLITS = ("mc", "pope", "caption")
DEFAULT_SPLITS = ("mc", "pope", "caption")
NEEDS_DATA = False
"""The test set is generated (and its images cached), so no data folder is needed."""

PER_SPLIT = 200
"""Test items per split."""

DATA_HELP = """shapes: nothing to download. The test set is generated from a fixed seed
(himap.builtin.synthetic) and its PNG images are written once to the data folder when one is given
(--data DIR), else to $HIMAP_CACHE/shapes-v1-<config hash> or ~/.cache/himap/shapes-v1-<config hash>."""


def build_prompt(sample: synthetic.Sample) -> str:
    """The sample's user text (section 5 prompt shapes; built by himap.builtin.synthetic):
    mc: "{question} Options: (A) .. (D) ... Answer with the option's letter from the given choices directly."
    pope: "question: Is there a {colour} {shape} in the image? Please just answer yes or no."
    caption: "Provide a one-sentence caption for the provided image." """
    return sample.prompt


def cache_dir(data_dir: str | None = None) -> str:
    """Where the test images are written."""
    if data_dir:
        return os.path.abspath(data_dir)
    root = os.environ.get("HIMAP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "himap")
    return os.path.join(root, f"shapes-v{VERSION}-{config_key()}")


def config_key() -> str:
    """A short hash of the scene parameters: images rendered under other parameters are never
    reused from the cache (their prompts would no longer match them)."""
    import hashlib

    return hashlib.sha256(repr(synthetic.SyntheticConfig()).encode()).hexdigest()[:10]


def test_samples(split: str, n: int = PER_SPLIT) -> list[synthetic.Sample]:
    """The first n test samples of one split."""
    return [synthetic.make_sample(i, split, synthetic.TEST_SEED) for i in range(n)]


def _image_path(folder: str, sample: synthetic.Sample) -> str:
    path = os.path.join(folder, f"{sample.id}.png")
    if not os.path.isfile(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        sample.image().save(tmp, format="PNG")
        os.replace(tmp, path)  # atomic: parallel ranks may render the same image
    return path


def item_of(sample: synthetic.Sample, folder: str, render: bool = True) -> Item:
    answer = [sample.answer] if sample.kind == "caption" else sample.answer
    meta = {**sample.meta, "objects": [[o.colour, o.shape, list(o.cell)] for o in sample.objects]}
    image = _image_path(folder, sample) if render else os.path.join(folder, f"{sample.id}.png")
    return Item(id=sample.id, image=image, prompt=build_prompt(sample), answer=answer, meta=meta)


def load(data_dir: str | None = None, split: str | None = None, limit: int | None = None,
         render: bool = True) -> list[Item]:
    """Test items of the given splits (comma-separated, or None for mc, pope and caption);
    `limit` keeps that many in total, spread evenly over the splits. Renders missing images,
    unless `render` is False (scoring needs none)."""
    names = parse_splits(split, SPLITS, DEFAULT_SPLITS)
    per = PER_SPLIT if limit is None else min(PER_SPLIT, -(-limit // max(1, len(names))))
    folder = cache_dir(data_dir)
    if render:
        os.makedirs(folder, exist_ok=True)
    groups = [[item_of(s, folder, render) for s in test_samples(name, per)] for name in names]
    return limit_per_group(groups, limit)


EXPORT_FILE = "shapes.jsonl"
"""The file `export` writes (one JSON object per item) next to its `images/` folder."""


def export(dest: str, split: str | None = None, limit: int | None = None) -> str:
    """Write the test items (`load`'s selection: same ids, prompts and images) as local files for
    other harnesses (lmms-eval reads them with `dataset_path: json`): dest/images/<id>.png and
    dest/shapes.jsonl with one row per item, {"id", "split", "category", "prompt", "answer",
    "options", "image"} (`image` relative to dest; `answer` the gold letter, "yes"/"no" or the
    reference caption). Returns the JSONL path."""
    import json

    items = load(os.path.join(dest, "images"), split=split, limit=limit)
    path = os.path.join(dest, EXPORT_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            answer = it.answer[0] if isinstance(it.answer, list) else it.answer
            row = {"id": it.id, "split": it.meta["split"], "category": it.meta.get("category"),
                   "prompt": it.prompt, "answer": answer, "options": it.meta.get("options", []),
                   "image": os.path.relpath(it.image, dest)}
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


_PAIR = re.compile(r"\b(" + "|".join(synthetic.COLOURS) + r")\s+(" + "|".join(synthetic.SHAPES) + r")\b")


def caption_pairs(text: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, e.g. {("red", "circle")}."""
    return set(_PAIR.findall(text.lower()))


def object_f1(prediction: str, reference: str) -> float:
    """F1 (percent) between the (colour, shape) pairs of a predicted and a reference caption."""
    pred, gold = caption_pairs(prediction), caption_pairs(reference)
    if not pred and not gold:
        return 100.0
    tp = len(pred & gold)
    if tp == 0:
        return 0.0
    p, r = tp / len(pred), tp / len(gold)
    return 100.0 * 2 * p * r / (p + r)


def _normalise(text: str) -> str:
    return " ".join(text.lower().replace(" .", ".").replace(" ,", ",").split())


ANSWER_FORM = "an option letter (mc), a yes/no answer (pope) or a caption naming a coloured shape"


def looks_like_answer(item: Item, text: str) -> bool:
    """Whether `text` reads as an answer to the item's split; `himap score` refuses a file where
    none does."""
    split = item.meta["split"]
    if split == "mc":
        return metrics.parse_letter(text, len(item.meta["options"])) is not None
    if split == "pope":
        return metrics.says_yes_or_no(text)
    return bool(caption_pairs(text))


def score(items: list[Item], predictions: dict[str, str], **_) -> dict:
    """Per-split scores (percent) and `accuracy` = mean of the mc and pope accuracies scored."""
    have = require_predictions(items, predictions, NAME)
    _, missing = matched(items, predictions)
    out: dict = {"n": len(have), "missing": len(missing), "splits": {}}
    mc = [it for it in have if it.meta["split"] == "mc"]
    if mc:
        correct = [metrics.parse_letter(predictions[it.id], len(it.meta["options"])) == it.answer for it in mc]
        by_cat = {c: metrics.accuracy([ok for it, ok in zip(mc, correct) if it.meta["category"] == c])
                  for c in sorted({it.meta["category"] for it in mc})}
        out["splits"]["mc"] = {"accuracy": metrics.accuracy(correct), "n": len(mc), "categories": by_cat}
    pope = [it for it in have if it.meta["split"] == "pope"]
    if pope:
        parsed = [metrics.parse_yes_no(predictions[it.id]) for it in pope]
        res = metrics.binary_metrics(parsed, [it.answer for it in pope])
        res["categories"] = {c: metrics.accuracy([p == it.answer for it, p in zip(pope, parsed)
                                                  if it.meta["category"] == c])
                             for c in sorted({it.meta["category"] for it in pope})}
        out["splits"]["pope"] = res
    caps = [it for it in have if it.meta["split"] == "caption"]
    if caps:
        exact = [_normalise(predictions[it.id]) == _normalise(it.answer[0]) for it in caps]
        f1 = [object_f1(predictions[it.id], it.answer[0]) for it in caps]
        out["splits"]["caption"] = {"exact_match": metrics.accuracy(exact), "object_f1": metrics.mean(f1),
                                    "n": len(caps)}
    accs = [out["splits"][s]["accuracy"] for s in ("mc", "pope") if s in out["splits"]]
    out["accuracy"] = metrics.mean(accs)
    out["n_metric"] = len(mc) + len(pope)  # the items `accuracy` covers (captions have their own scores)
    out.update({f"{s}_accuracy": out["splits"][s]["accuracy"] for s in ("mc", "pope") if s in out["splits"]})
    if "caption" in out["splits"]:
        out["caption_object_f1"] = out["splits"]["caption"]["object_f1"]
    return out
