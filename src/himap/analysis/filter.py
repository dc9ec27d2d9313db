"""Appendix B filter: keep only samples that need their image.

Each sample is answered twice on its first token: with its image, and without it. "Without"
is either `drop` (default, the paper's "removed the image information"): the image and its
tokens are removed from the prompt, the surrounding text stays; or `blank`: the image is
replaced by one of the processor's mean colour (same token layout). A sample is kept when the
model is correct with the image and wrong without it; the others are pseudo-multimodal.
"""

from __future__ import annotations

from dataclasses import dataclass

WITHOUT_MODES = ("drop", "blank")


@dataclass
class FilterConfig:
    """How the image-free run is built."""

    without: str = "drop"  # "drop": remove the image tokens from the prompt; "blank": mean-colour image


def first_tokens(model, inputs: dict) -> list[int]:
    """Top-1 token id at each sample's last prompt position (one forward, no cache)."""
    import torch

    from himap.analysis.saliency import last_logits

    with torch.no_grad():
        return last_logits(model, inputs).argmax(-1).tolist()


def without_image(inputs: dict, mode: str, image_token_id, pad_token_id: int = 0) -> dict:
    """The inputs with the image removed (`drop`) or blanked (`blank`)."""
    from himap.analysis.data import blank_image, drop_image_tokens

    if mode == "drop":
        return drop_image_tokens(inputs, image_token_id, pad_token_id)
    if mode == "blank":
        return blank_image(inputs)
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(WITHOUT_MODES)}")


def filter_batch(model, inputs: dict, accepted: list, config: FilterConfig | None = None) -> list[dict]:
    """Per sample: {"pred_with", "pred_without", "correct_with", "correct_without", "keep"}.

    accepted: per sample, the token ids that count as a correct first token.
    """
    config = config or FilterConfig()
    cfg = model.config
    pad = getattr(getattr(cfg, "text_config", cfg), "pad_token_id", None)
    with_img = first_tokens(model, inputs)
    from himap.prune.adapters import visual_token_ids

    without = first_tokens(model, without_image(inputs, config.without, visual_token_ids(model),
                                                0 if pad is None else pad))
    out = []
    for b, ok in enumerate(accepted):
        ok = set(ok)
        cw, cwo = with_img[b] in ok, without[b] in ok
        out.append({"pred_with": with_img[b], "pred_without": without[b], "correct_with": cw,
                    "correct_without": cwo, "keep": cw and not cwo})
    return out
