"""Token sets S (system), V (image), I (instruction) found from the input (SPEC section 1).

Positions are found from the model's image token id and the attention mask, never from
hard-coded lengths. Everything is a boolean mask over the prompt's positions so batches with
left padding work: padding belongs to no set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenSets:
    """Boolean masks [B, T] over prompt positions."""

    system: torch.Tensor  # S: valid text positions before the first image token
    image: torch.Tensor  # V: positions holding the image token id
    instruction: torch.Tensor  # I: valid text positions after the first image token
    valid: torch.Tensor  # not padding

    @property
    def has_image(self) -> torch.Tensor:
        """[B] whether each sample has at least one image token."""
        return self.image.any(dim=1)

    def counts(self) -> dict[str, list[int]]:
        return {name: getattr(self, name).sum(1).tolist() for name in ("system", "image", "instruction")}


def token_sets(input_ids: torch.Tensor, image_token_id: int,
               attention_mask: torch.Tensor | None = None) -> TokenSets:
    """S, V, I for `input_ids` [B, T] (or [T]); `attention_mask` marks non-padding positions."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if attention_mask is not None and attention_mask.dim() == 1:
        valid = valid[None]
    image = (input_ids == image_token_id) & valid  # [B, T]
    after_first_image = image.long().cumsum(dim=1) > 0  # [B, T] true from the first image token on
    text = valid & ~image
    return TokenSets(system=text & ~after_first_image, image=image,
                     instruction=text & after_first_image, valid=valid)
