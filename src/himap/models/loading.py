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
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # batched generation continues each row from its last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def chat_text(processor, prompt: str, with_image: bool = True) -> str:
    """The model's chat-template text for one user turn (image first, then the prompt)."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    image = (getattr(processor, "image_token", "<image>") + "\n") if with_image else ""
    return f"USER: {image}{prompt} ASSISTANT:"  # LLaVA-1.5 layout when no template is saved


def build_inputs(processor, images, prompts: list[str], device="cpu", dtype=None) -> dict:
    """Left-padded model inputs for a batch. `images`: PIL images (or paths), or None for a
    text-only batch (no image tokens)."""
    from PIL import Image

    texts = [chat_text(processor, p, with_image=images is not None) for p in prompts]
    if images is None:
        batch = processor.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        images = [Image.open(im).convert("RGB") if isinstance(im, (str, os.PathLike)) else im.convert("RGB")
                  for im in images]
        batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    out = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    if "pixel_values" in out and dtype is not None:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def generate_ids(model, inputs: dict, max_new_tokens: int = 16, **generate_kwargs):
    """Greedy decoding; returns only the new token ids [B, n]."""
    import torch

    if "pixel_values" in inputs:
        inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(model.dtype)}
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
