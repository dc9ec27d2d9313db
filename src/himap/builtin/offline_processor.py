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


def build_tokenizer(words=DEFAULT_WORDS, model_max_length: int = 2048):
    """A word-level `PreTrainedTokenizerFast` with <image> registered as the image token.

    No BOS is added automatically: the chat template writes it, as LLaVA's templates do.
    Padding is on the left, so batched generation continues every row from its last token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=vocabulary(words), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # join with spaces, no space before . , ? '
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE}, padding_side="left",
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
