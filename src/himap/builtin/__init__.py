"""The built-in model: a small LLaVA trained by `himap train-default` on the synthetic benchmark.

It ships inside the package (himap/builtin/model: safetensors weights, tokenizer, processor,
chat template and a model card) so that everything runs offline; `himap.models.loading.load_model("builtin")`
loads it through AutoModelForImageTextToText / AutoProcessor like any llava-hf checkpoint.
"""

from __future__ import annotations

import os

SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
                 "training_info.json")
"""Files copied from a training checkpoint into the package (the model card is written)."""

MAX_BYTES = 25 * 1024 * 1024
"""Size limit of the shipped checkpoint."""


def model_dir() -> str:
    """Absolute path of the shipped checkpoint directory (raises if it is missing)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(
            f"the built-in model is missing from {path}; train it with "
            "`himap train-default --install` (about an hour on 2 CPU cores)"
        )
    return path


def install(checkpoint: str, card: str | None = None, dest: str | None = None) -> str:
    """Copy a training checkpoint (OUT/best of `himap train-default`) into the package (or
    `dest`) and write its model card (README.md, from training_info.json unless `card` is given)."""
    import json
    import shutil

    dest = dest or os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
    missing = [f for f in SHIPPED_FILES if not os.path.isfile(os.path.join(checkpoint, f))]
    if missing:
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint: missing {missing}")
    size = sum(os.path.getsize(os.path.join(checkpoint, f)) for f in SHIPPED_FILES)
    if size > MAX_BYTES:
        raise ValueError(f"checkpoint is {size / 2**20:.1f} MiB; the package allows {MAX_BYTES / 2**20:.0f} MiB")
    os.makedirs(dest, exist_ok=True)
    for f in SHIPPED_FILES:
        shutil.copyfile(os.path.join(checkpoint, f), os.path.join(dest, f))
    if card is None:
        with open(os.path.join(checkpoint, "training_info.json")) as fh:
            card = model_card(json.load(fh))
    with open(os.path.join(dest, "README.md"), "w") as fh:
        fh.write(card)
    return dest


def _flags(argv: list[str]) -> list[str]:
    """The training flags of a recorded command line (without the subcommand and --quiet)."""
    return [a for i, a in enumerate(argv) if not (i == 0 and a == "train-default") and a != "--quiet"]


def _scene(data: dict) -> str:
    """'1 small coloured shape (red, green, blue or yellow; circle, square, triangle or cross)'."""
    from himap.builtin import synthetic

    lo, hi = data.get("min_objects", 1), data.get("max_objects", 1)
    count = f"{lo}" if lo == hi else f"{lo}-{hi}"
    colours = data.get("colours") or list(synthetic.COLOURS)
    return (f"{count} small coloured shape{'s' if hi > 1 else ''} ({', '.join(colours[:-1])} or {colours[-1]}; "
            f"{', '.join(synthetic.SHAPES[:-1])} or {synthetic.SHAPES[-1]})")


def _aids(cfg: dict) -> str:
    """The training aids a run used, in words (older runs lack some fields)."""
    aids = []
    if cfg.get("copies_start", 1) > 1:
        aids.append(f"object copies fading {cfg['copies_start']} -> 1 over {cfg.get('copies_until', 0):.0%} of the steps")
    if cfg.get("aux_weight"):
        aids.append(f"patch classifier (weight {cfg['aux_weight']})")
    if cfg.get("query_aux_weight"):
        aids.append(f"answer-position probe of the POPE query and image values (weight {cfg['query_aux_weight']})")
    if cfg.get("pope_pairs"):
        aids.append("flipped POPE twins in each batch")
    if cfg.get("pope_blank"):
        aids.append(f"{cfg['pope_blank']:.0%} blank POPE images")
    if cfg.get("pope_unseen"):
        aids.append(f"{cfg['pope_unseen']:.0%} never-drawn POPE negatives")
    return "; ".join(aids) or "none"


def model_card(info: dict, extra: str = "") -> str:
    """Markdown model card from a checkpoint's training_info.json."""
    import shlex

    cfg, m = info["config"], info["config"]["model"]
    valid = ", ".join(f"{k} {100 * v:.1f}%" for k, v in info.get("valid", {}).items())
    return f"""# himap built-in model

A small LLaVA-architecture model (`LlavaForConditionalGeneration`: CLIP vision tower, 2-layer MLP
projector, Llama decoder) trained from scratch by `himap train-default` on the synthetic "shapes"
benchmark (`himap.builtin.synthetic`). It exists so that HiMAP, FastV and the information-flow analysis
can be run offline, without a GPU, on a model that really uses its image. It is not a general
vision-language model: its vocabulary has {len(info.get('vocab', [])) or 'about 120'} words and it has only ever
seen gray canvases with {_scene(info['data_config'])}.

## Architecture ({info['parameters']:,} parameters, fp32 safetensors)
- Vision: CLIP, image {info['data_config']['image_size']} px, patch {info['data_config']['patch_size']} px
  -> {(info['data_config']['image_size'] // info['data_config']['patch_size']) ** 2} image tokens, width
  {m['vision_hidden']}, {m['vision_layers']} layer; features = vision_feature_layer -2 (patch embeddings after
  the pre-layernorm), CLS dropped ("default" strategy).
- Language model: Llama, {m['text_layers']} layers, width {m['text_hidden']}, MLP {m['text_intermediate']},
  {m['text_heads']} query heads / {m['text_kv_heads']} key-value heads, RoPE.
- Processor: offline word-level tokenizer, LLaVA-1.5-style chat template
  (`USER: <image>\\n{{prompt}}\\nASSISTANT:`), CLIP-style PIL image processor (mean = std = 0.5).

## Training
Command: `himap train-default {shlex.join(_flags(info.get('argv', []))) or '(defaults)'}`; seed {cfg['seed']}; {info['step']} steps of
batch {cfg['batch_size']} (AdamW, peak lr {cfg['lr']}, {cfg['warmup_steps']} warm-up steps then cosine), loss on the
answer tokens only, training mix {cfg['mix']}; {cfg['threads']} CPU thread(s), fp32;
training aids (discarded after training; see himap.builtin.train): {_aids(cfg)};
{info['minutes']:.1f} minutes wall time on {info.get('machine', 'a shared 2-core CPU machine')} (torch {info['torch']}).

## Held-out accuracy at this checkpoint
Validation stream (seed 1), greedy exact match: {valid}.
{extra}"""
