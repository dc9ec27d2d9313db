"""Hooks on the vision tower for criteria that select before the LLM from the vision encoder
(VisionZip, docs/peers.md). Attached by himap.prune.engine.apply through the family's adapter
(`Adapter.vision_features`), removed with the engine's other hooks.

- forward hooks on the q_proj and k_proj of the encoder attention that produces the feature layer
  keep their outputs (the [CLS] query and every key; nothing is recomputed);
- a forward pre-hook on the projector selects each image's tokens (himap.prune.peers.visionzip_select)
  and replaces each contextual target's feature with its merged group (peers.visionzip_merge)
  *before* the projector, as VisionZip merges the encoder's features; the projector's output keeps
  every position, so the model's own placeholder scatter is unchanged;
- the engine's stage at K = 0 then keeps exactly the selected tokens (`keep_mask`).

The vision tower runs once per prefill (generate passes pixel values only then), so the selection
of the last prefill is the one the stage reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from himap.prune import peers
from himap.prune.adapters import UnsupportedModelError
from himap.prune.schedule import Stage, stage_kept


class VisionLayoutError(UnsupportedModelError):
    """The model's vision tower is not laid out as the adapter says."""


@dataclass
class VisionState:
    """What the hooks saw in the last vision-tower call."""

    q: torch.Tensor | None = None  # [images, T_v, d_v] q_proj output of the feature layer
    k: torch.Tensor | None = None  # [images, T_v, d_v] k_proj output
    kept: list = field(default_factory=list)  # per image: kept token indices among the projector's tokens
    tokens_per_image: int = 0  # projector tokens per image
    merged: list = field(default_factory=list)  # per image: (targets, others, assign) of the merge


def attach(handle, model, adapter, stage: Stage) -> tuple[VisionState, list]:
    """Register the hooks for `stage` (a visionzip stage); returns the shared state and the hooks."""
    if adapter.vision_features is None:
        raise VisionLayoutError(f"{adapter.name} models have no vision-tower adapter; VisionZip cannot run on them")
    vf = adapter.vision_features(model)
    for name in ("q_proj", "k_proj", "num_heads", "scale"):
        if not hasattr(vf.attention, name):
            raise VisionLayoutError(f"the vision encoder attention {type(vf.attention).__name__} has no `{name}`")
    state = VisionState()

    def keep(attr):
        def hook(module, args, output):
            setattr(state, attr, output.detach())
        return hook

    hooks = [vf.attention.q_proj.register_forward_hook(keep("q")),
             vf.attention.k_proj.register_forward_hook(keep("k")),
             vf.projector.register_forward_pre_hook(
                 lambda mod, args, kwargs: _select_and_merge(state, vf, stage, args, kwargs), with_kwargs=True)]
    return state, hooks


def cls_attention_and_metric(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float):
    """[CLS] attention (post-softmax, summed over heads) [n, T] and keys averaged over heads
    [n, T, h] from an encoder layer's q_proj / k_proj outputs [n, T, d] (VisionZip sec. 3.2)."""
    n, t, d = k.shape
    hd = d // num_heads
    qh = q[:, :1].reshape(n, 1, num_heads, hd).transpose(1, 2).float()  # [n, H, 1, hd]
    kh = k.reshape(n, t, num_heads, hd).transpose(1, 2).float()  # [n, H, T, hd]
    probs = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * scale, dim=-1)  # [n, H, 1, T]
    return probs[:, :, 0].sum(dim=1), kh.mean(dim=1)


def _select_and_merge(state: VisionState, vf, stage: Stage, args, kwargs):
    feats = args[0] if args else kwargs.get("image_features")
    q, k = state.q, state.k
    state.q = state.k = None
    if feats is None or q is None or k is None or q.shape[0] != feats.shape[0]:
        raise VisionLayoutError("the projector ran without the vision encoder layer VisionZip reads (or on "
                                "other images); the adapter's vision_features do not match this model")
    cls, metric = cls_attention_and_metric(q, k, int(vf.attention.num_heads), float(vf.attention.scale))
    p = feats.shape[1]
    if vf.offset + p > cls.shape[1]:
        raise VisionLayoutError(f"{p} projector tokens per image, but the encoder has {cls.shape[1]} tokens")
    cls, metric = cls[:, vf.offset:vf.offset + p], metric[:, vf.offset:vf.offset + p]
    if vf.offset == 0:  # the [CLS] token is itself a projector token: VisionZip always keeps it
        cls = cls.clone()
        cls[:, 0] = float("inf")
    n_keep = stage_kept(stage, p, p)
    n_dominant = min(n_keep, int(stage.option("dominant", 0.0) * p + 1e-9))
    rule = stage.option("merge", "official")
    out = feats.clone()
    state.kept, state.merged, state.tokens_per_image = [], [], p
    for i in range(feats.shape[0]):
        dominant, targets, others, assign = peers.visionzip_select(cls[i], metric[i], n_keep, n_dominant)
        if targets.numel():
            out[i, targets] = peers.visionzip_merge(feats[i], targets, others, assign, rule)
        state.kept.append(torch.sort(torch.cat([dominant, targets])).values)
        state.merged.append((targets, others, assign))
    if args:
        return (out, *args[1:]), kwargs
    return args, {**kwargs, "image_features": out}


def keep_mask(state: VisionState, image: torch.Tensor) -> torch.Tensor:
    """[B, T] True on the image tokens the last projector call kept; `image` [B, T] marks the image
    tokens of the prompt, filled with the images' tokens in row-major order (as LLaVA scatters them)."""
    p, kept = state.tokens_per_image, state.kept
    if not kept:
        raise VisionLayoutError("no vision-tower selection for this prefill: VisionZip needs the model to run "
                                "its vision tower in the same call (pixel values, not precomputed embeddings)")
    if int(image.sum()) != len(kept) * p:
        raise VisionLayoutError(f"{int(image.sum())} image tokens in the prompt but {len(kept)} image(s) of {p} "
                                f"tokens from the vision tower")
    per_patch = torch.zeros((len(kept), p), dtype=torch.bool, device=image.device)
    for i, idx in enumerate(kept):
        per_patch[i, idx.to(image.device)] = True
    mask = torch.zeros_like(image)
    mask[image] = per_patch.reshape(-1)
    state.kept = []
    return mask
