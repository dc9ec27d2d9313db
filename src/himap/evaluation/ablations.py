"""Ablation schedules derived from a HiMAP schedule (SPEC section 2, reference/ablation_plans.md).

Every builder is a pure function from a base schedule (two stages: (K1, R1, phi_sh) then
(K2, R2, phi_dp)) to a new `himap.Schedule`. Each ablation has a name `KIND@BASE` that
`resolve()` turns back into the schedule, so `himap eval --method uniform@himap` and a sweep
config name the same method and share its prediction file.

Kinds:
- `shallow-only@B`: B's first stage only (the deeper-layer module removed).
- `deep-only@B`: one stage at K2 whose ratio leaves as many image tokens as B has after K2.
- `k1=K-r1=R@B`: B with its first stage moved to layer K and ratio R (the K1/R1 grid).
- `uniform@B`: the same ratio r dropped at every layer from K1 to L-1, with r solved so that the
  analytic FLOPs (paper convention, section 4.2) equal B's.
- `random@B`: B's stages with seeded random ranking.
- `crit=NAME@B`: B's stages with criterion NAME at every stage (embed_norm, gradient, ...).
- `swapped@B`: the criteria exchanged: phi_dp at K1, phi_sh at K2.
- `pos=original@B`, `pos=contiguous@B`: B with its kept tokens' RoPE positions kept or renumbered
  (docs/peers.md: the peers renumber, HiMAP keeps them).
- `match=PEER@B`: B at the analytic FLOPs (paper convention) of the peer preset PEER (docs/peers.md):
  K2 and R2 kept, R1 solved; K1 lowered when even keeping one token from K1 on costs more.
Group names expand to several methods: `k1r1-grid@B`, `criteria@B`, `all@B` and `match-peers@B`
(B matched to every peer at every published budget).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from himap.prune.schedule import (
    CRITERIA,
    PEER_BUDGETS,
    PRESETS,
    Schedule,
    Stage,
    get_schedule,
    image_tokens_per_layer,
    kept_count,
)

K1_GRID = (1, 2, 3)  # shallow filtering layers of the K1/R1 grid
R1_GRID = (0.25, 0.5, 0.75)  # shallow filtering ratios of the K1/R1 grid
CRITERION_SWAPS = ("embed_norm", "gradient")  # criteria applied at every stage by `criteria@B`

CostFn = Callable[[Schedule], float]
"""Analytic cost of a schedule for one fixed model (paper convention: image tokens only)."""


def _two_stages(base: Schedule) -> tuple[Stage, Stage]:
    if len(base.stages) != 2:
        raise ValueError(f"ablations derive from a two-stage HiMAP schedule; {base.name!r} has "
                         f"{len(base.stages)} stage(s)")
    return base.stages[0], base.stages[1]


def shallow_only(base: Schedule) -> Schedule:
    """Ablation 1 of the plans: remove the deeper-layer pruning module, keep (K1, R1, phi_sh)."""
    first, _ = _two_stages(base)
    return Schedule((first,), name=f"shallow-only@{base.name}")


def deep_only(base: Schedule, n_image: int) -> Schedule:
    """Only the deeper-layer module, at K2, dropping enough tokens that the count entering layer
    K2 equals the base schedule's (576 -> 72 for HiMAP's 576 -> 288 -> 72 on LLaVA-1.5).

    The count depends on n_image through the floors of SPEC section 2, hence the argument.
    """
    _, second = _two_stages(base)
    target = image_tokens_per_layer(base, n_image, second.k + 1)[second.k]
    ratio = (n_image - target) / n_image
    if ratio >= 1.0:
        raise ValueError(f"{base.name!r} keeps no image token at K2; deep-only is undefined")
    stage = dataclasses.replace(second, ratio=ratio)
    if kept_count(n_image, ratio) != target:  # float rounding; the floor in kept_count has slack
        raise ArithmeticError(f"deep-only ratio {ratio} does not keep {target} of {n_image} tokens")
    return Schedule((stage,), name=f"deep-only@{base.name}")


def k1_r1(base: Schedule, k1: int, r1: float) -> Schedule:
    """Ablation 2 of the plans: base with its shallow stage at layer k1 and ratio r1; K2, R2 kept."""
    first, second = _two_stages(base)
    if k1 >= second.k:
        raise ValueError(f"K1={k1} must be smaller than K2={second.k}")
    return Schedule((dataclasses.replace(first, k=k1, ratio=r1), second),
                    name=f"k1={k1}-r1={r1:g}@{base.name}")


def k1_r1_grid(base: Schedule, k1s=K1_GRID, r1s=R1_GRID) -> list[Schedule]:
    """The K1 x R1 grid (K1 = 1, 2, 3; R1 = 25, 50, 75% by default)."""
    return [k1_r1(base, k, r) for k in k1s for r in r1s]


def random_ranking(base: Schedule, seed: int = 0) -> Schedule:
    """Random pruning at the base schedule: same K and R, seeded random ranking at every stage."""
    stages = tuple(dataclasses.replace(s, criterion="random", seed=seed, options=()) for s in base.stages)
    return dataclasses.replace(base, stages=stages,
                               name=f"random@{base.name}" if seed == 0 else f"random{seed}@{base.name}")


def with_criterion(base: Schedule, criterion: str) -> Schedule:
    """Token-importance ablation: the base schedule ranked by `criterion` at every stage."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if criterion == "random":
        return random_ranking(base)
    stages = tuple(dataclasses.replace(s, criterion=criterion) for s in base.stages)
    return dataclasses.replace(base, stages=stages, name=f"crit={criterion}@{base.name}")


def swapped(base: Schedule) -> Schedule:
    """phi_sh and phi_dp exchanged: phi_dp ranks at K1, phi_sh at K2 (tests the phase hypothesis)."""
    first, second = _two_stages(base)
    return Schedule((dataclasses.replace(first, criterion=second.criterion),
                     dataclasses.replace(second, criterion=first.criterion)),
                    name=f"swapped@{base.name}")


def uniform_counts(n_image: int, ratio: float, k1: int, num_layers: int) -> list[int]:
    """Image tokens entering each layer when a fraction `ratio` goes at every layer from K1 on.

    Layer K1 + j - 1 sees round(n * (1 - ratio)^j) tokens (at least 1): the geometric sequence
    rounded once per layer rather than floored stage after stage, so that one token more or less
    at one layer is the finest step of the cost (compounded floors move whole runs of layers at
    once and cannot match a FLOPs target to 1e-3).
    """
    counts = [n_image] * k1
    for j in range(1, num_layers - k1 + 1):
        counts.append(max(1, min(counts[-1], round(n_image * (1.0 - ratio) ** j))))
    return counts  # [L]


def uniform_at(base: Schedule, ratio: float, n_image: int, num_layers: int,
               criterion: str | None = None) -> Schedule:
    """Uniform pruning: about the same fraction `ratio` of the remaining image tokens dropped at
    every layer K1, K1+1, ..., L-1 (exact counts from uniform_counts; a layer where the rounded
    count does not change has no stage).

    Stages keep the base's phase criteria (its first criterion before K2, its second from K2
    on) unless `criterion` names one for all, so that only *where* tokens go differs.
    """
    first, second = _two_stages(base)
    counts = uniform_counts(n_image, ratio, first.k, num_layers)
    stages = []
    for k in range(first.k, num_layers):
        before, after = counts[k - 1], counts[k]
        if after < before:
            crit = criterion or (first.criterion if k < second.k else second.criterion)
            stages.append(Stage(k, (before - after) / before, crit))
    schedule = Schedule(tuple(stages), name=f"uniform@{base.name}")
    if image_tokens_per_layer(schedule, n_image, num_layers) != counts:  # float slack in kept_count
        raise ArithmeticError(f"uniform schedule at r={ratio} does not reproduce its token counts")
    return schedule


@dataclasses.dataclass(frozen=True)
class UniformMatch:
    """Result of solving the uniform ratio."""

    schedule: Schedule  # the uniform schedule at `ratio`
    ratio: float  # r dropped at every layer from K1 on
    cost: float  # its analytic cost (cost_fn units)
    target: float  # the base schedule's analytic cost
    rel_error: float  # |cost - target| / target; integer token counts make cost a step function


def solve_uniform(base: Schedule, cost_fn: CostFn, n_image: int, num_layers: int,
                  criterion: str | None = None, iterations: int = 60) -> UniformMatch:
    """Find r so that cost_fn(uniform_at(base, r)) is as close as possible to cost_fn(base).

    The cost is non-increasing in r (more tokens dropped at every layer) and piecewise constant
    (token counts are integers), so bisection brackets the step that crosses the target and the
    closer of its two sides is returned. On LLaVA-1.5 sizes a step is ~2e-4 of the cost.
    """
    target = cost_fn(base)

    def cost(r: float) -> float:
        return cost_fn(uniform_at(base, r, n_image, num_layers, criterion))

    lo, hi = 0.0, 1.0 - 1e-9  # cost(lo) >= target; search for the smallest r with cost <= target
    if cost(lo) < target:
        raise ValueError("uniform pruning from K1 costs less than the base even with ratio 0")
    if cost(hi) > target:
        raise ValueError("uniform pruning cannot reach the base schedule's cost")
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if cost(mid) <= target:
            hi = mid
        else:
            lo = mid
    best = min((lo, hi), key=lambda r: abs(cost(r) - target))
    achieved = cost(best)
    return UniformMatch(uniform_at(base, best, n_image, num_layers, criterion), best, achieved, target,
                        abs(achieved - target) / target)


def uniform(base: Schedule, cost_fn: CostFn, n_image: int, num_layers: int,
            criterion: str | None = None) -> Schedule:
    """Uniform-pruning baseline with the base schedule's analytic FLOPs (see solve_uniform)."""
    return solve_uniform(base, cost_fn, n_image, num_layers, criterion).schedule


class Unreachable(ValueError):
    """A schedule cannot reach the asked cost on this model (a sweep skips it and says why)."""


MATCH_TOLERANCE = 0.05
"""Largest relative cost gap `matched` accepts (a step of one token costs ~0.1-1% on LLaVA-1.5)."""


def matched(base: Schedule, peer: Schedule, cost_fn: CostFn, n_image: int) -> Schedule:
    """The base schedule at the peer's analytic cost: K2 and R2 as in base, R1 chosen so that the
    tokens kept from K1 on give the cost closest to cost_fn(peer) (integer counts: a step function,
    increasing in the count). When even one token from K1 on costs more, K1 moves down (to 1 at
    least); when that cannot reach the peer's cost either, a ValueError says so."""
    first, second = _two_stages(base)
    target = cost_fn(peer)
    name = f"match={peer.name}@{base.name}"
    for k1 in range(first.k, 0, -1):
        def at(kept: int) -> Schedule:
            ratio = (n_image - kept) / n_image
            if kept_count(n_image, ratio) != kept:  # float rounding; the floor in kept_count has slack
                raise ArithmeticError(f"R1={ratio} does not keep {kept} of {n_image} tokens")
            return Schedule((dataclasses.replace(first, k=k1, ratio=ratio), second), name=name)

        if cost_fn(at(1)) > target:
            continue
        lo, hi = 1, n_image  # cost(at(lo)) <= target; find the largest such count
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost_fn(at(mid)) <= target else (lo, mid - 1)
        best = min({lo, min(lo + 1, n_image)}, key=lambda kept: (abs(cost_fn(at(kept)) - target), kept))
        if abs(cost_fn(at(best)) - target) > MATCH_TOLERANCE * target:
            raise Unreachable(f"{base.name} cannot cost as much as {peer.name} with K2, R2 fixed (even keeping "
                             f"every token until K2 it is {cost_fn(at(best)) / target:.1%} of it)")
        return at(best)
    raise Unreachable(f"{base.name} cannot be as cheap as {peer.name} on this model: with K1=1 and one "
                      f"token kept from layer 1 on it still costs more")


# ---------------------------------------------------------------- names

GROUPS = ("k1r1-grid", "criteria", "all", "match-peers")
PEER_FAMILIES = ("pdrop", "visionzip", "dart", "divprune")
"""Peer presets (himap.prune.schedule.PEER_PRESETS) the `match-peers@B` group matches, at every budget."""
KINDS = ("shallow-only", "deep-only", "uniform", "random", "swapped")  # plus k1=..-r1=.., crit=NAME, pos=, match=
_K1R1 = re.compile(r"^k1=(\d+)-r1=([0-9.]+)$")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the model-dependent ablations need to know about the model."""

    n_image: int  # image tokens per image (576 for LLaVA-1.5)
    num_layers: int  # decoder layers L
    cost_fn: CostFn | None = None  # paper-convention analytic cost; required by uniform@B


def is_ablation(name: str) -> bool:
    """True for names of the form KIND@BASE."""
    return "@" in name


def expand(name: str) -> list[str]:
    """Names of the methods a group name stands for (a single name expands to itself)."""
    if not is_ablation(name):
        return [name]
    kind, base = name.split("@", 1)
    grid = [f"k1={k}-r1={r:g}@{base}" for k in K1_GRID for r in R1_GRID]
    criteria = [f"crit={c}@{base}" for c in CRITERION_SWAPS] + [f"random@{base}", f"swapped@{base}"]
    if kind == "k1r1-grid":
        return grid
    if kind == "criteria":
        return criteria
    if kind == "all":
        return ([f"shallow-only@{base}", f"deep-only@{base}", f"uniform@{base}"] + grid + criteria)
    if kind == "match-peers":
        return [f"match={p}-{b}@{base}" for p in PEER_FAMILIES for b in PEER_BUDGETS]
    return [name]


def resolve(name: str, shape: ModelShape | None = None) -> Schedule:
    """The schedule for a preset name or an ablation name KIND@BASE (BASE a preset)."""
    if not is_ablation(name):
        return get_schedule(name)
    kind, base_name = name.split("@", 1)
    base = get_schedule(base_name)
    m = _K1R1.match(kind)
    if m:
        return k1_r1(base, int(m.group(1)), float(m.group(2)))
    if kind.startswith("crit="):
        return with_criterion(base, kind[len("crit="):])
    if kind == "shallow-only":
        return shallow_only(base)
    if kind == "swapped":
        return swapped(base)
    if kind == "random":
        return random_ranking(base)
    if kind.startswith("pos="):
        return dataclasses.replace(base, positions=kind[len("pos="):], name=name)
    if kind.startswith("match="):
        if shape is None or shape.cost_fn is None:
            raise ValueError(f"{name!r} matches an analytic cost: pass a ModelShape with the FLOPs model")
        return matched(base, get_schedule(kind[len("match="):]), shape.cost_fn, shape.n_image)
    if kind in ("deep-only", "uniform"):
        if shape is None:
            raise ValueError(f"{name!r} depends on the model (image tokens, layers): pass a ModelShape")
        if kind == "deep-only":
            return deep_only(base, shape.n_image)
        if shape.cost_fn is None:
            raise ValueError(f"{name!r} needs the analytic FLOPs model (himap.cost.flops), which is unavailable")
        return uniform(base, shape.cost_fn, shape.n_image, shape.num_layers)
    if kind in GROUPS:
        raise ValueError(f"{name!r} is a group of methods; expand it first: {', '.join(expand(name))}")
    raise ValueError(f"unknown ablation {kind!r} in {name!r}; kinds: {', '.join(KINDS)}, "
                     f"k1=K-r1=R, crit=CRITERION, pos=POSITIONS, match=PEER; groups: {', '.join(GROUPS)} (base: a preset, "
                     f"one of {', '.join(PRESETS)})")
