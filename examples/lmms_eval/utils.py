"""Functions of the himap_shapes_* lmms-eval tasks: the built-in synthetic benchmark (himap's
`shapes` task), read from the files `python -m himap.integrations.lmms_eval export-shapes DIR/data`
writes next to these YAMLs, scored with himap's own parsers so the accuracies equal
`himap eval --task shapes` on the same items."""

import os

from PIL import Image

from himap.evaluation.metrics import parse_letter, parse_yes_no

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
LETTERS = "ABCD"


def mc_docs(dataset):
    return dataset.filter(lambda doc: doc["split"] == "mc")


def pope_docs(dataset):
    return dataset.filter(lambda doc: doc["split"] == "pope")


def doc_to_visual(doc):
    with Image.open(os.path.join(DATA_DIR, doc["image"])) as image:
        return [image.convert("RGB")]


def doc_to_text(doc):
    return doc["prompt"]


def mc_results(doc, results):
    """Percent accuracy of one answer with himap's lenient letter parser (himap.tasks.shapes)."""
    return {"accuracy": 100.0 * (parse_letter(results[0], len(doc["options"])) == doc["answer"])}


def pope_results(doc, results):
    """Percent accuracy of one yes/no answer with LLaVA's POPE parsing (himap.tasks.shapes)."""
    return {"accuracy": 100.0 * (parse_yes_no(results[0]) == doc["answer"])}


def mc_choices(doc):
    return list(LETTERS[:len(doc["options"])])


def mc_target(doc):
    return LETTERS.index(doc["answer"])
