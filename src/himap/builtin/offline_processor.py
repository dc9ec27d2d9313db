"""An offline LLaVA processor: word-level tokenizer, chat template and PIL image processor.

No tokenizer or processor can be downloaded here, so the built-in model (himap.builtin) ships
one built from scratch by `build_processor()`. It is a standard `LlavaProcessor` (a
`PreTrainedTokenizerFast` + `CLIPImageProcessorPil`), so it saves with `save_pretrained`, reloads
with `AutoProcessor.from_pretrained(dir)` and goes through exactly the code path a llava-hf
checkpoint's processor does: `<image>` in the text expands to (image_size / patch_size)^2 image
tokens.

Token ids: <pad>=0, <s>=1, </s>=2, <image>=3, <unk>=4 (the ids himap.models.testing's tiny models use),
then the words in the order given. Words are split on whitespace and every punctuation character
is a token of its own; case is kept ("A" and "a" are different words); unknown words map to <unk>.
"""

from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>", "<unk>")
"""Special tokens, in id order 0..4 (pad, bos, eos, image, unk)."""

PAD, BOS, EOS, IMAGE, UNK = SPECIAL_TOKENS

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""LLaVA-1.5-style turns: `<s>USER: <image>\\n{prompt}\\nASSISTANT:`; an assistant turn ends
with `</s>`. Content is either a string or a list of {"type": "image"} / {"type": "text"} parts."""

DEFAULT_WORDS = (
    # chat roles and punctuation
    "USER", "ASSISTANT", "SYSTEM", ":", ".", ",", "?", "(", ")", "'", "-", "!", ";", "/",
    # option letters and short answers
    "A", "B", "C", "D", "E", "F", "yes", "no", "Yes", "No",
    # attributes of the synthetic benchmark (himap.builtin.synthetic)
    "red", "green", "blue", "yellow", "white", "black", "purple", "orange", "gray",
    "circle", "square", "triangle", "cross", "star", "diamond",
    "zero", "one", "two", "three", "four", "five",
    # words of the paper's prompts (SPEC section 5) and of the synthetic questions
    "What", "what", "Which", "which", "How", "many", "color", "colour", "shape", "is", "are", "the",
    "a", "an", "of", "in", "on", "and", "or", "to", "there", "Is", "Are", "image", "picture",
    "object", "objects", "Options", "Answer", "answer", "with", "option", "s", "letter", "from",
    "given", "choices", "directly", "Analyse", "choose", "best", "for", "following", "question",
    "Output", "correct", "Provide", "sentence", "caption", "provided", "Please", "just", "this",
    "only", "word", "single", "Describe", "describe", "briefly", "background",
    "left", "right", "top", "bottom", "center", "small", "large", "The", "It", "it", "has",
)
"""A small English vocabulary covering the synthetic benchmark and the paper's prompt templates
(116 distinct words + 5 special tokens = 121 ids, so it fits himap.models.testing's tiny models' 128)."""


def vocabulary(words=DEFAULT_WORDS) -> dict[str, int]:
    """Token -> id: the special tokens first, then each distinct word in order of first use."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        if not w or any(ch.isspace() for ch in w):
            raise ValueError(f"vocabulary words must be non-empty and contain no whitespace, got {w!r}")
        vocab.setdefault(w, len(vocab))
    return vocab


def build_tokenizer(words=DEFAULT_WORDS, model_max_length: int = 2048, special: dict | None = None):
    """A word-level `PreTrainedTokenizerFast` with <image> registered as the image token.

    `special` (name -> token, e.g. {"video_token": "<video>"}) registers more special tokens under
    those names; tokens not in the vocabulary yet get the ids after the words'.
    No BOS is added automatically: the chat template writes it, as LLaVA's templates do.
    Padding is on the left, so batched generation continues every row from its last token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {"image_token": IMAGE, **(special or {})}
    vocab = vocabulary(words)
    for tok in special.values():
        vocab.setdefault(tok, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # join with spaces, no space before . , ? '
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens=special, padding_side="left",
        model_max_length=model_max_length,
    )


def build_image_processor(image_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """A CLIP-style PIL image processor: shortest edge resized to `image_size`, centre crop to a
    square of `image_size`, pixel values (x / 255 - mean) / std as [3, H, W] float32."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean), image_std=list(std),
    )


def build_processor(words=DEFAULT_WORDS, image_size: int = 192, patch_size: int = 16,
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """A `LlavaProcessor` for a CLIP tower with `patch_size` on `image_size` images.

    The vision tower's CLS token is counted (num_additional_image_tokens=1) and removed by the
    "default" feature-selection strategy, as in LLaVA 1.5, so `<image>` expands to exactly
    (image_size // patch_size)^2 tokens.
    """
    from transformers import LlavaProcessor

    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    return LlavaProcessor(
        image_processor=build_image_processor(image_size, mean, std), tokenizer=build_tokenizer(words),
        patch_size=patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def pixel_values(images, image_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """Fast path for square RGB images already `image_size` wide (the synthetic benchmark's):
    the same [B, 3, H, W] float32 tensor the processor returns, without its per-image overhead."""
    import numpy as np
    import torch

    arrays = []
    for im in images:
        if im.size != (image_size, image_size):
            raise ValueError(f"pixel_values fast path needs {image_size}x{image_size} images, got {im.size}; "
                             "use the processor")
        arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0  # [B, 3, H, W]
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def chat_prompt(prompt: str, answer: str | None = None) -> str:
    """The chat-template text of one user turn (image then `prompt`), ending with the generation
    prompt, plus `answer</s>` when given; equals `processor.apply_chat_template` output."""
    text = f"{BOS}USER: {IMAGE}\n{prompt}\nASSISTANT:"
    return text if answer is None else f"{text} {answer}{EOS}"


# ----------------------------------------------------------------------------- other families

FAMILY_TOKENS = {
    "llava_next": {},
    "llava_onevision": {"video_token": "<video>"},
    "qwen2_vl": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    "internvl": {"image_token": "<IMG_CONTEXT>", "context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                 "end_image_token": "</img>", "video_token": "<video>"},
}
"""Special tokens of each family's offline tokenizer (registered under the names its processor reads)."""
FAMILY_TOKENS["qwen2_5_vl"] = FAMILY_TOKENS["qwen3_vl"] = FAMILY_TOKENS["qwen2_vl"]

_PLACEHOLDERS = {  # what the chat template writes for an image / a video part
    "llava_next": ("<image>\n", None),
    "llava_onevision": ("<image>\n", "<video>\n"),
    "qwen2_vl": ("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"),
    "internvl": ("<IMG_CONTEXT>\n", None),
}
_PLACEHOLDERS["qwen2_5_vl"] = _PLACEHOLDERS["qwen3_vl"] = _PLACEHOLDERS["qwen2_vl"]


def family_chat_template(family: str) -> str:
    """CHAT_TEMPLATE with the family's image (and video) placeholders: `<s>USER: {parts}\nASSISTANT:`."""
    image, video = _PLACEHOLDERS[family]
    video_part = f"{{% elif part['type'] == 'video' %}}{video}" if video else ""
    return CHAT_TEMPLATE.replace("{% if part['type'] == 'image' %}<image>\n",
                                 f"{{% if part['type'] == 'image' %}}{image}{video_part}")


def _without_video(cls):
    """`cls` (a transformers processor) built without a transformers video processor: transformers
    builds video processors only with torchvision, which this offline processor does without. For
    Qwen2-VL / Qwen2.5-VL and LLaVA-OneVision, `FrameVideoProcessor` turns videos (lists of PIL
    frames) into the family's video inputs instead, so the processor's own call expands the video
    placeholders and builds mm_token_type_ids as usual."""

    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters)

    class Offline(cls):
        # every option a family's processor saves is named here: transformers reloads a processor's
        # options by the names its __init__ declares
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, vision_aspect_ratio=None, image_seq_length=None,
                     **kwargs):
            options = dict(num_image_tokens=num_image_tokens, vision_aspect_ratio=vision_aspect_ratio,
                           vision_feature_select_strategy=vision_feature_select_strategy,
                           image_seq_length=image_seq_length, **kwargs)
            options = {k: v for k, v in options.items() if v is not None and k in accepted}
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **options)
            if cls.__name__ in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "LlavaOnevisionProcessor"):
                self.video_processor = FrameVideoProcessor(self)

    Offline.__name__ = Offline.__qualname__ = f"HimapOffline{cls.__name__}"
    return Offline


def _frames_array(frames, size: tuple[int, int], mean, std):
    """[F, 3, H, W] float32 frames: PIL images resized to `size` (w, h), scaled and normalised."""
    import numpy as np

    out = []
    for im in frames:
        im = im.convert("RGB")
        if im.size != size:
            im = im.resize(size)
        x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
        out.append((x - np.asarray(mean, dtype=np.float32)[:, None, None]) / np.asarray(std, dtype=np.float32)[:, None, None])
    return np.stack(out)


class FrameVideoProcessor:
    """Videos as lists of PIL frames -> the video inputs of Qwen2-VL (flat patches grouped by
    temporal_patch_size, video_grid_thw) or LLaVA-OneVision (frames at the tower's input size,
    pixel_values_videos [videos, frames, 3, S, S]); frames are resized like the first one."""

    fps = 2.0  # frames per second the frames were sampled at (Qwen2.5-VL's temporal positions read it)

    def __init__(self, processor):
        self.processor = processor
        self.merge_size = getattr(processor.image_processor, "merge_size", None)  # read by Qwen's token count
        self.temporal_patch_size = getattr(processor.image_processor, "temporal_patch_size", None)

    def __call__(self, videos, **kwargs) -> dict:
        import numpy as np

        if self.merge_size is None:
            side = self.processor.image_processor.size["height"]
            return {"pixel_values_videos": np.stack([self._frames(v, (side, side)) for v in videos])}
        from types import SimpleNamespace

        built = [self._qwen(list(v)) for v in videos]
        return {"pixel_values_videos": np.concatenate([b[0] for b in built]),
                "video_grid_thw": np.array([b[1] for b in built], dtype=np.int64),
                "video_metadata": [SimpleNamespace(sampled_fps=self.fps) for _ in built]}

    def _frames(self, frames, size):
        ip = self.processor.image_processor
        return _frames_array(frames, size, ip.image_mean, ip.image_std)

    def _qwen(self, frames):
        import numpy as np

        ip = self.processor.image_processor
        _, gh, gw = (int(v) for v in ip(images=[frames[0]], return_tensors="np")["image_grid_thw"][0])
        p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        x = self._frames(frames, (gw * p, gh * p))  # [F, C, H, W]
        pad = (-len(x)) % tp
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
        t, c = len(x) // tp, x.shape[1]
        # [t, tp, C, gh/m, m, p, gw/m, m, p] -> rows (t, gh/m, gw/m, m, m), columns (C, tp, p, p)
        x = x.reshape(t, tp, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(t * gh * gw, c * tp * p * p), (t, gh, gw)


def family_processor_classes() -> dict:
    """Offline processor class of each family, by family name (transformers' processors without
    video processors, see `_without_video`)."""
    from transformers import (
        InternVLProcessor,
        LlavaNextProcessor,
        LlavaOnevisionProcessor,
        Qwen2_5_VLProcessor,
        Qwen2VLProcessor,
        Qwen3VLProcessor,
    )

    return {"llava_next": LlavaNextProcessor, "llava_onevision": _cached(LlavaOnevisionProcessor),
            "qwen2_vl": _cached(Qwen2VLProcessor), "qwen2_5_vl": _cached(Qwen2_5_VLProcessor),
            "qwen3_vl": _cached(Qwen3VLProcessor), "internvl": _cached(InternVLProcessor)}


_OFFLINE = {}


def _cached(cls):
    if cls.__name__ not in _OFFLINE:
        _OFFLINE[cls.__name__] = _without_video(cls)
    return _OFFLINE[cls.__name__]


def offline_processor_class(name: str):
    """The offline processor class saved under `name` (processor_config.json's processor_class), or None."""
    for cls in family_processor_classes().values():
        if cls.__name__ == name and name.startswith("HimapOffline"):
            return cls
    return None


def build_family_processor(family: str, words=DEFAULT_WORDS, image_size: int = 32, patch_size: int = 8,
                           **options):
    """An offline processor for a tiny `family` model (llava_next, llava_onevision, qwen2_vl,
    qwen2_5_vl, qwen3_vl, internvl): the word-level tokenizer with the family's special tokens,
    the family's PIL image processor and a chat template writing its placeholders.

    image_size / patch_size describe the vision tower (LLaVA-NeXT / OneVision / InternVL tiles);
    for the Qwen families patch_size is the ViT patch and images keep their aspect ratio
    (options: min_pixels, max_pixels, merge_size, temporal_patch_size).
    """
    classes = family_processor_classes()
    if family not in classes:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(classes)}")
    tok = build_tokenizer(words, special=FAMILY_TOKENS[family])
    template = family_chat_template(family)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if family == "llava_next":
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        ip = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                        crop_size={"height": image_size, "width": image_size},
                                        image_grid_pinpoints=options.get("pinpoints", _pinpoints(image_size)),
                                        image_mean=list(mean), image_std=list(std))
        return classes[family](image_processor=ip, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=template)
    if family == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        ip = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                             image_grid_pinpoints=options.get("pinpoints", _pinpoints(image_size)),
                                             image_mean=list(mean), image_std=list(std))
        return classes[family](image_processor=ip, tokenizer=tok, num_image_tokens=(image_size // patch_size) ** 2,
                               vision_feature_select_strategy="full", chat_template=template)
    if family == "internvl":
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        ip = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=True,
                                      min_patches=1, max_patches=options.get("max_patches", 4),
                                      image_mean=list(mean), image_std=list(std))
        return classes[family](image_processor=ip, tokenizer=tok,
                               image_seq_length=options.get("image_seq_length", (image_size // patch_size) ** 2 // 4),
                               chat_template=template)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    merge = options.get("merge_size", 2)
    unit = patch_size * merge
    ip = Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge,
                                  temporal_patch_size=options.get("temporal_patch_size", 2),
                                  size={"shortest_edge": options.get("min_pixels", unit * unit * 4),
                                        "longest_edge": options.get("max_pixels", unit * unit * 64)},
                                  image_mean=list(mean), image_std=list(std))
    return classes[family](image_processor=ip, tokenizer=tok, chat_template=template)


def _pinpoints(side: int) -> list[list[int]]:
    """Anyres grid resolutions: 1x2, 2x1 and 2x2 tiles of `side` pixels."""
    return [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
