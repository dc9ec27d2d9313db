"""Pruning methods as schedules of stages (SPEC section 2).

A stage (K, R, criterion) means: layers 0..K-1 see the tokens present before the stage, the
ranking reads the attention computed inside layer K-1, and layers K..L-1 run without the
floor(R * n) lowest-scoring image tokens (n = image tokens still present before the stage).
A schedule is an ordered tuple of stages with strictly increasing K. The empty schedule is
vanilla.

Peer methods (docs/peers.md) use the same form with three additions: K = 0 (a stage before the
LLM, for criteria that read no decoder attention), `keep` (the fraction of the sample's image
tokens that remains after the stage, instead of a ratio of those present) and `options` (the
criterion's own settings). `Schedule.positions` says whether kept tokens keep their RoPE positions
(HiMAP, FastV, DART) or are renumbered contiguously (PyramidDrop, VisionZip, DivPrune), and
`Schedule.depth` the decoder depth the layer indices were written for (peers: 32, LLaVA-1.5-7B).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

CRITERIA = ("phi_sh", "phi_dp", "phi_dp_row", "phi_last", "random", "embed_norm", "gradient",
            "pdrop", "dart", "divprune", "visionzip")
"""Names of the ranking criteria (himap.prune.criteria; the peers' in himap.prune.peers). `gradient`
needs autograd at layer K-1."""

PEER_CRITERIA = ("pdrop", "dart", "divprune", "visionzip")
"""The peer methods' selection rules (himap.prune.peers), each with its own keep budget."""

PRE_LLM_CRITERIA = ("random", "embed_norm", "divprune", "visionzip")
"""Criteria a stage at K = 0 (before the first decoder layer) may use: none reads decoder attention."""

PEER_OPTIONS = {"visionzip": {"dominant", "merge"}, "dart": {"pivot_image", "pivot_text"}}
"""Options each peer criterion takes (himap.prune.peers documents them); others take none."""

PEER_DEFAULTS = {"dart": {"pivot_image": 4 / 576, "pivot_text": 4}}
"""Option values a stage gets when it does not set them (DART's paper: 4 image and 4 text pivots of
LLaVA-1.5's 576 image tokens), so `--criterion dart` on any schedule runs."""

POSITIONS = ("original", "contiguous")
"""RoPE positions of the kept tokens: their original ones, or renumbered 0, 1, 2, ... in order."""


@dataclass(frozen=True)
class Stage:
    """One pruning stage."""

    k: int  # layers 0..k-1 keep the tokens; ranking uses layer k-1's attention; k >= 1 (0: before the LLM)
    ratio: float  # fraction of the image tokens still present that this stage drops, in [0, 1)
    criterion: str = "phi_sh"  # one of CRITERIA
    seed: int = 0  # seed of the `random` criterion (ignored by the others)
    drop_all: bool = False  # drop every remaining image token (ratio ignored); for probing experiments
    keep: float | None = None  # fraction of the sample's image tokens left after the stage (ratio must be 0)
    options: tuple = ()  # (name, value) pairs of the criterion's settings (PEER_OPTIONS)

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"stage K must be an integer >= 1 (layer K-1 ranks), got {self.k!r}")
        if not (0.0 <= float(self.ratio) < 1.0):
            raise ValueError(f"stage ratio R must lie in [0, 1), got {self.ratio!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.k == 0 and self.criterion not in PRE_LLM_CRITERIA:
            raise ValueError(f"stage K must be an integer >= 1 (layer K-1 ranks), got 0; K = 0 (before the "
                             f"LLM) takes only {', '.join(PRE_LLM_CRITERIA)}, not {self.criterion!r}")
        if self.criterion == "visionzip" and self.k != 0:
            raise ValueError("the visionzip criterion reads the vision tower: it runs before the LLM (K = 0)")
        if self.keep is not None and not (0.0 < self.keep <= 1.0 and self.ratio == 0):
            raise ValueError(f"stage keep must lie in (0, 1] with ratio 0, got keep={self.keep!r} "
                             f"ratio={self.ratio!r}")
        object.__setattr__(self, "options", tuple((str(k), v) for k, v in dict(self.options).items()))
        unknown = set(dict(self.options)) - PEER_OPTIONS.get(self.criterion, set())
        if unknown:
            raise ValueError(f"criterion {self.criterion!r} takes no option(s) {sorted(unknown)}; it takes "
                             f"{sorted(PEER_OPTIONS.get(self.criterion, set())) or 'none'}")

    def option(self, name: str, default=None):
        """The value of option `name`: the stage's own, else the criterion's default
        (PEER_DEFAULTS), else `default`."""
        return dict(self.options).get(name, PEER_DEFAULTS.get(self.criterion, {}).get(name, default))


@dataclass(frozen=True)
class Schedule:
    """An ordered list of stages; `name` is only a label for tables."""

    stages: tuple[Stage, ...] = ()
    name: str = "custom"
    positions: str = "original"  # RoPE positions of kept tokens (POSITIONS)
    depth: int | None = None  # decoder depth the K values were written for; None: use them as they are

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        for a, b in zip(self.stages, self.stages[1:]):
            if b.k <= a.k:
                raise ValueError(
                    f"stage K values must increase strictly (K2 > K1), got K={a.k} then K={b.k}"
                )
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")

    def for_layers(self, num_layers: int) -> "Schedule":
        """This schedule on a decoder of `num_layers` layers. A schedule with a `depth` whose K values
        do not fit (some K >= num_layers) gets them scaled to K * num_layers / depth (rounded half up;
        K >= 1 stays >= 1, K values stay strictly increasing); every other schedule is returned as it is.
        So LLaVA-1.5 runs the peers' published layers, and a shallower model (the built-in one) the
        same fractions of its depth."""
        if self.depth is None or all(s.k < num_layers for s in self.stages):
            return self
        ks, prev = [], -1
        for s in self.stages:
            k = math.floor(s.k * num_layers / self.depth + 0.5)
            k = max(k, 1 if s.k >= 1 else 0, prev + 1)
            ks.append(k)
            prev = k
        stages = tuple(dataclasses.replace(s, k=k) for s, k in zip(self.stages, ks))
        return dataclasses.replace(self, stages=stages)

    def validate_for(self, num_layers: int) -> None:
        """Raise if a stage's K does not leave at least one layer to prune (K < num_layers), after
        `for_layers`."""
        for s in self.for_layers(num_layers).stages:
            if s.k >= num_layers:
                raise ValueError(
                    f"stage K={s.k} must be smaller than the number of decoder layers ({num_layers})"
                )

    def replace_stage(self, index: int, **changes) -> "Schedule":
        """A copy with stage `index` (0-based) changed, e.g. replace_stage(1, k=15)."""
        if not 0 <= index < len(self.stages):
            raise ValueError(f"schedule {self.name!r} has {len(self.stages)} stage(s); no stage {index + 1}")
        stages = list(self.stages)
        stages[index] = dataclasses.replace(stages[index], **changes)
        return dataclasses.replace(self, stages=tuple(stages))


def kept_count(n: int, ratio: float, drop_all: bool = False) -> int:
    """Tokens kept when a stage drops floor(ratio * n) of n (SPEC section 2)."""
    return 0 if drop_all else n - math.floor(ratio * n + 1e-9)


def stage_kept(stage: Stage, n_present: int, n_image: int) -> int:
    """Image tokens a stage keeps of the n_present still there, n_image being the sample's image
    tokens in the prompt: floor(keep * n_image) (at least 1, at most n_present) when the stage has a
    `keep`, else kept_count(n_present, ratio)."""
    if stage.keep is None or stage.drop_all:
        return kept_count(n_present, stage.ratio, stage.drop_all)
    if n_present == 0:
        return 0
    return min(n_present, max(1, math.floor(stage.keep * n_image + 1e-9)))


def drop_all_from(k: int) -> Schedule:
    """Every image token removed from layer k on (layers 0..k-1 see them): probes where visual
    information has moved into the text tokens."""
    return Schedule((Stage(k, 0.0, "phi_sh", drop_all=True),), name=f"drop-all@{k}")


def image_tokens_per_layer(schedule: Schedule, n_image: int, num_layers: int) -> list[int]:
    """Number of image tokens entering each decoder layer 0..num_layers-1 under `schedule`
    (after `Schedule.for_layers`)."""
    schedule.validate_for(num_layers)
    counts, n, stages = [], n_image, list(schedule.for_layers(num_layers).stages)
    for layer in range(num_layers):
        while stages and stages[0].k == layer:
            n = stage_kept(stages.pop(0), n, n_image)
        counts.append(n)
    return counts


PRESETS: dict[str, Schedule] = {
    "vanilla": Schedule((), name="vanilla"),
    "fastv": Schedule((Stage(2, 0.5, "phi_last"),), name="fastv"),
    "himap": Schedule((Stage(2, 0.5, "phi_sh"), Stage(8, 0.75, "phi_dp")), name="himap"),
    "himap-caption": Schedule((Stage(2, 0.5, "phi_sh"), Stage(15, 0.75, "phi_dp")), name="himap-caption"),
    "himap-13b": Schedule((Stage(3, 0.5, "phi_sh"), Stage(8, 0.75, "phi_dp")), name="himap-13b"),
    "himap-13b-caption": Schedule(
        (Stage(3, 0.5, "phi_sh"), Stage(15, 0.75, "phi_dp")), name="himap-13b-caption"
    ),
    "himap-13b-official": Schedule(
        (Stage(2, 0.5, "phi_sh"), Stage(8, 0.75, "phi_dp")), name="himap-13b-official"
    ),
    "random": Schedule((Stage(2, 0.5, "random"), Stage(8, 0.75, "random")), name="random"),
}
"""Named presets (SPEC section 2, paper Table 3). `random` is HiMAP's schedule with random ranking.
`himap-13b` follows the paper's tables for LLaVA-1.5-13B (K1=3); `himap-13b-official` is what the
official 13B script runs (src/HiMAP/inference/eval_scivqa.sh: --hmap-v-attn-txt-layer 2, i.e. K1=2,
the 7B stages) and what its README's 13B ScienceQA numbers come from (docs/official-code.md).
The peers' presets are added below (PEER_PRESETS)."""

# ----------------------------------------------------------------------------- peers (docs/peers.md)

LLAVA_IMAGE_TOKENS = 576
"""Image tokens of LLaVA-1.5 (336 px, 14 px patches): the peers' budgets are counts of these."""
LLAVA_LAYERS = 32
"""Decoder layers of LLaVA-1.5-7B: the depth the peers' layer indices are written for."""
PEER_BUDGETS = (192, 128, 64)
"""Kept-token budgets the peers publish for LLaVA-1.5 (of 576); other token counts scale by fraction."""


def pyramid_lambda(avg_fraction: float, layers: tuple, num_layers: int = LLAVA_LAYERS) -> float:
    """PyramidDrop's lambda for a target average share of image tokens over the layers.

    With stage boundaries l1 < l2 < ... (layers l_s.. keep lambda^s of the image tokens), the
    average over the L layers is (l1 + sum_s (l_{s+1} - l_s) lambda^s) / L; the authors pick
    lambda so that this average equals the budget (PyramidDrop issues #10, #29: lambda = 0.19 with
    layers 2, 8, 16 for 64 of 576 tokens). Solved by bisection (the average grows with lambda)."""
    bounds = (0, *layers, num_layers)
    avg = lambda lam: sum((bounds[i + 1] - bounds[i]) * lam ** i for i in range(len(bounds) - 1)) / num_layers  # noqa: E731
    if not avg(0.0) <= avg_fraction <= 1.0:
        raise ValueError(f"layers {layers} cannot reach an average of {avg_fraction:.3f} of the image tokens")
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if avg(mid) < avg_fraction else (lo, mid)
    return (lo + hi) / 2


def _pdrop(name: str, layers: tuple, lam: float) -> Schedule:
    """PyramidDrop: at each K in `layers`, keep lambda^s of the image tokens (s = 1, 2, ...) ranked by
    the last instruction token's attention in layer K (the layer that first runs without them)."""
    stages = tuple(Stage(k, 0.0, "pdrop", keep=lam ** (i + 1)) for i, k in enumerate(layers))
    return Schedule(stages, name=name, positions="contiguous", depth=LLAVA_LAYERS)


def _visionzip(name: str, kept: int, dominant: int) -> Schedule:
    """VisionZip: `dominant` patches by [CLS] attention plus kept - dominant contextual tokens."""
    n = LLAVA_IMAGE_TOKENS
    stage = Stage(0, 0.0, "visionzip", keep=kept / n, options=(("dominant", dominant / n), ("merge", "official")))
    return Schedule((stage,), name=name, positions="contiguous", depth=LLAVA_LAYERS)


def _dart(name: str, truncation: int, k: int = 2, pivot_image: int = 4, pivot_text: int = 4) -> Schedule:
    """DART at layer K: 4 image and 4 text pivots by key L1 norm, each keeping the image tokens least
    similar to it; `truncation` (max_num_trunction) tokens are chosen, plus the image pivots."""
    n = LLAVA_IMAGE_TOKENS
    stage = Stage(k, 0.0, "dart", keep=(truncation + pivot_image) / n,
                  options=(("pivot_image", pivot_image / n), ("pivot_text", pivot_text)))
    return Schedule((stage,), name=name, positions="original", depth=LLAVA_LAYERS)


def _divprune(name: str, keep: float) -> Schedule:
    """DivPrune: a max-min diverse subset of the visual tokens, before the LLM."""
    stage = Stage(0, 0.0, "divprune", keep=keep)
    return Schedule((stage,), name=name, positions="contiguous", depth=LLAVA_LAYERS)


def _peer_presets() -> dict[str, Schedule]:
    n = LLAVA_IMAGE_TOKENS
    out = {"pdrop": _pdrop("pdrop", (8, 16, 24), 0.5)}
    for b in PEER_BUDGETS:
        out[f"pdrop-{b}"] = _pdrop(f"pdrop-{b}", (2, 8, 16), pyramid_lambda(b / n, (2, 8, 16)))
    out["visionzip"] = _visionzip("visionzip", 64, 54)
    for b, dominant in zip(PEER_BUDGETS, (162, 108, 54)):
        out[f"visionzip-{b}"] = _visionzip(f"visionzip-{b}", b, dominant)
    out["dart"] = _dart("dart", 128)
    for b in PEER_BUDGETS:
        out[f"dart-{b}"] = _dart(f"dart-{b}", b)
    out["divprune"] = _divprune("divprune", 0.098)
    for b in PEER_BUDGETS:
        out[f"divprune-{b}"] = _divprune(f"divprune-{b}", b / n)
    return out


PEER_PRESETS: dict[str, Schedule] = _peer_presets()
"""The peers' defaults and their published budgets (docs/peers.md): pdrop (layers 8, 16, 24,
lambda 0.5), visionzip (54 dominant + 10 contextual), dart (K=2, 128 + 4 pivots), divprune
(9.8% kept), and <name>-192/128/64. SparseVLM is not offered (docs/peers.md says why)."""
PRESETS.update(PEER_PRESETS)


def get_schedule(method: "str | Schedule") -> Schedule:
    """A Schedule from a preset name or a Schedule (returned unchanged)."""
    if isinstance(method, Schedule):
        return method
    if isinstance(method, str) and method in PRESETS:
        return PRESETS[method]
    raise ValueError(f"unknown method {method!r}; presets: {', '.join(PRESETS)} (or pass a himap.Schedule)")


REFERENCE_LAYERS = 32
"""Decoder depth the presets were set for (LLaVA-1.5-7B, paper Table 3)."""
PRESET_LAYERS = {"himap-13b": 40, "himap-13b-caption": 40}
"""Presets set for another depth (LLaVA-1.5-13B)."""


def fit_to_depth(schedule: Schedule, num_layers: int, reference_layers: int | None = None) -> Schedule:
    """`schedule` itself when every K is below `num_layers`; otherwise its K values scaled to the
    model's depth by `Schedule.for_layers` (K' = K * num_layers / depth, rounded half up, kept >= 1
    and strictly increasing; ratios and criteria unchanged). The depth is `reference_layers`, else
    the schedule's own `depth`, else the one the preset was set for (32, or 40 for the -13b
    presets). So a paper preset runs on a shallow model (the built-in one has 10 layers:
    himap-caption's K=(2, 15) becomes (1, 5)) at the same relative depths; callers should say so
    (the CLI prints a note). Raises when the scaled K values still do not fit."""
    if all(s.k < num_layers for s in schedule.stages):
        return schedule
    depth = reference_layers or schedule.depth or PRESET_LAYERS.get(schedule.name.split("@")[-1], REFERENCE_LAYERS)
    fitted = dataclasses.replace(schedule, depth=depth).for_layers(num_layers)
    if any(s.k >= num_layers for s in fitted.stages):
        raise ValueError(f"{schedule.name!r} (K={tuple(x.k for x in schedule.stages)}) cannot be scaled "
                         f"to a model with {num_layers} decoder layers")
    return fitted


def with_overrides(schedule: Schedule, k: list[int | None] | None = None,
                   ratio: list[float | None] | None = None,
                   criterion: list[str | None] | None = None) -> Schedule:
    """Override stage i's K, R or criterion by position (None leaves a field unchanged)."""
    for field_name, values in (("k", k), ("ratio", ratio), ("criterion", criterion)):
        for i, v in enumerate(values or []):
            if v is not None:
                schedule = schedule.replace_stage(i, **{field_name: v})
    return schedule
