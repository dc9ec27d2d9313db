"""The pruning engine: plugs a schedule into an unmodified HuggingFace model (SPEC sections 1-2).

The model's own forward runs unchanged: its decoder loop, cache handling, mask creation and
output classes. himap attaches only through public extension points, all undone by `remove`:
- a forward pre-hook on the multimodal model records `input_ids` (the decoder receives only
  embeddings), from which V, S and I are found; a pre-hook on the outer model refuses `labels`
  while tokens are dropped (they would no longer line up);
- a forward pre-hook on the decoder (language model) reads the call's 2D attention mask and cache
  and decides whether it is a prefill or a decode step;
- a forward pre-hook (`with_kwargs=True`) on every decoder layer: at a stage boundary K it ranks,
  gathers the kept tokens' hidden states and hands the layer the kept tokens' slice of the
  position embeddings the library computed (original RoPE positions, M-RoPE included) and a mask
  built for them by the library's own `create_causal_mask`; later layers of the segment get the
  same substitutes. The loop passes each layer's output to the next, so layers K.. run on the
  kept tokens and each layer's KV cache holds exactly the tokens that layer saw;
- a forward hook on the decoder checks the invariants after every call (per-layer cache lengths
  equal to the schedule's) and records the statistics;
- an attention function registered in `AttentionInterface` (with the matching mask function in
  `AttentionMaskInterface`) wraps the model's own implementation (sdpa, eager, flash...) and
  passes every call through unchanged, except inside a ranking layer K-1 during prefill, where it
  also computes the attention rows the criterion needs (queries x all keys, softmax, head mean).

Decode steps attend to the pruned cache: layers from K1 on get a mask built from the call's 2D
attention mask with the kept prompt columns selected. A layout this module does not recognise
(a renamed keyword, a missing attribute) raises at `apply`, naming the transformers version.

Peer methods (docs/peers.md, selection rules in himap.prune.peers) use the same machinery: a stage
at K = 0 prunes in layer 0's pre-hook (the layer receives the input embeddings; decode steps then
take the true past length from the prefill's record, not from layer 0's shortened cache); DART's
criterion reads layer K-1's keys through the attention function; PyramidDrop's ranks with layer K's
own projections (`next_layer_rows`, checked against the keys layer K computes); VisionZip's
selection and merging happen on the vision tower (himap.prune.vision). A schedule with
`positions="contiguous"` renumbers the kept tokens' RoPE positions 0, 1, 2, ... (prefill: the
library's cos/sin gathered at the renumbered index; decode: the decoder's rotary embedding at the
true position minus the prompt tokens dropped before that layer).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field

import torch

from himap.prune import criteria, peers, vision
from himap.prune.adapters import find_adapter
from himap.prune.rows import ROW_CHUNK_BYTES, attention_rows, next_layer_rows, pair_norms, reduced_attention
from himap.prune.schedule import PEER_CRITERIA, Schedule, Stage, get_schedule, stage_kept
from himap.prune.tokens import TokenSets, token_sets, visual_groups

_WRAPPER_PREFIX = "himap_"
SUPPORTED_TRANSFORMERS = ("5.23", "5.24")
"""The transformers releases (major.minor) the test suite ran on; pyproject.toml admits exactly these."""
CACHE_KEYWORDS = ("cache", "past_key_values")  # the cache's keyword: 5.24 renamed past_key_values


class LayoutError(TypeError):
    """The installed transformers lays a model out in a way this engine does not recognise."""


def _versions() -> str:
    import transformers

    return (f"transformers {transformers.__version__}; himap is tested with "
            f"{' and '.join(SUPPORTED_TRANSFORMERS)}")


def _layout_error(what: str) -> LayoutError:
    return LayoutError(f"{what} ({_versions()}). Install a supported transformers release "
                       f"(pip install 'transformers>={SUPPORTED_TRANSFORMERS[0]},"
                       f"<{_next_minor(SUPPORTED_TRANSFORMERS[-1])}') or report the new layout.")


def _next_minor(version: str) -> str:
    major, minor = version.split(".")[:2]
    return f"{major}.{int(minor) + 1}"


@dataclass
class PruneStats:
    """What the last prefill did (per sample b and layer l)."""

    tokens_per_layer: list[list[int]] = field(default_factory=list)  # [B][L] valid tokens entering layer l
    image_tokens_per_layer: list[list[int]] = field(default_factory=list)  # [B][L]
    kept_image_indices: list[list[list[int]]] = field(default_factory=list)  # [stage][B] kept indices into the sample's image tokens
    kv_cache_lengths: list[int] = field(default_factory=list)  # [L] cache length per layer after the last call
    ranking_seconds: float = 0.0  # time spent ranking and gathering in the last prefill
    check_seconds: float = 0.0  # time spent on run-time invariant checks since the last prefill began
    pruned: bool = False  # whether any stage ran
    notes: list[str] = field(default_factory=list)  # e.g. "no image tokens: ran unpruned"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Capture:
    """A pending request for attention rows (and/or keys) inside one layer."""

    layer: int
    rows: torch.Tensor | None  # [B, T] query positions to compute; None: no rows
    valid: torch.Tensor  # [B, T] key positions that are not padding
    reduce: str | None = None  # "column" / "row": reduce while computing (criteria.REDUCTIONS); None: dense rows
    columns: torch.Tensor | None = None  # [B, T] key positions a "row" reduction sums over
    attn: torch.Tensor | None = None  # dense: [B, T, T] filled rows (head mean), the rest zero; reduced: [B, T]
    want_keys: bool = False  # also keep the layer's post-RoPE keys (DART's pivots)
    key: torch.Tensor | None = None  # [B, Hkv, T, D]
    done: bool = False


@dataclass
class _Tokens:
    """The tokens present in a segment of layers, as indices into the original prompt."""

    index: torch.Tensor  # [B, T'] original prompt positions
    valid: torch.Tensor  # [B, T'] real tokens (not padding or filler)
    sets: TokenSets  # S, V, I restricted to these tokens

    def gather(self, local: torch.Tensor, local_valid: torch.Tensor) -> "_Tokens":
        g = lambda t: t.gather(1, local)  # noqa: E731
        valid = g(self.valid) & local_valid
        s = self.sets
        sets = TokenSets(system=g(s.system) & valid, image=g(s.image) & valid,
                         instruction=g(s.instruction) & valid, valid=valid)
        return _Tokens(g(self.index), valid, sets)


@dataclass
class _Segment:
    """Layers [start, end) and the tokens they see. For the call in progress: `mask2d` [B, T'+...]
    marks the keys the segment's layers attend to, `substitute` holds the other layer keyword
    arguments (position embeddings, position ids), and `masks` the mask built from `mask2d` for
    each kind of layer (full or sliding attention) the segment holds, built at its first layer."""

    start: int
    end: int
    tokens: _Tokens
    mask2d: torch.Tensor | None = None
    substitute: dict | None = None
    masks: dict = field(default_factory=dict)

    def record(self) -> "_Segment":
        """The part a later decode step needs: layers and tokens, none of this call's tensors."""
        return _Segment(self.start, self.end, self.tokens)


@dataclass
class _Record:
    """What a pruned prefill left in a cache: its prompt length and segments (kept tokens)."""

    prompt_len: int
    segments: list


@dataclass
class _Call:
    """The decoder call in progress (set by the decoder pre-hook, cleared by its forward hook)."""

    prefill: bool
    mask2d: torch.Tensor  # [B, past + T] bool
    ids: torch.Tensor | None  # [B, T] prompt ids (prefill)
    cache: object = None  # the cache the layers receive
    segments: list = field(default_factory=list)  # [_Segment] from K1 on
    record: _Record | None = None  # decode: the record of the prefill that filled the cache
    stage: int = 0  # next stage to run (prefill)
    tokens: _Tokens | None = None  # tokens present (prefill)
    image_index: torch.Tensor | None = None  # [B, T] index among the sample's visual tokens
    groups: torch.Tensor | None = None  # [B, T] image / video frame of each visual token (per-image quota)
    n_image: list = field(default_factory=list)  # [B] image tokens of each sample's prompt (prefill)
    first_valid: torch.Tensor | None = None  # [B] index of each sample's first prompt token
    multi_axis: bool = False  # the decoder got multi-axis position ids (M-RoPE): no contiguous renumbering
    layer_counts: list = field(default_factory=list)  # [(tokens [B], image tokens [B], layers)] (prefill)


@dataclass(frozen=True)
class _Layout:
    """How the installed transformers calls a decoder and its layers (checked at `apply`)."""

    cache_keyword: str  # "cache" (5.24) or "past_key_values" (5.23)
    mask_builders: tuple  # [L] the masking_utils function that builds each layer's mask


class PruneHandle:
    """Returned by `apply`: the schedule in force and the statistics of the last call."""

    def __init__(self, model, schedule: Schedule, adapter, base_impl: str, sync_timing: bool,
                 replay: list | None, layout: _Layout, quota: str = "sample",
                 row_chunk_bytes: int = ROW_CHUNK_BYTES):
        self.model = model
        self.quota = quota  # "sample": rank over all of a sample's visual tokens; "image": per image / frame
        self.row_chunk_bytes = row_chunk_bytes  # budget of one chunk of ranking rows (reduced_attention)
        self.replay = replay  # kept_image_indices [stage][B] to reuse instead of ranking
        self.schedule = schedule
        self.adapter = adapter
        self.base_impl = base_impl  # the attention implementation the wrapper delegates to
        self.sync_timing = sync_timing  # synchronise CUDA around ranking to time it exactly
        self.layout = layout
        self.stats: PruneStats | None = None
        self._input_ids = None  # recorded by the multimodal pre-hook for the next decoder call
        self._mm_kwargs = {}  # the multimodal call's video inputs (frames per video, per-image quota)
        self._capture: _Capture | None = None
        self._call: _Call | None = None
        self._records = weakref.WeakKeyDictionary()  # cache -> _Record of the prefill that filled it
        self._probing = False  # layers run by the gradient criterion: hooks stand aside
        self._key_check = None  # (layer, [B, Hkv, T', D/2] expected key pair norms): PyramidDrop's check
        self._vision = None  # himap.prune.vision.VisionState when a stage reads the vision tower
        self._hooks = []

    def __repr__(self):
        return f"PruneHandle(schedule={self.schedule!r})"


def _check_next_layer_keys(handle: "PruneHandle", key: torch.Tensor) -> None:
    """Layer K's own keys of the kept tokens must match the ones `next_layer_rows` computed for the
    ranking (up to RoPE, as contiguous positions renumber them); else the layer is not laid out as
    the recomputation assumes (a norm, bias or projection it does not know) and the ranking would be
    silently wrong."""
    layer, expected = handle._key_check
    handle._key_check = None
    got = pair_norms(key.detach())
    tol = 1e-4 if key.dtype == torch.float32 else 3e-2
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=tol, atol=tol * float(expected.abs().max())):
        raise _layout_error(f"PyramidDrop's ranking recomputed layer {layer}'s keys, and they differ from the "
                            f"keys the layer computes itself")


def _base_attention(module, base_impl: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base_impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base_impl]


def _wrapped_attention(module, query, key, value, attention_mask, **kwargs):
    """Registered attention function: the model's own implementation, plus ranking rows in K-1."""
    handle: PruneHandle = module._himap_handle
    cap = handle._capture
    if cap is not None and cap.layer == module.layer_idx and not cap.done and not handle._probing:
        t0 = _clock(query, handle.sync_timing)
        scaling = kwargs.get("scaling") or module.scaling
        if cap.rows is not None and cap.reduce is None:  # a criterion without a reduction reads dense rows
            cap.attn = attention_rows(query, key, cap.rows, cap.valid, scaling)
        elif cap.rows is not None:
            cap.attn = reduced_attention(query, key, cap.rows, cap.valid, scaling, cap.reduce, cap.columns,
                                         handle.row_chunk_bytes)
        if cap.want_keys:
            cap.key = key.detach()
        cap.done = True
        handle.stats.ranking_seconds += _clock(query, handle.sync_timing) - t0
    if handle._key_check is not None and handle._key_check[0] == module.layer_idx and not handle._probing:
        _check_next_layer_keys(handle, key)
    return _base_attention(module, handle.base_impl)(module, query, key, value, attention_mask, **kwargs)


def _clock(tensor: torch.Tensor, sync: bool) -> float:
    if sync and tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()


def _register_wrapper(base_impl: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    if base_impl.startswith(_WRAPPER_PREFIX):
        raise RuntimeError("himap is already applied to this model; call himap.remove(model) first")
    if base_impl not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {base_impl!r} has no mask function; himap supports "
                         f"{', '.join(k for k in ALL_MASK_ATTENTION_FUNCTIONS)}")
    name = _WRAPPER_PREFIX + base_impl
    AttentionInterface.register(name, _wrapped_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_impl])
    return name


# ----------------------------------------------------------------------------- layout

def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _layer_type(config, layer, i: int) -> str:
    """How layer i attends, the way the decoders choose its mask: the layer's own attention_type,
    else the config's layer_types[i] (Qwen2, Qwen2-VL: the decoder indexes its mask dict with it),
    else a sliding window when the config sets one (Mistral), else full causal attention."""
    kind = getattr(layer, "attention_type", None)
    if kind is None and getattr(config, "layer_types", None) is not None:
        kind = config.layer_types[i]
    if kind is None:
        kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return kind


def check_layout(lm) -> _Layout:
    """How `lm`'s forward calls its layers, read from signatures; raises LayoutError for a layout
    this engine does not know (checked at `apply`, before any token is produced)."""
    from transformers import masking_utils

    for part in ("layers", "config", "forward"):
        if not hasattr(lm, part):
            raise _layout_error(f"{type(lm).__name__} has no `{part}`")
    lm_params = _params(lm.forward)
    cache_kw = next((k for k in CACHE_KEYWORDS if k in lm_params), None)
    missing = {"input_ids", "inputs_embeds", "attention_mask"} - lm_params
    if cache_kw is None or missing:
        raise _layout_error(f"{type(lm).__name__}.forward takes {sorted(lm_params)}; expected input_ids, "
                            f"inputs_embeds, attention_mask and a cache keyword ({' or '.join(CACHE_KEYWORDS)})")
    builders = []
    for i, layer in enumerate(lm.layers):
        layer_params = _params(layer.forward)
        need = {"attention_mask", "position_embeddings", cache_kw}
        if not need <= layer_params:
            raise _layout_error(f"decoder layer {i} ({type(layer).__name__}).forward lacks "
                                f"{sorted(need - layer_params)}")
        attn = getattr(layer, "self_attn", None)
        if getattr(attn, "layer_idx", None) != i:
            raise _layout_error(f"decoder layer {i} has no self_attn with layer_idx {i}")
        kind = _layer_type(lm.config, layer, i)
        builder = {"full_attention": "create_causal_mask",
                   "sliding_attention": "create_sliding_window_causal_mask"}.get(kind)
        if builder is None:
            raise _layout_error(f"decoder layer {i} has attention type {kind!r}, which himap does not prune")
        fn = getattr(masking_utils, builder, None)
        if fn is None or not {cache_kw, "layer_idx", "attention_mask", "position_ids"} <= _params(fn):
            raise _layout_error(f"masking_utils.{builder} does not take {cache_kw}= and layer_idx=")
        builders.append(fn)
    return _Layout(cache_kw, tuple(builders))


def _check_version() -> None:
    import transformers

    minor = ".".join(transformers.__version__.split(".")[:2])
    if minor not in SUPPORTED_TRANSFORMERS:
        warnings.warn(f"himap was not tested with {_versions()}; its layout checks passed, and every "
                      f"call is checked at run time", stacklevel=3)


# ----------------------------------------------------------------------------- selection

def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of kept positions, in order and right-aligned, for `keep` [B, T].

    Samples that keep fewer positions than the longest get filler slots at the left (like left
    padding), so every sample's last prompt token stays at the last index. Returns
    (index [B, T'], valid [B, T']).
    """
    t = keep.shape[1]
    pos = torch.arange(t, device=keep.device).expand_as(keep)
    ordered = torch.where(keep, pos, -1).sort(dim=1).values  # dropped (-1) first, kept ascending
    n = int(keep.sum(dim=1).max())
    tail = ordered[:, t - n:]  # [B, T']
    return tail.clamp(min=0), tail >= 0


def _image_index(sets: TokenSets) -> torch.Tensor:
    """[B, T] index of each image token among its sample's image tokens (0..N-1), -1 elsewhere."""
    return torch.where(sets.image, sets.image.long().cumsum(dim=1) - 1, -1)


def _visual_groups(handle: PruneHandle, ids: torch.Tensor, sets: TokenSets) -> torch.Tensor:
    """[B, T] image / video frame of each visual token of the prompt (the per-image quota's groups)."""
    adapter, model = handle.adapter, handle.model
    video_id = adapter.video_token_id(model) if adapter.video_token_id else None
    frames = adapter.video_frames(model, handle._mm_kwargs) if adapter.video_frames else None
    return visual_groups(ids, sets.image, video_id, frames)


def _replay_scores(kept: list[list[int]], tokens: _Tokens, image_index: torch.Tensor) -> torch.Tensor:
    """Scores that select exactly the recorded image indices (1 for kept, 0 otherwise)."""
    idx = image_index.gather(1, tokens.index)  # [B, T'] image index of each present token
    if len(kept) != idx.shape[0]:
        raise ValueError(f"replayed kept set has {len(kept)} samples, the batch has {idx.shape[0]}")
    wanted = torch.zeros_like(idx, dtype=torch.bool)
    for b, k in enumerate(kept):
        wanted[b] = torch.isin(idx[b], torch.tensor(k, dtype=idx.dtype, device=idx.device))
    return criteria._image_only(wanted.float(), tokens.sets)


def _stage_keep(handle: PruneHandle, lm, call: _Call, stage: Stage, hidden: torch.Tensor, kwargs) -> torch.Tensor:
    """[B, T'] positions kept by `stage` among the tokens present: every non-image token and the
    image tokens the criterion (or the replayed indices) chooses, as many as `stage_kept` says.
    A replay must come out exactly as recorded, else it raises."""
    keep = _select(handle, lm, call, stage, hidden, kwargs)
    if handle.replay is not None:
        idx = call.image_index.gather(1, call.tokens.index)  # [B, T'] image index of each present token
        for b, recorded in enumerate(handle.replay[call.stage]):
            got = idx[b][keep[b] & call.tokens.sets.image[b]].tolist()
            if sorted(got) != sorted(set(recorded)):
                raise ValueError(f"replay: stage {call.stage + 1} of {handle.schedule.name} keeps {len(got)} image "
                                 f"tokens of sample {b}, the replayed set names {len(recorded)} (or tokens no "
                                 f"longer present): a replay must fit the schedule's counts")
    return keep


def _select(handle: PruneHandle, lm, call: _Call, stage: Stage, hidden: torch.Tensor, kwargs) -> torch.Tensor:
    """`_stage_keep`'s selection, from the criterion or the replayed indices."""
    tokens = call.tokens
    sets = tokens.sets
    keep_n = [stage_kept(stage, int(n), int(n0)) for n, n0 in zip(sets.image.sum(1).tolist(), call.n_image)]
    if stage.criterion in PEER_CRITERIA:
        with torch.no_grad():
            return _peer_keep(handle, lm, call, stage, hidden, kwargs, keep_n)
    if handle.replay is not None:
        scores = _replay_scores(handle.replay[call.stage], tokens, call.image_index)
    else:
        grad_fn = lambda h: _greedy_loss_grad(handle, lm, h, stage.k, kwargs)  # noqa: E731
        scores = _stage_scores(handle, stage, tokens, hidden, grad_fn)
    if stage.keep is not None:  # a peer's budget with another criterion (random@pdrop-64, ...)
        return criteria.select_top(scores, sets, keep_n)
    groups = call.groups.gather(1, tokens.index) if call.groups is not None else None
    return criteria.select_kept(scores, sets, stage.ratio, stage.drop_all, groups)


def _peer_keep(handle: PruneHandle, lm, call: _Call, stage: Stage, hidden, kwargs, keep_n: list[int]) -> torch.Tensor:
    """`_stage_keep` for the peers' criteria (himap.prune.peers); replayed indices win as for any
    criterion, except that VisionZip's must equal its own selection (it merged around it)."""
    tokens = call.tokens
    sets = tokens.sets
    if stage.criterion == "visionzip" and not stage.drop_all:
        chosen = vision.keep_mask(handle._vision, sets.image)
        if handle.replay is not None and not torch.equal(
                chosen, criteria.select_top(_replay_scores(handle.replay[call.stage], tokens, call.image_index),
                                            sets, keep_n) & sets.image):
            raise ValueError("VisionZip merges the tokens it selects on the vision tower: a replay must keep "
                             "exactly those tokens")
        return ~sets.image | chosen
    if handle.replay is not None or stage.drop_all:
        scores = _replay_scores(handle.replay[call.stage], tokens, call.image_index) if handle.replay is not None \
            else torch.zeros(tokens.valid.shape, device=hidden.device)
        return criteria.select_top(scores, sets, keep_n)
    if stage.criterion == "dart":
        cap = handle._capture
        if cap is None or cap.key is None:
            raise _layout_error(f"layer {stage.k - 1}'s attention did not pass through himap's registered "
                                f"attention function, so DART's keys are missing")
        key_l1 = cap.key.float().abs().sum(dim=(1, 3))  # [B, T] L1 norm over heads and head dims
        pivots = [max(1, int(stage.option("pivot_image") * n0 + 1e-9)) for n0 in call.n_image]
        positions = tokens.index - call.first_valid[:, None]
        return ~sets.image | peers.dart_keep(key_l1, lm.norm(hidden), sets, positions, keep_n, pivots,
                                             int(stage.option("pivot_text")))
    if stage.criterion == "divprune":
        keep = torch.zeros_like(sets.image)
        for b in range(keep.shape[0]):
            img = sets.image[b].nonzero().squeeze(1)
            keep[b, img[peers.divprune_order(hidden[b, img], keep_n[b])]] = True
        return ~sets.image | keep
    rows = criteria.last_prompt_position(sets)  # pdrop
    attn, key = next_layer_rows(lm.layers[stage.k], hidden, _positions(handle, call, kwargs, tokens),
                                rows, tokens.valid, handle.row_chunk_bytes)
    keep = criteria.select_top(peers.pdrop_scores(attn, sets), sets, keep_n)
    local, _ = compact(keep)
    handle._key_check = (stage.k, pair_norms(key.gather(2, local[:, None, :, None].expand(
        -1, key.shape[1], -1, key.shape[-1]))))
    return keep


def _stage_scores(handle: PruneHandle, stage: Stage, tokens: _Tokens, hidden: torch.Tensor, grad_fn) -> torch.Tensor:
    if stage.drop_all:
        return torch.zeros(tokens.valid.shape, device=hidden.device)
    if stage.criterion in criteria.ATTENTION_CRITERIA:
        if handle._capture is None or handle._capture.attn is None:
            raise _layout_error(f"layer {stage.k - 1}'s attention did not pass through himap's registered "
                                f"attention function, so its ranking rows are missing")
        if handle._capture.reduce is not None:
            return criteria.from_reduction(handle._capture.attn, tokens.sets)
        return criteria.ATTENTION_CRITERIA[stage.criterion](handle._capture.attn, tokens.sets)
    if stage.criterion == "random":
        return criteria.random_scores(tokens.sets, stage.seed)
    if stage.criterion == "embed_norm":
        return criteria.embed_norm(hidden, tokens.sets)
    if stage.criterion == "gradient":
        return criteria.gradient(hidden, grad_fn(hidden), tokens.sets)
    raise ValueError(f"unknown criterion {stage.criterion!r}")


# ----------------------------------------------------------------------------- decoder call

def _check_cache(cache) -> None:
    from transformers.cache_utils import DynamicCache

    if cache is not None and not isinstance(cache, DynamicCache):
        raise TypeError(f"himap pruning needs a cache that holds a different length per layer "
                        f"(DynamicCache); got {type(cache).__name__}. Use the default cache "
                        f"(cache_implementation='dynamic').")


def _cache_lengths(cache, num_layers: int) -> list[int]:
    return [int(cache.get_seq_length(i)) for i in range(num_layers)]


def _decoder_pre_hook(handle: PruneHandle, lm, args, kwargs):
    """Start of a decoder call: prefill (rank and prune) or decode step (continue a prefill)."""
    handle._call = None
    handle._capture, handle._key_check = None, None  # nothing a failed call asked for survives it
    if handle._probing:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    cache = kwargs.get(handle.layout.cache_keyword)
    ref = embeds if embeds is not None else ids
    if ref is None:
        return None  # the model's own forward raises for this
    b, t = ref.shape[:2]
    if ids is None:
        ids = handle._input_ids
    handle._input_ids = None
    if handle.schedule.stages:
        _check_cache(cache)
    past = _true_past(handle, cache)
    mask2d = kwargs.get("attention_mask")
    if mask2d is None:
        mask2d = torch.ones((b, past + t), dtype=torch.bool, device=ref.device)
    if mask2d.dim() != 2:
        raise ValueError("himap needs a 2D attention mask [batch, length] to build per-layer masks; "
                         f"got shape {tuple(mask2d.shape)}")
    if past == 0:
        if ids is None or tuple(ids.shape) != (b, t):
            raise ValueError("himap needs the prompt's input_ids to find image tokens; call the model "
                             "with input_ids (not only inputs_embeds)")
        handle._call = _start_prefill(handle, ids, mask2d.bool())
        handle._call.multi_axis = _multi_axis(kwargs)
        return None
    if handle.schedule.stages and ids is not None and tuple(ids.shape) == (b, t) and bool(
            torch.isin(ids, torch.tensor(handle.adapter.visual_token_ids(handle.model), device=ids.device)).any()):
        raise ValueError("image tokens arrived on a cache that already holds tokens: himap ranks and prunes "
                         "them in a prefill (an empty cache); send the image with the prompt's first call")
    call = handle._call = _start_decode(handle, lm, cache, mask2d.bool(), past, t)
    call.multi_axis = _multi_axis(kwargs)
    if call.segments and call.segments[0].start == 0:
        if kwargs.get("position_ids") is None:
            # the library would number this step from layer 0's cache length, which a stage at K = 0 shortened
            pos = torch.arange(past, past + t, device=ref.device)[None].expand(b, t)
            return args, {**kwargs, "position_ids": pos}
        if call.multi_axis and kwargs["position_ids"].shape[0] != 4:
            # generate passes [text; 3 M-RoPE rows] from the 2D mask; 3 rows alone mean the model numbered
            # the step itself, from layer 0's cache, which the stage at K = 0 shortened
            raise ValueError("a decode step after a stage at K = 0 on a multi-axis (M-RoPE) model needs the "
                             "attention_mask (or generate): the model numbers the step from layer 0's pruned "
                             "cache otherwise")
    return None


def _multi_axis(kwargs) -> bool:
    """Whether the decoder call carries multi-axis (M-RoPE) position ids, [axes, B, T]."""
    pos = kwargs.get("position_ids")
    return pos is not None and pos.dim() == 3


def _true_past(handle: PruneHandle, cache) -> int:
    """Tokens already seen: the cache length of layer 0, or, when a stage at K = 0 pruned layer 0,
    the prompt length plus the tokens generated since (layer 0's length minus its pruned prompt)."""
    if cache is None:
        return 0
    past = int(cache.get_seq_length())
    record = handle._records.get(cache)
    if record is not None and record.segments and record.segments[0].start == 0 and past > 0:
        return record.prompt_len + past - record.segments[0].tokens.index.shape[1]
    return past


def _start_prefill(handle: PruneHandle, ids, mask2d) -> _Call:
    sets = token_sets(ids, handle.adapter.visual_token_ids(handle.model), mask2d)
    stats = handle.stats = PruneStats()
    call = _Call(prefill=True, mask2d=mask2d, ids=ids)
    b, t = ids.shape
    call.tokens = _Tokens(torch.arange(t, device=ids.device).expand(b, t), sets.valid, sets)
    call.image_index = _image_index(sets)
    if handle.quota == "image":
        call.groups = _visual_groups(handle, ids, sets)
    call.n_image = sets.image.sum(dim=1).tolist()
    call.first_valid = mask2d.long().argmax(dim=1)  # [B] first True: left padding ends there
    stages = handle.schedule.stages
    if stages and not bool(sets.image.any()):
        stats.notes.append("no image tokens in the prompt: ran unpruned")
        call.stage = len(stages)
    elif stages and not bool(sets.image.any(dim=1).all()):
        stats.notes.append("some samples have no image tokens: nothing pruned in those")
    stats.pruned = call.stage < len(stages)
    _request_rows(handle, call)
    return call


def _start_decode(handle: PruneHandle, lm, cache, mask2d, past: int, t: int) -> _Call:
    t0 = time.perf_counter()
    if handle.stats is None:
        handle.stats = PruneStats()
    try:
        return _check_decode(handle, cache, mask2d, past, t, _cache_lengths(cache, len(lm.layers)))
    finally:
        handle.stats.check_seconds += time.perf_counter() - t0


def _check_decode(handle: PruneHandle, cache, mask2d, past: int, t: int, lengths: list[int]) -> _Call:
    """A decode step's call, after checking it continues a cache a prefill under this handle filled,
    layer by layer (each cache keeps the record of its own prefill)."""
    record = handle._records.get(cache)
    if record is None:
        if handle.schedule.stages:
            raise RuntimeError("this decode step continues a cache that no prefill under himap filled, so "
                               "himap has no record of which tokens each layer holds; prefill again")
        if len(set(lengths)) > 1:
            raise RuntimeError("this cache was pruned by a different call (per-layer lengths differ) and "
                               "himap has no record of its kept tokens; start from a fresh cache")
        return _Call(prefill=False, mask2d=mask2d, ids=None, cache=cache)
    if mask2d.shape[1] != past + t:
        raise ValueError(f"the attention mask covers {mask2d.shape[1]} positions; the cache holds {past} "
                         f"tokens and the step brings {t}")
    expected = _expected_lengths(record.prompt_len, record.segments, len(lengths), past - record.prompt_len)
    if lengths != expected:
        raise RuntimeError(f"per-layer cache lengths {lengths} differ from the pruned prefill's "
                           f"{expected} ({_versions()})")
    return _Call(prefill=False, mask2d=mask2d, ids=None, cache=cache, record=record,
                 segments=[s.record() for s in record.segments])


def _expected_lengths(prompt_len: int, segments: list, num_layers: int, generated: int = 0) -> list[int]:
    """Per-layer cache lengths the schedule gives: the prompt in the layers before K1, each segment's
    kept tokens in its layers, plus the tokens generated since the prefill everywhere."""
    expected = [prompt_len + generated] * num_layers
    for seg in segments:
        expected[seg.start:seg.end] = [seg.tokens.index.shape[1] + generated] * (seg.end - seg.start)
    return expected


def _request_rows(handle: PruneHandle, call: _Call) -> None:
    """Ask the attention wrapper for the rows the next stage's criterion reads (layer K-1)."""
    handle._capture = None
    stages = handle.schedule.stages
    if call.stage >= len(stages) or handle.replay is not None:
        return
    stage = stages[call.stage]
    if stage.criterion in criteria.ATTENTION_CRITERIA and not stage.drop_all:
        sets = call.tokens.sets
        reduce = criteria.REDUCTIONS.get(stage.criterion)
        handle._capture = _Capture(stage.k - 1, criteria.needed_rows(stage.criterion, sets), call.tokens.valid,
                                   reduce, sets.image if reduce == "row" else None)
    elif stage.criterion == "dart" and not stage.drop_all:
        handle._capture = _Capture(stage.k - 1, None, call.tokens.valid, want_keys=True)


def _layer_pre_hook(handle: PruneHandle, lm, layer_idx: int, args, kwargs):
    """Before decoder layer `layer_idx`: prune at a stage boundary, substitute in pruned segments."""
    call = handle._call
    if call is None or handle._probing:
        return None
    if layer_idx == 0:
        for key in ("attention_mask", "position_embeddings", handle.layout.cache_keyword):
            if key not in kwargs:
                raise _layout_error(f"the decoder called layer 0 without `{key}=`")
        call.cache = kwargs[handle.layout.cache_keyword]
    stages = handle.schedule.stages
    if call.prefill and call.stage < len(stages) and stages[call.stage].k == layer_idx:
        hidden = _prune(handle, lm, call, args[0] if args else kwargs["hidden_states"], kwargs)
        args, kwargs = _with_hidden(args, kwargs, hidden)
    seg = next((s for s in call.segments if s.start <= layer_idx < s.end), None)
    if seg is None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    if seg.substitute is None:  # a decode step's first layer of this segment
        _decode_substitute(handle, lm, call, seg, hidden, kwargs)
    builder = handle.layout.mask_builders[layer_idx]
    if builder not in seg.masks:  # the first layer of this kind (full / sliding attention) in the segment
        seg.masks[builder] = _build_mask(handle, lm, layer_idx, hidden, seg.mask2d, call.cache)
    return args, {**kwargs, **seg.substitute, "attention_mask": seg.masks[builder]}


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _gather_positions(position_embeddings, index: torch.Tensor):
    """The library's (cos, sin) for the kept tokens: each [B|1, T, D] gathered to [B, T', D]."""
    out = []
    for pe in position_embeddings:
        if pe.dim() != 3:
            raise _layout_error(f"position embeddings of shape {tuple(pe.shape)}; expected [batch, tokens, dim]")
        pe = pe.expand(index.shape[0], -1, -1)
        out.append(pe.gather(1, index[..., None].expand(-1, -1, pe.shape[-1])))
    return tuple(out)


def _positions(handle: PruneHandle, call: _Call, kwargs, tokens: _Tokens):
    """(cos, sin) of `tokens` in a prefill: the library's values at their original positions, or
    (positions="contiguous") at the index whose position is the token's rank among the sample's
    kept tokens, counted from its first prompt token (positions grow by one per valid index)."""
    index = tokens.index
    if handle.schedule.positions == "contiguous":
        if call.multi_axis or (kwargs.get("position_ids") is not None and kwargs["position_ids"].dim() != 2):
            raise _layout_error(f"{handle.schedule.name}: contiguous positions need one position per token "
                                f"(1D RoPE) and this model passes multi-axis position ids; run "
                                f"pos=original@{handle.schedule.name} (the kept tokens' own positions)")
        rank = tokens.valid.long().cumsum(dim=1) - 1  # [B, T'] rank among the valid kept tokens
        index = torch.where(tokens.valid, call.first_valid[:, None] + rank, index)
    return _gather_positions(kwargs["position_embeddings"], index)


def _build_mask(handle: PruneHandle, lm, layer_idx: int, hidden, mask2d, cache):
    builder = handle.layout.mask_builders[layer_idx]
    # position_ids=None: gapped kept positions must not be mistaken for packed sequences.
    return builder(config=lm.config, inputs_embeds=hidden, attention_mask=mask2d,
                   position_ids=None, layer_idx=layer_idx, **{handle.layout.cache_keyword: cache})


def _prune(handle: PruneHandle, lm, call: _Call, hidden, kwargs):
    """Stage `call.stage` at its layer K: score, keep, gather; returns the kept hidden states."""
    stage = handle.schedule.stages[call.stage]
    stats, tokens, num_layers = handle.stats, call.tokens, len(lm.layers)
    t0 = _clock(hidden, handle.sync_timing)
    _record_layers(call, stage.k)
    keep = _stage_keep(handle, lm, call, stage, hidden, kwargs)
    local, local_valid = compact(keep)
    hidden = hidden.gather(1, local[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, T', d]
    tokens = call.tokens = tokens.gather(local, local_valid)
    kept = call.image_index.gather(1, tokens.index)
    stats.kept_image_indices.append([kept[i][tokens.sets.image[i]].tolist() for i in range(kept.shape[0])])
    call.stage += 1
    end = handle.schedule.stages[call.stage].k if call.stage < len(handle.schedule.stages) else num_layers
    seg_mask2d = call.mask2d.gather(1, tokens.index) & tokens.valid
    substitute = {"position_embeddings": _positions(handle, call, kwargs, tokens), "position_ids": None}
    call.segments.append(_Segment(stage.k, end, tokens, seg_mask2d, substitute))
    _request_rows(handle, call)
    stats.ranking_seconds += _clock(hidden, handle.sync_timing) - t0
    return hidden


def _record_layers(call: _Call, end: int) -> None:
    """Note the tokens present in layers [segment start, end) (statistics)."""
    start = call.segments[-1].start if call.segments else 0
    call.layer_counts.append((call.tokens.valid.sum(1).tolist(), call.tokens.sets.image.sum(1).tolist(),
                              end - start))


def _per_layer(rows: list, column: int) -> list[list[int]]:
    """[(tokens per sample, image tokens per sample, layers)] -> [B][L] for one column."""
    per_layer = [row[column] for row in rows for _ in range(row[2])]
    return [list(x) for x in zip(*per_layer)]


def _decode_substitute(handle: PruneHandle, lm, call: _Call, seg: _Segment, hidden, kwargs) -> None:
    """A decode step's keys for a segment's layers (`seg.mask2d`): the kept prompt columns, then
    every later one. With contiguous positions also the RoPE of the step's tokens: their true
    positions minus the prompt tokens this segment no longer holds (PyramidDrop shifts decode
    positions the same way)."""
    p = call.record.prompt_len
    prompt_part = call.mask2d[:, :p].gather(1, seg.tokens.index) & seg.tokens.valid
    seg.mask2d = torch.cat([prompt_part, call.mask2d[:, p:]], dim=1)
    out = {"position_ids": None}
    if handle.schedule.positions == "contiguous":
        pos = kwargs.get("position_ids")
        if call.multi_axis or pos is None or pos.dim() != 2:
            raise _layout_error(f"{handle.schedule.name}: contiguous positions need the decoder to pass 1D position "
                                f"ids to its layers; run pos=original@{handle.schedule.name}")
        dropped = call.mask2d[:, :p].sum(dim=1) - prompt_part.sum(dim=1)  # [B]
        out["position_embeddings"] = lm.rotary_emb(hidden, position_ids=pos - dropped[:, None])
    seg.substitute = out


def _greedy_loss_grad(handle: PruneHandle, lm, hidden, k: int, kwargs):
    """dL/dh for h entering layer K, L the cross-entropy of the model's own greedy next token,
    through the remaining layers run on every token present, without cache (gradient criterion)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("the gradient criterion needs autograd: run under torch.no_grad(), "
                           "not torch.inference_mode()")
    call = handle._call
    tokens = call.tokens
    mask2d = call.mask2d.gather(1, tokens.index) & tokens.valid
    pos = _positions(handle, call, kwargs, tokens)
    handle._probing = True
    try:
        with torch.enable_grad():
            h0 = hidden.detach().requires_grad_(True)
            masks, h = {}, h0
            for i in range(k, len(lm.layers)):
                builder = handle.layout.mask_builders[i]
                if builder not in masks:
                    masks[builder] = _build_mask(handle, lm, i, h0, mask2d, None)
                h = lm.layers[i](h, attention_mask=masks[builder], position_embeddings=pos)
            logits = handle.adapter.lm_head(handle.model)(lm.norm(h[:, -1])).float()  # [B, V]
            loss = torch.nn.functional.cross_entropy(logits, logits.argmax(-1), reduction="sum")
            return torch.autograd.grad(loss, h0)[0]
    finally:
        handle._probing = False


def _decoder_hook(handle: PruneHandle, lm, args, kwargs, output):
    """End of a decoder call: check per-layer cache lengths against the schedule, record stats."""
    call, handle._call = handle._call, None
    handle._capture = None
    if call is None:
        return None
    num_layers = len(lm.layers)
    stats = handle.stats
    if call.prefill:
        _record_layers(call, num_layers)
        stats.tokens_per_layer = _per_layer(call.layer_counts, 0)
        stats.image_tokens_per_layer = _per_layer(call.layer_counts, 1)
    cache = call.cache
    if cache is None:
        return None
    t0 = time.perf_counter()
    lengths = _cache_lengths(cache, num_layers)
    if call.prefill:
        expected = _expected_lengths(call.ids.shape[1], call.segments, num_layers)
        if lengths != expected:
            raise RuntimeError(f"after the pruned prefill the per-layer cache lengths are {lengths}, the "
                               f"schedule gives {expected} ({_versions()})")
        handle._records[cache] = _Record(call.ids.shape[1], [seg.record() for seg in call.segments])
    stats.kv_cache_lengths = lengths
    stats.check_seconds += time.perf_counter() - t0
    return None


# ----------------------------------------------------------------------------- public API

QUOTAS = ("sample", "image")
"""How a stage's keep budget is shared: "sample" ranks over all of a sample's visual tokens (the
paper's rule, applied to every image and frame together); "image" keeps n_g - floor(R * n_g) of
each image or video frame g."""


def apply(model, method: "str | Schedule" = "himap", *, sync_timing: bool = False,
          replay: list | None = None, quota: str = "sample", row_chunk_bytes: int = ROW_CHUNK_BYTES) -> PruneHandle:
    """Attach a pruning schedule (preset name or Schedule) to `model` in place; return its handle.

    Every layer keeps its attention implementation; `model.generate` and `model(...)` prune once
    per prefill. Raises for unsupported model classes, layouts and schedules that do not fit the
    model. `sync_timing` synchronises CUDA around the ranking so stats.ranking_seconds is exact.
    `replay` (a previous stats.kept_image_indices) keeps exactly those image tokens at each stage
    instead of ranking: the same pruning on another implementation, batch or sequence.
    `quota` (QUOTAS) shares each stage's budget per sample or per image / video frame;
    `row_chunk_bytes` bounds the memory of one chunk of ranking rows (reduced_attention).
    """
    adapter = find_adapter(model)
    schedule = get_schedule(method)
    if quota not in QUOTAS:
        raise ValueError(f"unknown quota {quota!r}; choose one of {', '.join(QUOTAS)}")
    lm = adapter.language_model(model)
    layout = check_layout(lm)
    _check_version()
    schedule.validate_for(len(lm.layers))
    schedule = schedule.for_layers(len(lm.layers))
    if adapter.check is not None:
        adapter.check(model, schedule)
    _check_peer_layout(lm, schedule)
    if quota == "image" and any(st.keep is not None for st in schedule.stages):
        raise ValueError(f"quota='image' shares a stage's drop ratio per image; {schedule.name}'s stages keep a "
                         f"budget per sample (VisionZip selects per image by itself): use quota='sample'")
    if replay is not None and len(replay) != len(schedule.stages):
        raise ValueError(f"replay has {len(replay)} stage(s), the schedule has {len(schedule.stages)}")
    if getattr(lm, "_himap_handle", None) is not None:
        raise RuntimeError("himap is already applied to this model; call himap.remove(model) first")
    base_impl = lm.config._attn_implementation or "eager"
    name = _register_wrapper(base_impl)
    handle = PruneHandle(model, schedule, adapter, base_impl, sync_timing, replay, layout, quota, row_chunk_bytes)
    lm._himap_handle = handle
    try:
        _attach(handle, model, lm, adapter, schedule, name)
    except BaseException:
        _detach(model, lm, handle)  # never a half-applied model
        raise
    return handle


def _attach(handle: PruneHandle, model, lm, adapter, schedule: Schedule, name: str) -> None:
    """The hooks, the vision tower's hooks (VisionZip) and the registered attention function."""
    for layer in lm.layers:
        layer.self_attn._himap_handle = handle
    hooks = handle._hooks
    hooks.append(adapter.multimodal_model(model).register_forward_pre_hook(
        lambda mod, args, kw: _record_multimodal_call(handle, args, kw), with_kwargs=True))
    if schedule.stages:
        hooks.append(model.register_forward_pre_hook(_refuse_labels, with_kwargs=True))
    hooks.append(lm.register_forward_pre_hook(
        lambda mod, args, kw: _decoder_pre_hook(handle, mod, args, kw), with_kwargs=True))
    hooks.append(lm.register_forward_hook(
        lambda mod, args, kw, out: _decoder_hook(handle, mod, args, kw, out), with_kwargs=True))
    for i, layer in enumerate(lm.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda mod, args, kw, i=i: _layer_pre_hook(handle, lm, i, args, kw), with_kwargs=True))
    zipped = [st for st in schedule.stages if st.criterion == "visionzip"]
    if zipped:
        handle._vision, vision_hooks = vision.attach(handle, model, adapter, zipped[0])
        hooks += vision_hooks
    model.set_attn_implementation({"text_config": name})


def _record_multimodal_call(handle: PruneHandle, args, kwargs) -> None:
    """The multimodal model's call: its input_ids (the decoder gets only embeddings) and video inputs."""
    handle._input_ids = kwargs.get("input_ids", args[0] if args else None)
    videos = kwargs.get("pixel_values_videos")  # only its shape is read: keep no pixels past the call
    handle._mm_kwargs = {"video_grid_thw": kwargs.get("video_grid_thw"),
                         "pixel_values_videos": videos.to("meta") if videos is not None else None}


def _check_peer_layout(lm, schedule: Schedule) -> None:
    """Raise at apply when a peer criterion needs a part the decoder does not have."""
    for st in schedule.stages:
        if st.criterion == "pdrop":
            layer = lm.layers[st.k]
            attn = getattr(layer, "self_attn", None)
            missing = [n for n in ("input_layernorm",) if not hasattr(layer, n)]
            missing += [f"self_attn.{n}" for n in ("q_proj", "k_proj", "head_dim", "scaling") if not hasattr(attn, n)]
            if not hasattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb"):
                missing.append(f"{type(attn).__module__}.apply_rotary_pos_emb")
            if missing:
                raise _layout_error(f"PyramidDrop recomputes layer {st.k}'s queries and keys, and "
                                    f"{type(layer).__name__} lacks {', '.join(missing)}")
        if st.criterion == "visionzip" and sum(s.criterion == "visionzip" for s in schedule.stages) > 1:
            raise ValueError("a schedule takes one visionzip stage")


def _refuse_labels(module, args, kwargs):
    if kwargs.get("labels") is not None:
        raise ValueError("himap drops image tokens inside the decoder, so per-token labels no longer line up "
                         "with the logits; compute the loss without pruning (or from the last position's logits)")


def remove(model) -> None:
    """Detach himap from `model`: no hooks, the original attention implementation."""
    adapter = find_adapter(model)
    lm = adapter.language_model(model)
    handle = getattr(lm, "_himap_handle", None)
    if handle is None:
        return
    _detach(model, lm, handle)
    model.set_attn_implementation({"text_config": handle.base_impl})


def _detach(model, lm, handle: PruneHandle) -> None:
    for h in handle._hooks:
        h.remove()
    handle._hooks.clear()
    for layer in lm.layers:
        layer.self_attn.__dict__.pop("_himap_handle", None)
    lm.__dict__.pop("_himap_handle", None)


@contextlib.contextmanager
def pruned(model, method: "str | Schedule" = "himap", **kwargs):
    """`with himap.pruned(model, "himap") as handle:` applies a schedule for the block only."""
    handle = apply(model, method, **kwargs)
    try:
        yield handle
    finally:
        remove(model)


@contextlib.contextmanager
def maybe_pruned(model, method: "str | Schedule" = "himap", **kwargs):
    """`pruned`, except that a schedule without stages (vanilla) leaves the model untouched and
    yields None: the unmodified model, the baseline that timings and FLOP counts compare with."""
    schedule = get_schedule(method)
    if not schedule.stages:
        yield None
        return
    with pruned(model, schedule, **kwargs) as handle:
        yield handle
