"""Ablation schedule builders (himap.evaluation.ablations): counts, FLOPs matching, names."""

import pytest

from himap.evaluation import ablations as A
from himap.prune.schedule import PRESETS, Schedule, Stage, image_tokens_per_layer

LLAVA_7B = dict(n=576, L=32, d=4096, m=11008)
LLAVA_13B = dict(n=576, L=40, d=5120, m=13824)


def paper_cost(n, L, d, m):
    """Section 4.2 by hand: sum over layers of Omega(n_l) = 4 n d^2 + 2 n^2 d + 2 n d m."""
    def omega(x):
        return 4 * x * d * d + 2 * x * x * d + 2 * x * d * m

    return lambda schedule: sum(omega(c) for c in image_tokens_per_layer(schedule, n, L))


def test_hand_cost_reproduces_paper_table_1():
    # the paper truncates: 2.986 -> 2.98, 0.735 -> 0.73, 13B HiMAP 1.364 -> 1.36
    assert int(paper_cost(**LLAVA_7B)(PRESETS["vanilla"]) / 1e10) == 298
    assert int(paper_cost(**LLAVA_7B)(PRESETS["himap"]) / 1e10) == 73
    assert int(paper_cost(**LLAVA_13B)(PRESETS["himap-13b"]) / 1e10) == 136


def test_shallow_only_keeps_first_stage():
    s = A.shallow_only(PRESETS["himap"])
    assert s.stages == (Stage(2, 0.5, "phi_sh"),)
    assert s.name == "shallow-only@himap"


@pytest.mark.parametrize("n", [576, 64, 100, 37, 7])
@pytest.mark.parametrize("base", ["himap", "himap-caption", "himap-13b"])
def test_deep_only_matches_himap_count_at_k2(n, base):
    himap = PRESETS[base]
    k2 = himap.stages[1].k
    deep = A.deep_only(himap, n)
    assert len(deep.stages) == 1 and deep.stages[0].k == k2 and deep.stages[0].criterion == "phi_dp"
    counts = image_tokens_per_layer(deep, n, 40)
    assert counts[:k2] == [n] * k2  # nothing dropped before K2
    assert counts[k2] == image_tokens_per_layer(himap, n, 40)[k2]
    if n == 576:
        assert counts[k2] == 72  # 576 -> 288 -> 72


def test_k1_r1_grid():
    grid = A.k1_r1_grid(PRESETS["himap"])
    assert len(grid) == 9 and len({g.name for g in grid}) == 9
    assert {(g.stages[0].k, g.stages[0].ratio) for g in grid} == {
        (k, r) for k in (1, 2, 3) for r in (0.25, 0.5, 0.75)}
    assert all(g.stages[1] == Stage(8, 0.75, "phi_dp") for g in grid)
    assert image_tokens_per_layer(A.k1_r1(PRESETS["himap"], 1, 0.25), 576, 32)[:9] == [576] + [432] * 7 + [108]
    with pytest.raises(ValueError, match="smaller than K2"):
        A.k1_r1(PRESETS["himap"], 8, 0.5)


@pytest.mark.parametrize("shape,base", [(LLAVA_7B, "himap"), (LLAVA_7B, "himap-caption"),
                                        (LLAVA_13B, "himap-13b"), (LLAVA_13B, "himap"),
                                        (dict(n=64, L=10, d=64, m=128), "himap")])
def test_uniform_matches_flops_within_1e3(shape, base):
    cost = paper_cost(**shape)
    himap = PRESETS[base]
    match = A.solve_uniform(himap, cost, shape["n"], shape["L"])
    assert abs(cost(match.schedule) - cost(himap)) / cost(himap) < 1e-3
    assert match.rel_error < 1e-3 and match.target == cost(himap)
    counts = image_tokens_per_layer(match.schedule, shape["n"], shape["L"])
    k1 = himap.stages[0].k
    assert counts[:k1] == [shape["n"]] * k1 and counts[k1] < shape["n"]
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    # the same ratio at every layer from K1 on, up to one token of rounding
    for k in range(k1, shape["L"]):
        before, after = counts[k - 1], counts[k]
        assert abs((before - after) / before - match.ratio) <= 1.0 / before + 1e-12
    # phase criteria kept: phi_sh before K2, phi_dp from K2 on
    k2 = himap.stages[1].k
    assert {s.criterion for s in match.schedule.stages if s.k < k2} == {"phi_sh"}
    assert {s.criterion for s in match.schedule.stages if s.k >= k2} == {"phi_dp"}


def test_uniform_7b_ratio_value():
    match = A.solve_uniform(PRESETS["himap"], paper_cost(**LLAVA_7B), 576, 32)
    assert 0.13 < match.ratio < 0.15  # geometric estimate: 576 (1 - (1-r)^30) / r ~ 3500 tokens


def test_uniform_needs_reachable_target():
    # 576 -> 1 -> 0 tokens: uniform pruning keeps at least one token per layer (576, 1, 1)
    cheap = Schedule((Stage(1, 0.999, "phi_sh"), Stage(2, 0.0, "phi_dp", drop_all=True)), name="cheap")
    with pytest.raises(ValueError, match="cannot reach"):
        A.solve_uniform(cheap, paper_cost(n=576, L=3, d=64, m=128), 576, 3)


def test_criteria_ablations():
    himap = PRESETS["himap"]
    assert A.random_ranking(himap).stages == PRESETS["random"].stages
    emb = A.with_criterion(himap, "embed_norm")
    assert [s.criterion for s in emb.stages] == ["embed_norm", "embed_norm"]
    assert [(s.k, s.ratio) for s in emb.stages] == [(2, 0.5), (8, 0.75)]
    sw = A.swapped(himap)
    assert [(s.k, s.criterion) for s in sw.stages] == [(2, "phi_dp"), (8, "phi_sh")]
    with pytest.raises(ValueError, match="unknown criterion"):
        A.with_criterion(himap, "entropy")


def test_names_resolve_and_expand():
    shape = A.ModelShape(n_image=576, num_layers=32, cost_fn=paper_cost(**LLAVA_7B))
    names = A.expand("all@himap")
    assert len(names) == len(set(names)) == 3 + 9 + 4
    for name in names:
        schedule = A.resolve(name, shape)
        assert schedule.name == name  # a resolved schedule carries the name it was asked by
    assert A.resolve("himap").stages == PRESETS["himap"].stages
    assert A.resolve("k1=3-r1=0.75@himap-caption").stages == (
        Stage(3, 0.75, "phi_sh"), Stage(15, 0.75, "phi_dp"))
    assert A.expand("fastv") == ["fastv"] and len(A.expand("criteria@himap")) == 4


def test_resolve_errors():
    with pytest.raises(ValueError, match="depends on the model"):
        A.resolve("deep-only@himap")
    with pytest.raises(ValueError, match="unavailable"):
        A.resolve("uniform@himap", A.ModelShape(576, 32, cost_fn=None))
    with pytest.raises(ValueError, match="group"):
        A.resolve("all@himap")
    with pytest.raises(ValueError, match="unknown ablation"):
        A.resolve("sideways@himap")
    with pytest.raises(ValueError, match="unknown method"):
        A.resolve("shallow-only@nothing")
    with pytest.raises(ValueError, match="two-stage"):
        A.resolve("swapped@fastv")
