"""Per-family adapters: where a multimodal model keeps its language model, LM head and image
token id. A new family (LLaVA-NeXT, Qwen2-VL) adds one entry here; the engine stays the same."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Adapter:
    name: str  # family name shown in errors and statistics
    classes: tuple[str, ...]  # model class names this adapter serves
    language_model: Callable  # model -> decoder (LlamaModel-like: embed_tokens, layers, rotary_emb, norm)
    multimodal_model: Callable  # model -> module whose forward receives input_ids (hooked to find V)
    lm_head: Callable  # model -> output projection (gradient criterion)
    image_token_id: Callable  # model -> int


LLAVA = Adapter(
    name="llava",
    classes=("LlavaForConditionalGeneration",),
    language_model=lambda m: m.model.language_model,
    multimodal_model=lambda m: m.model,
    lm_head=lambda m: m.lm_head,
    image_token_id=lambda m: int(m.config.image_token_id),
)

ADAPTERS = (LLAVA,)
LLAMA_PARTS = ("embed_tokens", "layers", "rotary_emb", "norm")


def supported_classes() -> list[str]:
    return [c for a in ADAPTERS for c in a.classes]


def find_adapter(model) -> Adapter:
    """The adapter for `model`, or a TypeError naming the supported classes."""
    cls = type(model).__name__
    for adapter in ADAPTERS:
        if cls in adapter.classes:
            lm = adapter.language_model(model)
            missing = [p for p in LLAMA_PARTS if not hasattr(lm, p)]
            if missing:
                raise TypeError(f"{cls}'s language model {type(lm).__name__} is not a Llama-architecture "
                                f"decoder (missing {', '.join(missing)})")
            return adapter
    raise TypeError(f"himap does not support {cls}; supported model classes: {', '.join(supported_classes())}")
