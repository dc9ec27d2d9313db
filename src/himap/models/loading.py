"""Loading models and processors, building chat prompts, batched greedy generation.

The same code path serves llava-hf checkpoints (a hub id or a local directory) and the built-in
model ("builtin"): AutoModelForImageTextToText and AutoProcessor from a directory.

Prompt formats (`prompt_format`, the CLI's --prompt-format; docs/official-code.md):
- "hf": the checkpoint's own chat template (processor.apply_chat_template), one user turn with
  the images first and no system prompt: what the HF model card and lmms-eval use. LLaVA-1.5 (llava-hf)
  gives BOS "USER:" then the image, then the prompt, then "ASSISTANT:" (5 tokens before the image).
- "llava-v1": LLaVA's `vicuna_v1` conversation, built the way the official HiMAP scripts and
  LLaVA's eval scripts build it (conv_templates["vicuna_v1"], then tokenizer_image_token): the
  system prompt, " USER: <image>\n{prompt} ASSISTANT:", each text chunk around the image
  tokenized on its own (35 tokens before the image with LLaVA-1.5's tokenizer). One image per
  prompt at most, as LLaVA-1.5's format.
"""

from __future__ import annotations

import os
import re

BUILTIN = "builtin"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""owner/name: the form of a model repository id on the hub."""


class ImageError(ValueError):
    """An image file is missing, not an image, or damaged."""

PROMPT_FORMATS = ("hf", "llava-v1")
"""Prompt formats build_inputs knows (see the module docstring)."""

LLAVA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.")
"""The system prompt of LLaVA's `vicuna_v1` conversation (llava/conversation.py, conv_vicuna_v1)."""

IMAGE_PLACEHOLDER = "<image>"
"""LLaVA's DEFAULT_IMAGE_TOKEN: the text where tokenizer_image_token splits the prompt."""


def resolve_model_path(path_or_id: str) -> str:
    """The directory or hub id to load; "builtin" is the model shipped inside the package.

    Anything else must be an existing folder or a hub id of the form owner/name: a mistyped
    name ('builtinn', a folder that does not exist) raises here instead of asking the hub."""
    if path_or_id == BUILTIN:
        from himap.builtin import model_dir

        return str(model_dir())
    if os.path.isdir(path_or_id):
        return path_or_id
    looks_like_path = (path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") > 1
                       or os.path.exists(path_or_id))
    if looks_like_path or not _HUB_ID.fullmatch(path_or_id):
        import difflib

        close = difflib.get_close_matches(path_or_id, [BUILTIN], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r} (the shipped model)?" if close else ""
        what = ("is a file, not a model folder" if os.path.isfile(path_or_id) else
                "does not exist" if looks_like_path else
                "is neither a local model folder nor a hub id of the form owner/name")
        raise ValueError(f"model {path_or_id!r} {what}{hint}")
    return path_or_id


def check_device(device) -> str:
    """`device` as a string, after checking that torch can use it (a clear error instead of
    torch's assertion when CUDA is asked for on a machine without it)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps): {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device ({built}); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    return str(device)


def check_attn_implementation(attn_implementation: str | None, device) -> None:
    """Refuse attention kernels that cannot run here, before any weights load: flash_attention_2
    needs the flash-attn package and a CUDA device."""
    if attn_implementation != "flash_attention_2":
        return
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError(f"attention {attn_implementation!r} needs the flash-attn package "
                         "(pip install flash-attn) and a CUDA GPU; use sdpa or eager")
    if not str(device).startswith("cuda"):
        raise ValueError(f"attention {attn_implementation!r} runs on CUDA only; use sdpa or eager on {device}")


def load_image(path):
    """An image file as RGB PIL, with a clear ImageError when it is missing, a folder, not an
    image, or damaged (truncated files are read to the end here, not at the first forward)."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ImageError(f"image {path!r} is a folder, not an image file")
    if not os.path.isfile(path):
        raise ImageError(f"image file {path!r} not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # decodes every pixel
    except UnidentifiedImageError:
        raise ImageError(f"{path!r} is not an image file that PIL can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"image {path!r} is damaged or cut short ({err})") from None


def _dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
    return names[dtype]


def model_config(path_or_id: str):
    """The model's config alone (no weights): for checks and schedules before loading."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(path_or_id))


def load_model(path_or_id: str, attn_implementation: str = "sdpa", dtype=None, device: str = "cpu"):
    """(model, processor) in eval mode on `device`. dtype: None (fp32 on CPU, the checkpoint's
    on GPU), a torch dtype, or one of fp32 / bf16 / fp16."""
    import torch
    from transformers import AutoModelForImageTextToText

    path = resolve_model_path(path_or_id)
    device = check_device(device)
    check_attn_implementation(attn_implementation, device)
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


def check_prompt_format(prompt_format: str) -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}")
    return prompt_format


def llava_v1_text(prompt: str, with_image: bool = True) -> str:
    """One user turn and an open assistant turn in LLaVA's `vicuna_v1` conversation: separator
    style TWO with sep " ", roles USER / ASSISTANT, and the image placeholder plus a newline
    before the prompt (LLaVA-1.5 has no image start/end tokens)."""
    if IMAGE_PLACEHOLDER in prompt:
        raise ValueError(f"the prompt contains {IMAGE_PLACEHOLDER!r}; the llava-v1 format places the image itself")
    image = IMAGE_PLACEHOLDER + "\n" if with_image else ""
    return f"{LLAVA_V1_SYSTEM} USER: {image}{prompt} ASSISTANT:"


def chat_text(processor, prompt: str, with_image: bool = True, n_images: int | None = None,
              video: bool = False, prompt_format: str = "hf") -> str:
    """The text of one user turn (the images, `n_images`, default one when `with_image`; then the
    video if any; then the prompt) ending with the assistant's turn: the model's chat template
    ("hf") or LLaVA's vicuna_v1 conversation ("llava-v1", one image at most)."""
    n = (1 if with_image else 0) if n_images is None else n_images
    if check_prompt_format(prompt_format) == "llava-v1":
        if n > 1 or video:
            raise ValueError("the llava-v1 format (LLaVA-1.5's vicuna_v1 conversation) takes one image per prompt, "
                             "no video; use --prompt-format hf")
        return llava_v1_text(prompt, with_image=n == 1)
    content = [{"type": "image"}] * n + ([{"type": "video"}] if video else []) + [{"type": "text", "text": prompt}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    if video:
        raise ValueError("this processor has no chat template; cannot place a video in the prompt")
    image = (getattr(processor, "image_token", "<image>") + "\n") * n
    return f"USER: {image}{prompt} ASSISTANT:"  # LLaVA-1.5 layout when no template is saved


def llava_v1_ids(tokenizer, text: str, image_ids: list[int] | None = None) -> list[int]:
    """Token ids of a llava-v1 text the way LLaVA's tokenizer_image_token makes them: each chunk
    between image placeholders tokenized on its own with the tokenizer's special tokens; when
    the first chunk starts with BOS, BOS is kept once and the first id of every chunk dropped;
    `image_ids` (the image's expanded tokens) go where the placeholder was. A tokenizer that has
    a BOS token but does not add it (the built-in word-level one) gets it prepended, as LLaVA's
    Llama tokenizer would have added it."""
    chunks = [tokenizer(c)["input_ids"] for c in text.split(IMAGE_PLACEHOLDER)]
    if len(chunks) > 1 and image_ids is None:
        raise ValueError("the text has an image placeholder but no image tokens were given")
    bos = tokenizer.bos_token_id
    offset = 1 if chunks[0] and bos is not None and chunks[0][0] == bos else 0
    ids = [] if bos is None else [bos]
    for i, chunk in enumerate(chunks):
        if i:
            ids += list(image_ids)
        ids += chunk[offset:]
    return ids


def _llava_v1_batch(processor, per_prompt: list, prompts: list[str]) -> dict:
    """input_ids / attention_mask (left-padded) and the processor's pixel inputs in the llava-v1
    format, `per_prompt` holding each prompt's images (none or one). The image's token count
    comes from the processor itself (it expands one image token per image), never from a
    hard-coded length."""
    import torch

    tokenizer = getattr(processor, "tokenizer", processor)
    flat = [im for ims in per_prompt for im in ims]
    pixels, runs = {}, iter(())
    if flat:
        token = getattr(processor, "image_token", None)
        token_id = getattr(processor, "image_token_id", None)
        if token is None or token_id is None:
            raise ValueError("the llava-v1 format needs a processor with an image token (a LLaVA processor)")
        expanded = processor(images=flat, text=[token] * len(flat), return_tensors="pt", padding=True)
        runs = iter([[token_id] * n for n in (expanded["input_ids"] == token_id).sum(1).tolist()])
        pixels = {k: v for k, v in expanded.items() if k in MODEL_INPUTS and k.startswith(("pixel_values", "image_"))}
    rows = [llava_v1_ids(tokenizer, llava_v1_text(p, with_image=bool(ims)), next(runs) if ims else None)
            for p, ims in zip(prompts, per_prompt)]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):  # left padding, as the tokenizer's padding_side for generation
        ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask, **pixels}


MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grid_thw",
                "mm_token_type_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
                "batch_num_images")
"""Processor outputs handed to the model (LLaVA, LLaVA-NeXT/OneVision, Qwen2-VL/2.5-VL/3-VL, InternVL)."""


def _rgb(im):
    """A PIL image as RGB; a path is read with load_image (clear errors for bad files)."""
    return load_image(im) if isinstance(im, (str, os.PathLike)) else im.convert("RGB")


def build_inputs(processor, images, prompts: list[str], device="cpu", dtype=None, videos=None,
                 prompt_format: str = "hf") -> dict:
    """Left-padded model inputs for a batch, in `prompt_format` ("hf": through the processor's
    chat template; "llava-v1": see the module docstring).

    `images`: per prompt one PIL image (or path) or a list of them (several images), or None for
    a batch without images; `videos`: None or per prompt a list of frames (PIL images or paths),
    for families that take video. Floating pixel inputs are cast to `dtype` when given.
    """
    check_prompt_format(prompt_format)
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    if videos is not None and len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos for {len(prompts)} prompts")
    per_prompt = [[] if im is None else [_rgb(x) for x in im] if isinstance(im, (list, tuple)) else [_rgb(im)]
                  for im in (images if images is not None else [None] * len(prompts))]
    clips = [[_rgb(f) for f in v] for v in videos] if videos is not None else None
    texts = [chat_text(processor, p, n_images=len(ims), video=clips is not None, prompt_format=prompt_format)
             for p, ims in zip(prompts, per_prompt)]  # also checks what llava-v1 takes
    flat = [im for ims in per_prompt for im in ims]
    if prompt_format == "llava-v1":
        batch = _llava_v1_batch(processor, per_prompt, prompts)
    elif not flat and clips is None:
        batch = processor.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        if clips is not None and getattr(processor, "video_processor", None) is None:
            raise ValueError(f"{type(processor).__name__} has no video processor: this model family takes no "
                             "video (or transformers needs torchvision to build its video processor)")
        batch = processor(images=flat or None, videos=clips, text=texts, return_tensors="pt", padding=True)
    out = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS and hasattr(v, "to")}
    return pixels_to(out, dtype) if dtype is not None else out


def pixels_to(inputs: dict, dtype) -> dict:
    """`inputs` with the pixel tensors (images, videos) cast to `dtype`."""
    return {k: v.to(dtype) if k.startswith("pixel_values") else v for k, v in inputs.items()}


def load_video_frames(path: str, num_frames: int = 8) -> list:
    """`num_frames` RGB frames (PIL) sampled uniformly over a video file (first and last
    included), decoded with PyAV (installed with lmms-eval; `pip install av`)."""
    try:
        import av
    except ImportError:
        raise ImportError("reading video files needs PyAV: pip install av") from None
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    with av.open(str(path)) as container:
        total = container.streams.video[0].frames  # 0 when the container does not say
        wanted = set(_uniform(total, num_frames)) if total else None
        frames = []
        for i, frame in enumerate(container.decode(video=0)):
            if wanted is None or i in wanted:
                frames.append(frame.to_image().convert("RGB"))
            if wanted is not None and len(frames) == len(wanted):
                break
    if not frames:
        raise ValueError(f"{path}: no video frames decoded")
    if wanted is None:  # every frame was kept: pick now
        frames = [frames[i] for i in _uniform(len(frames), num_frames)]
    return frames


def _uniform(total: int, n: int) -> list[int]:
    """min(n, total) frame indices spread evenly over 0..total-1, first and last included."""
    import numpy as np

    return sorted(set(np.linspace(0, total - 1, min(n, total)).round().astype(int).tolist()))


def in_model_dtype(model, inputs: dict) -> dict:
    """`inputs` with the pixel tensors in the model's dtype (what its vision tower expects)."""
    return pixels_to(inputs, model.dtype)


def eos_ids(model) -> list[int]:
    """The generation config's end-of-sequence ids (none, one or several) as a list."""
    eos = model.generation_config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


def stop_ids(model, tokenizer) -> set[int]:
    """Ids where a generated answer ends: end of sequence, or the padding generate fills finished rows with."""
    stop = set(eos_ids(model))
    if tokenizer.pad_token_id is not None:
        stop.add(tokenizer.pad_token_id)
    return stop


def answer_length(ids: list[int], stop: set[int]) -> int:
    """Generated tokens up to and including the first stop id (all of them when none stops)."""
    return next((j + 1 for j, t in enumerate(ids) if t in stop), len(ids))


def generate_ids(model, inputs: dict, max_new_tokens: int = 16, recompute: bool = False, **generate_kwargs):
    """Greedy decoding (unless generate_kwargs ask for sampling); returns only the new token ids [B, n].

    recompute=True generates as the official HiMAP code does (`use_cache=False`): no KV cache,
    every new token re-runs the whole sequence (prompt and the tokens generated so far), so a
    pruned model ranks and prunes again at every token, and phi_sh's instruction rows include the
    generated tokens. The default keeps the KV cache: one ranking in prefill, decode steps
    attending to the pruned cache."""
    import torch

    inputs = in_model_dtype(model, inputs)
    generate_kwargs = {"do_sample": False, **generate_kwargs}  # do_sample=True (with a temperature) samples
    if recompute:
        generate_kwargs = {**generate_kwargs, "use_cache": False}
    with torch.no_grad():  # not inference_mode: the gradient criterion needs autograd inside
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


def generate_texts(model, processor, images, prompts: list[str], max_new_tokens: int = 16,
                   prompt_format: str = "hf", recompute: bool = False, **generate_kwargs) -> list[str]:
    """Batched greedy answers (decoded, special tokens skipped, stripped)."""
    inputs = build_inputs(processor, images, prompts, device=model.device, prompt_format=prompt_format)
    new = generate_ids(model, inputs, max_new_tokens, recompute=recompute, **generate_kwargs)
    tokenizer = getattr(processor, "tokenizer", processor)
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
