"""`himap demo`: its tables and, end to end on a few items, the shipped model."""

import json
import os

import pytest

from himap.cli import demo


def test_tables_hand_values():
    methods = {"vanilla": {"accuracy": 95.0, "mc_accuracy": 92.5, "pope_accuracy": 97.5, "caption_object_f1": 80.0,
                           "tflops_paper": 1e-4, "tflops_full": 3e-4, "prefill_ratio": 1.0},
               "himap": {"accuracy": None, "tflops_paper": 5e-5}}
    table = demo.format_methods_table(methods)
    assert "| vanilla | 92.5 | 97.5 | 95.0 | 80.0 | 0.100 | 0.300 | 100% | 1.00 |" in table
    assert "| himap | n/a | n/a | n/a | n/a | 0.050 | n/a | 50% | n/a |" in table
    drop = demo.format_drop_table([{"k": 0, "accuracy": 25.0}, {"k": 1, "accuracy": 90.0}, {"k": "full", "accuracy": 95.0}])
    assert drop.splitlines()[0] == "| K | 0 | 1 | full |" and drop.splitlines()[2] == "| accuracy | 25.0 | 90.0 | 95.0 |"
    kept = demo.format_kept_table({"fastv": [87.0], "himap": [100.0, 45.5]})
    assert kept.splitlines() == ["| method | stage 1 | stage 2 |", "|---|---|---|",
                                 "| fastv | 87.0 | |", "| himap | 100.0 | 45.5 |"]
    drop = demo.format_drop_table([{"k": 0, "accuracy": 30.0, "mc": 10.0, "pope": 50.0},
                                   {"k": "blank", "accuracy": 35.0, "mc": 20.0, "pope": 50.0}])
    assert drop.splitlines()[2:] == ["| mc + pope | 30.0 | 35.0 |", "| mc | 10.0 | 20.0 |", "| pope | 50.0 | 50.0 |"]
    flows = demo.format_flow_table({"layers": [0, 1], "S_vt": [2e-3, None], "S_vv": [1e-3, 4e-3]})
    assert "| 0 | 2.00e-03 | 1.00e-03 | 2.00 |" in flows and "| 1 | n/a | 4.00e-03 | n/a |" in flows


def test_demo_quick_end_to_end(tmp_path, capsys):
    from himap.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path), "--threads", "1", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert set(summary["methods"]) == {"vanilla", "fastv", "himap", "random"}
    m = summary["methods"]
    for name, row in m.items():
        assert 0.0 <= row["accuracy"] <= 100.0, name
    assert m["vanilla"]["prefill_ratio"] == pytest.approx(1.0)
    # analytic FLOPs: HiMAP < FastV < vanilla, random = HiMAP's schedule
    assert m["himap"]["tflops_paper"] < m["fastv"]["tflops_paper"] < m["vanilla"]["tflops_paper"]
    assert m["random"]["tflops_paper"] == m["himap"]["tflops_paper"]
    assert m["himap"]["tflops_full"] < m["vanilla"]["tflops_full"]
    drop = summary["drop_all_from_k"]
    assert list(drop)[0] == "0" and list(drop)[-2:] == ["blank", "full"]
    for name in ("accuracy_vs_tflops.png", "drop_all.png", "saliency_flows.png", "saliency_modalities.png",
                 "demo.json"):
        assert os.path.getsize(tmp_path / name) > 0, name
    full = json.loads((tmp_path / "demo.json").read_text())
    assert len(full["saliency"]["S_vt"]) == len(full["saliency"]["layers"]) >= 9
    kept = full["object_kept"]  # share of items whose object token survives each stage
    assert {m: len(v) for m, v in kept.items()} == {"fastv": 1, "himap": 2, "random": 2}
    assert all(0.0 <= x <= 100.0 for v in kept.values() for x in v)
    assert kept["himap"][1] <= kept["himap"][0] and kept["random"][1] <= kept["random"][0]  # stage 2 keeps a subset
    for row in full["drop_all_from_k"]:  # per split, and overall = the item-weighted mean of the splits
        assert set(row) == {"k", "accuracy", "mc", "pope"}
        assert row["accuracy"] == pytest.approx((row["mc"] + row["pope"]) / 2)  # --quick: as many mc as pope items
    assert (tmp_path / "shapes" / "vanilla.jsonl").exists()
