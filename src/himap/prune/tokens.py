"""Token sets S (system), V (visual), I (instruction) found from the input (SPEC section 1).

V holds every visual token of a prompt: the image tokens of each image (LLaVA-NeXT's base image,
crops and row-newline tokens alike), and the video tokens of each video. With several images or
video frames, S is the text before the first visual token and I every text token after it (the
text between two images included). Positions are found from the model's visual token ids and
the attention mask, never from hard-coded lengths. Everything is a boolean mask over the
prompt's positions so batches with left padding work: padding belongs to no set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class TokenSets:
    """Boolean masks [B, T] over prompt positions."""

    system: torch.Tensor  # S: valid text positions before the first visual token
    image: torch.Tensor  # V: positions holding a visual (image or video) token id
    instruction: torch.Tensor  # I: valid text positions after the first visual token
    valid: torch.Tensor  # not padding

    @property
    def has_image(self) -> torch.Tensor:
        """[B] whether each sample has at least one visual token."""
        return self.image.any(dim=1)

    def counts(self) -> dict[str, list[int]]:
        return {name: getattr(self, name).sum(1).tolist() for name in ("system", "image", "instruction")}


def _ids(visual_token_ids: "int | Iterable[int]") -> list[int]:
    return [int(visual_token_ids)] if isinstance(visual_token_ids, int) else [int(i) for i in visual_token_ids]


def visual_mask(input_ids: torch.Tensor, visual_token_ids: "int | Iterable[int]") -> torch.Tensor:
    """[B, T] positions holding any of the visual token ids."""
    ids = torch.tensor(_ids(visual_token_ids), device=input_ids.device, dtype=input_ids.dtype)
    return torch.isin(input_ids, ids)


def token_sets(input_ids: torch.Tensor, visual_token_ids: "int | Iterable[int]",
               attention_mask: torch.Tensor | None = None) -> TokenSets:
    """S, V, I for `input_ids` [B, T] (or [T]); `visual_token_ids` is the image token id or every
    visual token id (image and video); `attention_mask` marks non-padding positions."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if attention_mask is not None and attention_mask.dim() == 1:
        valid = valid[None]
    image = visual_mask(input_ids, visual_token_ids) & valid  # [B, T]
    after_first_image = image.long().cumsum(dim=1) > 0  # [B, T] true from the first visual token on
    text = valid & ~image
    return TokenSets(system=text & ~after_first_image, image=image,
                     instruction=text & after_first_image, valid=valid)


def visual_groups(input_ids: torch.Tensor, visual: torch.Tensor, video_token_id: int | None = None,
                  frames_per_video: list[int] | None = None) -> torch.Tensor:
    """[B, T] group of each visual token (0, 1, ... per sample; -1 elsewhere) for per-image quotas.

    A group is a maximal run of consecutive visual tokens (one image: LLaVA-NeXT's base image,
    crops and newline tokens form one run). A run of video tokens is one video; when
    `frames_per_video` gives its frame count (videos in batch order, as the model consumes their
    features), the run is split into that many equal consecutive parts, the remainder (a trailing
    newline token) joining the last part.
    """
    b, t = visual.shape
    starts = visual & ~torch.cat([visual.new_zeros((b, 1)), visual[:, :-1]], dim=1)  # [B, T] first token of a run
    run = starts.long().cumsum(dim=1) - 1  # [B, T] run index per sample
    groups = torch.where(visual, run, -1)
    if video_token_id is None or not frames_per_video:
        return groups
    out = groups.clone()
    frames = iter(frames_per_video)
    for i in range(b):
        offset = 0  # groups added so far in this sample by splitting videos
        for r in range(int(starts[i].sum())):
            pos = (groups[i] == r).nonzero().squeeze(1)
            is_video = bool((input_ids[i, pos] == video_token_id).all())
            if not is_video:
                out[i, pos] = r + offset
                continue
            n_frames = next(frames, None)
            if n_frames is None:
                raise ValueError("more video token runs than videos in the call")
            size = max(len(pos) // n_frames, 1)
            part = torch.clamp(torch.arange(len(pos), device=pos.device) // size, max=n_frames - 1)
            out[i, pos] = r + offset + part
            offset += n_frames - 1
    return out
