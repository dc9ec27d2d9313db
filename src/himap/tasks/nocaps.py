"""NoCaps image captioning (paper section 5 "Image Captioning", appendix E).

Open Images validation photos with ten human captions each, in COCO caption format
(nocaps_val_4500_captions.json: "images" with id, file_name, domain; "annotations" with image_id
and caption). Prompt: "Provide a one-sentence caption for the provided image."; metric: CIDEr
(x100) with the COCO tokenization (himap.evaluation.captions), overall and per domain (in-domain,
near-domain, out-domain, each scored as its own corpus).

Item ids are the annotation file's image ids.
"""

from __future__ import annotations

import os

from himap.evaluation import captions
from himap.tasks.base import (
    DataError,
    Item,
    find_file,
    limit_items,
    parse_splits,
    read_json,
)
from himap.tasks.base import image_dir as _image_dir

NAME = "nocaps"
VERSION = "1"
METRIC = "cider"
DEFAULT_METHOD = "himap-caption"
MAX_NEW_TOKENS = 64
SPLITS = ("val",)
PROMPT = "Provide a one-sentence caption for the provided image."

DATA_HELP = """NoCaps (https://nocaps.org/download):
  DIR/nocaps_val_4500_captions.json (also found under DIR/annotations/): COCO-style captions
      {"images": [{id, file_name, domain, ...}], "annotations": [{image_id, caption}, ...]};
  DIR/images/<file_name>: the Open Images validation photos the file names (the download's
      image URLs), or pass image_dir / --image-dir. Scoring needs the JSON only."""


def build_prompt() -> str:
    """Appendix E: "Provide a one-sentence caption for the provided image." """
    return PROMPT


def items_from_coco(data: dict, images: str, split: str, path: str) -> list[Item]:
    """Items from a COCO-style caption file: one per image, answer = its reference captions."""
    try:
        refs: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            refs.setdefault(ann["image_id"], []).append(ann["caption"])
        items = [Item(id=str(img["id"]), image=os.path.join(images, img["file_name"]),
                      prompt=build_prompt(), answer=refs.get(img["id"], []),
                      meta={"split": split, "domain": img.get("domain"),
                            "image_file": img["file_name"]})
                 for img in data["images"]]
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: not a COCO-style caption file (missing {err})") from err
    empty = [it.id for it in items if not it.answer]
    if empty:
        raise DataError(f"{path}: {len(empty)} images have no reference caption (e.g. {empty[:3]})")
    return items


def load(data_dir: str, split: str | None = None, limit: int | None = None,
         image_dir: str | None = None) -> list[Item]:
    """The validation images (4,500 in the published file), in file order."""
    parse_splits(split, SPLITS, SPLITS)
    path = find_file(data_dir, ["nocaps_val_4500_captions.json",
                                "annotations/nocaps_val_4500_captions.json"], DATA_HELP)
    images = os.path.abspath(image_dir) if image_dir else _image_dir(data_dir, ["images", "val"])
    return limit_items(items_from_coco(read_json(path), images, "val", path), limit)


def score(items: list[Item], predictions: dict[str, str], tokenizer: str = "auto", **_) -> dict:
    """CIDEr (x100) overall and per domain under "groups"."""
    return captions.score_items(items, predictions, tokenizer=tokenizer, group_key="domain")
