"""Flickr30k image captioning (paper section 5 "Image Captioning", appendix E).

The Karpathy split (dataset_flickr30k.json: "images" with filename, split and five "sentences"
with "raw" text); the test split has 1,000 images. Prompt: "Provide a one-sentence caption for
the provided image."; metric: CIDEr (x100) with the COCO tokenization (himap.evaluation.captions).

Item ids are the image file names without extension (Flickr photo ids).
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

NAME = "flickr30k"
VERSION = "1"
METRIC = "cider"
DEFAULT_METHOD = "himap-caption"
MAX_NEW_TOKENS = 64
SPLITS = ("test", "val", "train")
PROMPT = "Provide a one-sentence caption for the provided image."

DATA_HELP = """Flickr30k, Karpathy split:
  DIR/dataset_flickr30k.json: Karpathy's split file (caption_datasets.zip from
      https://cs.stanford.edu/people/karpathy/deepimagesent/), {"images": [{filename, split,
      sentences: [{raw, tokens}, ...]}, ...]};
  DIR/flickr30k-images/<filename>: the Flickr30k photos (https://shannon.cs.illinois.edu/DenotationGraph/,
      on request), or pass image_dir / --image-dir. Scoring needs the JSON only."""


def build_prompt() -> str:
    """Appendix E: "Provide a one-sentence caption for the provided image." """
    return PROMPT


def load(data_dir: str, split: str | None = None, limit: int | None = None,
         image_dir: str | None = None) -> list[Item]:
    """Images of one Karpathy split (default "test"), in file order."""
    names = parse_splits(split, SPLITS, ("test",))
    if len(names) != 1:
        raise DataError(f"Flickr30k loads one split at a time, got {names}")
    path = find_file(data_dir, ["dataset_flickr30k.json"], DATA_HELP)
    data = read_json(path)
    images = (os.path.abspath(image_dir) if image_dir
              else _image_dir(data_dir, ["flickr30k-images", "images"]))
    try:
        items = [Item(id=os.path.splitext(img["filename"])[0],
                      image=os.path.join(images, img["filename"]), prompt=build_prompt(),
                      answer=[s["raw"].strip() for s in img["sentences"]],
                      meta={"split": img["split"], "image_file": img["filename"]})
                 for img in data["images"] if img["split"] == names[0]]
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: not a Karpathy-split file (missing {err})") from err
    if not items:
        raise DataError(f"{path}: no images in split {names[0]!r}")
    return limit_items(items, limit)


def score(items: list[Item], predictions: dict[str, str], tokenizer: str = "auto", **_) -> dict:
    """CIDEr (x100)."""
    return captions.score_items(items, predictions, tokenizer=tokenizer)
