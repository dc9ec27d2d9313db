"""Per-family adapters: where a multimodal model keeps its language model, LM head and visual
token ids. A family is one entry here (never a copy of its forward); the engine stays the same.

Every supported family runs its decoder as `model.model.language_model` (a Llama-style decoder:
embed_tokens, layers, rotary_emb, norm) and its output projection as `model.lm_head`. They differ
in the visual token ids (image and video), in how a video's tokens split into frames (for the
per-image quota) and in family-specific limits checked at `apply`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class UnsupportedModelError(TypeError):
    """The model's class or layout is one himap cannot prune; the message says which and why."""


def _decoder(model):
    return model.model.language_model


def _multimodal(model):
    return model.model


def _lm_head(model):
    return model.lm_head


def _token_ids(*names: str) -> Callable:
    """model -> the ids found under these config names (image first, then video), skipping absent ones."""
    def ids(model) -> tuple[int, ...]:
        out = []
        for name in names:
            value = getattr(model.config, name, None)
            if value is not None and int(value) not in out:
                out.append(int(value))
        return tuple(out)

    return ids


def _qwen_video_frames(model, mm_kwargs: dict) -> list[int] | None:
    """Qwen2-VL / Qwen2.5-VL: frames (temporal patches) of each video, from video_grid_thw [n, 3]."""
    grid = mm_kwargs.get("video_grid_thw")
    return None if grid is None else [int(t) for t in grid[:, 0]]


def _onevision_video_frames(model, mm_kwargs: dict) -> list[int] | None:
    """LLaVA-OneVision: pixel_values_videos [videos, frames, C, H, W]; one newline closes each video."""
    pixels = mm_kwargs.get("pixel_values_videos")
    return None if pixels is None else [int(pixels.shape[1])] * int(pixels.shape[0])


def _qwen3_check(model, schedule) -> None:
    """Qwen3-VL adds deepstack visual features to the visual positions after decoder layers
    0 .. n-1 (n = len(vision_config.deepstack_visual_indexes)); tokens may only be dropped once
    every injection is done, i.e. at K >= n."""
    n = len(getattr(model.config.vision_config, "deepstack_visual_indexes", ()) or ())
    bad = [s.k for s in schedule.stages if s.k < n]
    if bad:
        raise ValueError(f"{type(model).__name__} adds deepstack visual features to the visual tokens after "
                         f"decoder layers 0..{n - 1}; a stage at K={bad[0]} would drop tokens before the last "
                         f"injection. Use K >= {n} for every stage (e.g. --k {n} {max(n + 1, 8)}).")


@dataclass(frozen=True)
class Adapter:
    name: str  # family name shown in errors and statistics
    classes: tuple[str, ...]  # model class names this adapter serves
    visual_token_ids: Callable  # model -> (image token id, [video token id]): every id that marks V
    language_model: Callable = _decoder  # model -> decoder (Llama-like: embed_tokens, layers, rotary_emb, norm)
    multimodal_model: Callable = _multimodal  # model -> module whose forward receives input_ids (hooked to find V)
    lm_head: Callable = _lm_head  # model -> output projection (gradient criterion)
    video_token_id: Callable | None = None  # model -> id of video tokens (None: the family has no video input)
    video_frames: Callable | None = None  # (model, multimodal call kwargs) -> frames per video, in batch order
    check: Callable | None = None  # (model, schedule) -> None, raises when the schedule does not fit the family
    refuse: str | None = None  # why himap cannot prune this family (apply raises TypeError with it)
    vision_features: Callable | None = None  # model -> VisionFeatures (criteria that read the vision tower)

    def image_token_id(self, model) -> int:
        """The image token id (the first visual token id)."""
        return self.visual_token_ids(model)[0]


_IMAGE = _token_ids("image_token_id")
_IMAGE_VIDEO = _token_ids("image_token_id", "video_token_id")
_VIDEO = lambda m: int(m.config.video_token_id)  # noqa: E731


@dataclass(frozen=True)
class VisionFeatures:
    """Where a criterion that reads the vision tower (VisionZip) finds what it needs."""

    attention: object  # encoder attention module (q_proj, k_proj, num_heads, scale) of the feature layer
    projector: object  # module whose forward takes the selected features [images, tokens, dim]
    offset: int  # encoder token index of the projector's first token (1 when [CLS] is cropped, else 0)


def llava_vision_features(model) -> VisionFeatures:
    """LLaVA: the CLIP encoder layer whose output is the feature layer (`vision_feature_layer`; VisionZip
    reads layer -2's attention with the -2 features), the multi-modal projector, and the [CLS] crop
    of the "default" strategy. A feature layer of 0 (the embeddings, as in the built-in model's one-layer
    tower) has no producing layer: the first encoder layer, which reads them, is used."""
    cfg = model.config
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers  # CLIPVisionModel or its transformer
    f = cfg.vision_feature_layer
    if not isinstance(f, int):
        raise UnsupportedModelError(f"vision_feature_layer={f!r} concatenates several layers; VisionZip reads one")
    h = f if f >= 0 else len(layers) + 1 + f  # index into the encoder's hidden states (0: embeddings)
    offsets = {"default": 1, "full": 0}
    if cfg.vision_feature_select_strategy not in offsets:
        raise UnsupportedModelError(f"unknown vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}")
    return VisionFeatures(layers[max(h - 1, 0)].self_attn, model.model.multi_modal_projector,
                          offsets[cfg.vision_feature_select_strategy])


LLAVA = Adapter(name="llava", classes=("LlavaForConditionalGeneration",), visual_token_ids=_IMAGE,
                vision_features=llava_vision_features)
LLAVA_NEXT = Adapter(name="llava-next", classes=("LlavaNextForConditionalGeneration",), visual_token_ids=_IMAGE)
LLAVA_ONEVISION = Adapter(name="llava-onevision", classes=("LlavaOnevisionForConditionalGeneration",),
                          visual_token_ids=_IMAGE_VIDEO, video_token_id=_VIDEO,
                          video_frames=_onevision_video_frames)
QWEN2_VL = Adapter(name="qwen2-vl", classes=("Qwen2VLForConditionalGeneration",
                                             "Qwen2_5_VLForConditionalGeneration"),
                   visual_token_ids=_IMAGE_VIDEO, video_token_id=_VIDEO, video_frames=_qwen_video_frames)
QWEN3_VL = Adapter(name="qwen3-vl", classes=("Qwen3VLForConditionalGeneration",),
                   visual_token_ids=_IMAGE_VIDEO, video_token_id=_VIDEO, check=_qwen3_check)
INTERNVL = Adapter(name="internvl", classes=("InternVLForConditionalGeneration",), visual_token_ids=_IMAGE)
GEMMA3 = Adapter(
    name="gemma3", classes=("Gemma3ForConditionalGeneration",), visual_token_ids=_IMAGE,
    refuse=("Gemma 3 does not fit himap's pruning: the tokens of one image attend to each other "
            "bidirectionally (Gemma3Model builds that mask from token_type_ids and hands the decoder one "
            "mask per layer type), and most of its layers use a sliding window counted in cache slots. "
            "himap gives the kept tokens causal masks built by create_causal_mask, so a pruned Gemma 3 "
            "would compute something the unpruned model never does."))

ADAPTERS = (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, QWEN2_VL, QWEN3_VL, INTERNVL, GEMMA3)
LLAMA_PARTS = ("embed_tokens", "layers", "rotary_emb", "norm")


def visual_token_ids(model) -> tuple[int, ...]:
    """Every token id that marks V in `model`'s prompts (its family's image and video ids; a model
    of another family: its config's image_token_id)."""
    try:
        return find_adapter(model).visual_token_ids(model)
    except TypeError:
        return _IMAGE(model)


def supported_classes() -> list[str]:
    return [c for a in ADAPTERS if a.refuse is None for c in a.classes]


def find_adapter(model) -> Adapter:
    """The adapter for `model`, or a TypeError naming the supported classes (or why its family
    cannot be pruned)."""
    cls = type(model).__name__
    for adapter in ADAPTERS:
        if cls in adapter.classes:
            if adapter.refuse:
                raise UnsupportedModelError(f"{cls}: {adapter.refuse}")
            lm = adapter.language_model(model)
            missing = [p for p in LLAMA_PARTS if not hasattr(lm, p)]
            if missing:
                raise UnsupportedModelError(f"{cls}'s language model {type(lm).__name__} is not a Llama-architecture "
                                f"decoder (missing {', '.join(missing)})")
            return adapter
    raise UnsupportedModelError(f"himap does not support {cls}; supported model classes: {', '.join(supported_classes())}")
