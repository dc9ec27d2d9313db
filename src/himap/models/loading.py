"""Loading models and processors, building chat prompts, batched greedy generation.

The same code path serves llava-hf checkpoints (a hub id or a local directory) and the built-in
model ("builtin"): AutoModelForImageTextToText and AutoProcessor from a directory.
"""

from __future__ import annotations

import os

BUILTIN = "builtin"


def resolve_model_path(path_or_id: str) -> str:
    """The directory or hub id to load; "builtin" is the model shipped inside the package."""
    if path_or_id == BUILTIN:
        from himap.builtin import model_dir

        return str(model_dir())
    return path_or_id


def _dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
    return names[dtype]


def load_model(path_or_id: str, attn_implementation: str = "sdpa", dtype=None, device: str = "cpu"):
    """(model, processor) in eval mode on `device`. dtype: None (fp32 on CPU, the checkpoint's
    on GPU), a torch dtype, or one of fp32 / bf16 / fp16."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_model_path(path_or_id)
    dtype = _dtype(dtype) or (torch.float32 if str(device).startswith("cpu") else "auto")
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn_implementation,
                                                        dtype=dtype)
    model = model.to(device).eval()
    processor = load_processor(path)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # batched generation continues each row from its last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def load_processor(path: str):
    """AutoProcessor.from_pretrained(path), or the offline processor himap saved there
    (himap.builtin.offline_processor: a family's processor without a video processor)."""
    import json
    from pathlib import Path

    from transformers import AutoProcessor

    config = Path(path) / "processor_config.json"
    if config.is_file():
        from himap.builtin.offline_processor import offline_processor_class

        cls = offline_processor_class(json.loads(config.read_text()).get("processor_class", ""))
        if cls is not None:
            return cls.from_pretrained(path)
    return AutoProcessor.from_pretrained(path)


def chat_text(processor, prompt: str, with_image: bool = True, n_images: int | None = None,
              video: bool = False) -> str:
    """The model's chat-template text for one user turn: the images (`n_images`, default one when
    `with_image`), then the video if any, then the prompt."""
    n = (1 if with_image else 0) if n_images is None else n_images
    content = [{"type": "image"}] * n + ([{"type": "video"}] if video else []) + [{"type": "text", "text": prompt}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    if video:
        raise ValueError("this processor has no chat template; cannot place a video in the prompt")
    image = (getattr(processor, "image_token", "<image>") + "\n") * n
    return f"USER: {image}{prompt} ASSISTANT:"  # LLaVA-1.5 layout when no template is saved


MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grid_thw",
                "mm_token_type_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
                "batch_num_images")
"""Processor outputs handed to the model (LLaVA, LLaVA-NeXT/OneVision, Qwen2-VL/2.5-VL/3-VL, InternVL)."""


def _rgb(im):
    from PIL import Image

    return Image.open(im).convert("RGB") if isinstance(im, (str, os.PathLike)) else im.convert("RGB")


def build_inputs(processor, images, prompts: list[str], device="cpu", dtype=None, videos=None) -> dict:
    """Left-padded model inputs for a batch through the processor's chat template.

    `images`: per prompt one PIL image (or path) or a list of them (several images), or None for
    a batch without images; `videos`: None or per prompt a list of frames (PIL images or paths),
    for families that take video. Floating pixel inputs are cast to `dtype` when given.
    """
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    if videos is not None and len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos for {len(prompts)} prompts")
    per_prompt = [[] if im is None else [_rgb(x) for x in im] if isinstance(im, (list, tuple)) else [_rgb(im)]
                  for im in (images if images is not None else [None] * len(prompts))]
    clips = [[_rgb(f) for f in v] for v in videos] if videos is not None else None
    texts = [chat_text(processor, p, n_images=len(ims), video=clips is not None)
             for p, ims in zip(prompts, per_prompt)]
    flat = [im for ims in per_prompt for im in ims]
    if not flat and clips is None:
        batch = processor.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        if clips is not None and getattr(processor, "video_processor", None) is None:
            raise ValueError(f"{type(processor).__name__} has no video processor: this model family takes no "
                             "video (or transformers needs torchvision to build its video processor)")
        batch = processor(images=flat or None, videos=clips, text=texts, return_tensors="pt", padding=True)
    out = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS and hasattr(v, "to")}
    if dtype is not None:
        out = {k: v.to(dtype) if k.startswith("pixel_values") else v for k, v in out.items()}
    return out


def generate_ids(model, inputs: dict, max_new_tokens: int = 16, **generate_kwargs):
    """Greedy decoding; returns only the new token ids [B, n]."""
    import torch

    inputs = {k: v.to(model.dtype) if k.startswith("pixel_values") else v for k, v in inputs.items()}
    with torch.no_grad():  # not inference_mode: the gradient criterion needs autograd inside
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


def generate_texts(model, processor, images, prompts: list[str], max_new_tokens: int = 16,
                   **generate_kwargs) -> list[str]:
    """Batched greedy answers (decoded, special tokens skipped, stripped)."""
    inputs = build_inputs(processor, images, prompts, device=model.device)
    new = generate_ids(model, inputs, max_new_tokens, **generate_kwargs)
    tokenizer = getattr(processor, "tokenizer", processor)
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
