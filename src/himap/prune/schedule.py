"""Pruning methods as schedules of stages (SPEC section 2).

A stage (K, R, criterion) means: layers 0..K-1 see the tokens present before the stage, the
ranking reads the attention computed inside layer K-1, and layers K..L-1 run without the
floor(R * n) lowest-scoring image tokens (n = image tokens still present before the stage).
A schedule is an ordered tuple of stages with strictly increasing K. The empty schedule is
vanilla.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

CRITERIA = ("phi_sh", "phi_dp", "phi_dp_row", "phi_last", "random", "embed_norm", "gradient")
"""Names of the ranking criteria (see himap.prune.criteria). `gradient` needs autograd at layer K-1."""


@dataclass(frozen=True)
class Stage:
    """One pruning stage."""

    k: int  # layers 0..k-1 keep the tokens; ranking uses layer k-1's attention; k >= 1
    ratio: float  # fraction of the image tokens still present that this stage drops, in [0, 1)
    criterion: str = "phi_sh"  # one of CRITERIA
    seed: int = 0  # seed of the `random` criterion (ignored by the others)
    drop_all: bool = False  # drop every remaining image token (ratio ignored); for probing experiments

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"stage K must be an integer >= 1 (layer K-1 ranks), got {self.k!r}")
        if not (0.0 <= float(self.ratio) < 1.0):
            raise ValueError(f"stage ratio R must lie in [0, 1), got {self.ratio!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")


@dataclass(frozen=True)
class Schedule:
    """An ordered list of stages; `name` is only a label for tables."""

    stages: tuple[Stage, ...] = ()
    name: str = "custom"

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        for a, b in zip(self.stages, self.stages[1:]):
            if b.k <= a.k:
                raise ValueError(
                    f"stage K values must increase strictly (K2 > K1), got K={a.k} then K={b.k}"
                )

    def validate_for(self, num_layers: int) -> None:
        """Raise if a stage's K does not leave at least one layer to prune (K < num_layers)."""
        for s in self.stages:
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
        return Schedule(tuple(stages), name=self.name)


def kept_count(n: int, ratio: float, drop_all: bool = False) -> int:
    """Tokens kept when a stage drops floor(ratio * n) of n (SPEC section 2)."""
    return 0 if drop_all else n - math.floor(ratio * n + 1e-9)


def drop_all_from(k: int) -> Schedule:
    """Every image token removed from layer k on (layers 0..k-1 see them): probes where visual
    information has moved into the text tokens."""
    return Schedule((Stage(k, 0.0, "phi_sh", drop_all=True),), name=f"drop-all@{k}")


def image_tokens_per_layer(schedule: Schedule, n_image: int, num_layers: int) -> list[int]:
    """Number of image tokens entering each decoder layer 0..num_layers-1 under `schedule`."""
    schedule.validate_for(num_layers)
    counts, n, stages = [], n_image, list(schedule.stages)
    for layer in range(num_layers):
        while stages and stages[0].k == layer:
            stage = stages.pop(0)
            n = kept_count(n, stage.ratio, stage.drop_all)
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
the 7B stages) and what its README's 13B ScienceQA numbers come from (docs/official-code.md)."""


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
    model's depth: K' = max(1, round(K * num_layers / reference_layers)), raised where needed to
    stay strictly increasing (ratios and criteria unchanged). `reference_layers` defaults to the
    depth the preset was set for (32, or 40 for the -13b presets). So a paper preset runs on a
    shallow model (the built-in one has 10 layers: himap-caption's K=(2, 15) becomes (1, 5)) at
    the same relative depths; callers should say so (the CLI prints a note)."""
    if all(s.k < num_layers for s in schedule.stages):
        return schedule
    ref = reference_layers or PRESET_LAYERS.get(schedule.name.split("@")[-1], REFERENCE_LAYERS)
    stages, last = [], 0
    for s in schedule.stages:
        k = max(1, round(s.k * num_layers / ref), last + 1)
        if k >= num_layers:
            raise ValueError(f"{schedule.name!r} (K={tuple(x.k for x in schedule.stages)}) cannot be scaled "
                             f"to a model with {num_layers} decoder layers")
        stages.append(dataclasses.replace(s, k=k))
        last = k
    return Schedule(tuple(stages), name=schedule.name)


def with_overrides(schedule: Schedule, k: list[int | None] | None = None,
                   ratio: list[float | None] | None = None,
                   criterion: list[str | None] | None = None) -> Schedule:
    """Override stage i's K, R or criterion by position (None leaves a field unchanged)."""
    for field_name, values in (("k", k), ("ratio", ratio), ("criterion", criterion)):
        for i, v in enumerate(values or []):
            if v is not None:
                schedule = schedule.replace_stage(i, **{field_name: v})
    return schedule
