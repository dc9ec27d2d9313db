"""`himap sweep`: config parsing, method expansion, Pareto front, tables, plot, resume."""

import csv
import json
import os

import pytest
from test_evaluate import _make_images, tiny_model_dir, toy  # noqa: F401  (fixtures)

from himap.evaluation import sweep as S
from himap.prune.schedule import PRESETS


def test_parse_config_and_errors():
    cfg = S.parse_config({"model": "builtin", "tasks": ["shapes", {"name": "pope", "split": "random"}],
                          "methods": "vanilla, fastv,all@base", "batch_size": 4})
    assert cfg.tasks[0].name == "shapes" and cfg.tasks[1].split == "random"
    assert cfg.methods == ["vanilla", "fastv", "all@base"] and cfg.batch_size == 4
    with pytest.raises(ValueError, match="unknown key.*'batchsize'"):
        S.parse_config({"model": "m", "tasks": ["t"], "methods": ["vanilla"], "batchsize": 4})
    with pytest.raises(ValueError, match="tasks\\[0\\]: unknown key"):
        S.parse_config({"model": "m", "tasks": [{"name": "t", "splt": "x"}], "methods": ["vanilla"]})
    with pytest.raises(ValueError, match="`methods` is required"):
        S.parse_config({"model": "m", "tasks": ["t"]})


def test_shipped_config_parses_and_covers_the_ablation_plans():
    from himap.cost.flops import ARCHS

    here = os.path.dirname(__file__)
    cfg = S.load_config(os.path.join(here, "..", "configs", "sweep_ablations.yaml"))
    planned = S.plan(cfg, ARCHS["llava-1.5-7b"])
    names = {n for _, ns, _, _ in planned for n in ns}
    for base in ("himap", "himap-caption"):
        for kind in ("shallow-only", "deep-only", "uniform", "random", "swapped", "crit=embed_norm",
                     "crit=gradient", "k1=1-r1=0.25", "k1=3-r1=0.75"):
            assert any(n == f"{kind}@{base}" for n in names), f"{kind}@{base}"


def test_task_methods_expansion():
    names = S.task_methods(["vanilla", "base", "shallow-only@base", "criteria@base", "himap"], "himap-caption")
    assert names[:3] == ["vanilla", "himap-caption", "shallow-only@himap-caption"]
    assert "crit=embed_norm@himap-caption" in names and "swapped@himap-caption" in names
    assert names[-1] == "himap" and len(names) == len(set(names))


def test_unique_schedules_aliases_identical_stages():
    from himap.evaluation.ablations import resolve

    grid_point = resolve("k1=2-r1=0.5@himap")
    kept, alias = S.unique_schedules([PRESETS["himap"], grid_point, PRESETS["fastv"]])
    assert [s.name for s in kept] == ["himap", "fastv"] and alias == {"k1=2-r1=0.5@himap": "himap"}


def test_pareto_front():
    pts = [(3.0, 80.0), (1.5, 79.0), (0.7, 79.5), (0.7, 70.0), (2.0, 60.0), (0.5, 50.0), (3.0, 80.0)]
    # (0.7, 79.5) beats (1.5, 79) and (2, 60); (3, 80) twice: equal points do not dominate each other
    assert S.pareto_front(pts) == [5, 2, 0, 6]
    assert S.pareto_front([]) == []


def test_sweep_runs_writes_tables_and_plot_and_resumes(toy, tmp_path):
    fake, _ = toy
    from himap.cost.flops import ARCHS

    arch = ARCHS["llava-1.5-7b"]
    cfg = S.parse_config({"model": "fake", "out": str(tmp_path), "batch_size": 4, "limit": 6,
                          "tasks": [{"name": "toy", "base": "himap"}],
                          "methods": ["vanilla", "fastv", "base", "shallow-only@base", "uniform@base",
                                      "k1=2-r1=0.5@base"]})
    calls = []
    res = S.run_sweep(cfg, fake.factory(calls), arch, progress=False)
    assert len(calls) == 5 * 6  # the grid point equal to himap is not run again
    by = {r["method"]: r for r in res.rows}
    assert by["k1=2-r1=0.5@himap"]["same_as"] == "himap"
    assert by["k1=2-r1=0.5@himap"]["score"] == by["himap"]["score"]
    assert abs(by["uniform@himap"]["tflops_paper"] / by["himap"]["tflops_paper"] - 1) < 1e-3
    assert by["vanilla"]["score"] == 100.0 and by["himap"]["score"] == pytest.approx(400 / 6)
    md = open(tmp_path / "results.md").read()
    assert md == res.markdown and "| himap | 2:0.5:phi_sh 8:0.75:phi_dp | 66.67 | 0.735 | 25% |" in md
    # Pareto front: vanilla (best score) and the cheapest of the pruned methods (all score 66.67
    # with the fake model: uniform and himap within 1e-3); fastv and shallow-only are dominated
    front = [l.split("|")[1].strip() for l in md.splitlines() if l.endswith("| * |")]
    assert "vanilla" in front and "fastv" not in front and "shallow-only@himap" not in front
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["method"] for r in rows] == ["vanilla", "fastv", "himap", "shallow-only@himap",
                                           "uniform@himap", "k1=2-r1=0.5@himap"]
    assert json.load(open(tmp_path / "results.json"))[2]["scores"]["accuracy"] == pytest.approx(400 / 6)
    assert res.plot and open(res.plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    line = json.loads(S.final_line(res))
    assert line["sweep"]["toy"]["himap"]["score"] == pytest.approx(400 / 6)
    # the predictions are eval's files: a second sweep and `himap eval` reuse them
    again = S.run_sweep(cfg, fake.factory(calls), arch, progress=False)
    assert len(calls) == 30 and again.rows == res.rows
    assert os.path.isfile(tmp_path / "toy" / "uniform@himap.jsonl")


def test_plan_rejects_schedules_that_do_not_fit(toy):
    import dataclasses

    from himap.cost.flops import ARCHS

    small = dataclasses.replace(ARCHS["llava-1.5-7b"], num_layers=10)
    cfg = S.parse_config({"model": "m", "tasks": [{"name": "toy", "base": "himap-caption"}],
                          "methods": ["base"]})
    with pytest.raises(ValueError, match="method 'himap-caption'.*K=15"):
        S.plan(cfg, small)
    cfg = S.parse_config({"model": "m", "tasks": ["toy"], "methods": ["sideways@base"]})
    with pytest.raises(ValueError, match="unknown ablation"):
        S.plan(cfg, small)


def test_sweep_cli_tiny_model(tiny_model_dir, fixtures_dir, tmp_path, capsys):
    """`himap sweep CONFIG` on a tiny random model and the POPE fixture files: results
    tables, the plot and the final JSON line; --dry-run lists schedules without running."""
    from himap import cli
    from himap.tasks import get_task

    data = os.path.join(fixtures_dir, "pope")
    _make_images(get_task("pope"), data, str(tmp_path / "img"), 2)
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\nout: {tmp_path / 'out'}\nbatch_size: 2\nlimit: 2\nmax_new_tokens: 2\n"
        f"tasks:\n  - {{name: pope, data: {data}, image_dir: {tmp_path / 'img'}}}\n"
        "methods: [vanilla, base, deep-only@base, uniform@base, k1=2-r1=0.5@base]\n")
    assert cli.main(["sweep", str(config), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["plan"]["pope"]
    assert [r["method"] for r in plan] == ["vanilla", "himap", "deep-only@himap", "uniform@himap",
                                           "k1=2-r1=0.5@himap"]
    assert plan[4]["same_as"] == "himap" and plan[2]["stages"] == "8:0.875:phi_dp"
    assert not (tmp_path / "out").exists()

    assert cli.main(["sweep", str(config), "--no-progress"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(final["sweep"]["pope"]) == {r["method"] for r in plan}
    assert os.path.getsize(tmp_path / "out" / "pareto.png") > 1000
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert len(rows) == 5 and rows[4]["same_as"] == "himap"
    assert len(open(tmp_path / "out" / "pope" / "uniform@himap.jsonl").readlines()) == 2


def test_sweep_cli_reports_a_method_it_cannot_run(tmp_path, capsys):
    """On the built-in model (10 layers, d=64) no HiMAP schedule is as cheap as VisionZip-64: the sweep
    runs the rest and says on stderr which method it left out and why; the table says it too."""
    from himap import cli

    config = tmp_path / "sweep.yaml"
    config.write_text(f"model: builtin\nout: {tmp_path / 'out'}\nlimit: 2\nthreads: 1\n"
                      "tasks: [{name: shapes, split: mc}]\nmethods: [vanilla, match=visionzip-64@base]\n")
    assert cli.main(["sweep", str(config), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "himap sweep: not run on shapes" in err and "match=visionzip-64@himap" in err
    assert "cannot be as cheap" in err and "Not run: match=visionzip-64@himap" in out
    final = json.loads(out.strip().splitlines()[-1])
    assert [list(methods) for methods in final["sweep"].values()] == [["vanilla"]]
