"""Latency benchmark: synthetic inputs, one timed run, per-round ratios, JSONL and CLI output."""

import json

import pytest
import torch

from himap.cost.bench import (
    BenchConfig,
    run_benchmark,
    run_once,
    summarize,
    synthetic_inputs,
)
from himap.cost.flops import Arch, PromptShape, VisionArch, full_cost
from himap.models.testing import IMAGE_TOKEN_ID, tiny_llava
from himap.prune.schedule import get_schedule


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=0)


def test_synthetic_inputs_layout(model):
    x = synthetic_inputs(model, n_system=4, n_instruction=5, batch_size=2, seed=3)
    ids = x["input_ids"]
    assert ids.shape == (2, 4 + 64 + 5) and bool(x["attention_mask"].all())
    assert (ids[:, 0] == model.config.text_config.bos_token_id).all()
    assert (ids[:, 4:68] == IMAGE_TOKEN_ID).all()
    text = torch.cat([ids[:, 1:4], ids[:, 68:]], dim=1)
    assert not (text == IMAGE_TOKEN_ID).any() and bool((text >= 3).all())
    assert x["pixel_values"].shape == (2, 3, 32, 32)
    same = synthetic_inputs(model, n_system=4, n_instruction=5, batch_size=2, seed=3)
    assert torch.equal(same["input_ids"], ids)


def test_run_once_measures_the_pruned_cache(model):
    """KV cache bytes read from the cache object equal the analytic size; G tokens generated."""
    x = synthetic_inputs(model, n_system=4, n_instruction=5)
    arch = Arch.from_config(model.config)
    for method in ("vanilla", "himap"):
        rec = run_once(model, x, get_schedule(method), new_tokens=3)
        cost = full_cost(arch, method, PromptShape(4, 5, 3), dtype="fp32")
        assert rec["kv_cache_lengths"] == cost.tokens_per_layer
        assert rec["kv_cache_bytes"] == cost.kv_cache_bytes
        assert rec["kv_cache_bytes_final"] == cost.kv_cache_bytes_final
        assert 0 < rec["ttft_s"] <= rec["e2e_s"] and rec["decode_s_per_token"] > 0
        assert (rec["ranking_s"] > 0) == (method != "vanilla")
    assert rec["kv_cache_lengths"] == [73] * 2 + [41] * 6 + [17] * 2  # himap: 64 -> 32 at K=2 -> 8 at K=8


def test_summarize_per_round_ratios():
    """Speedups are medians of per-round ratios (same round), not ratios of medians."""
    rows = []
    times = {"vanilla": [10.0, 20.0, 12.0], "fastv": [5.0, 8.0, 6.0], "himap": [4.0, 5.0, 4.0]}
    for name, ts in times.items():
        for rep, t in enumerate(ts):
            rows.append({"method": name, "rep": rep, "ttft_s": t, "decode_s_per_token": 1.0,
                         "e2e_s": t + 1, "ttft_cpu_s": t, "e2e_cpu_s": t + 1, "ranking_s": 0.01 * t, "kv_cache_bytes": 1, "kv_cache_bytes_final": 2, "kv_cache_lengths": [1]})
    arch = Arch("toy", hidden=8, intermediate=16, num_layers=4, num_heads=2, num_kv_heads=2, vocab=10,
                image_tokens=16, vision=VisionArch(16, 4, 4, 8, 1, 1))
    costs = {n: full_cost(arch, s, PromptShape(2, 2, 2)) for n, s in
             (("vanilla", "vanilla"), ("fastv", "fastv"), ("himap", get_schedule("himap").replace_stage(1, k=3)))}
    s = summarize(rows, list(times), costs)
    assert s["himap"]["speedup_vs_vanilla"]["ttft_s"] == pytest.approx(3.0)  # median of 2.5, 4, 3
    assert s["himap"]["speedup_vs_fastv"]["ttft_s"] == pytest.approx(1.5)  # median of 1.25, 1.6, 1.5
    assert s["vanilla"]["speedup_vs_vanilla"]["e2e_s"] == 1.0
    assert s["himap"]["ttft_s"] == {"median": 4.0, "min": 4.0, "max": 5.0}
    assert s["fastv"]["ranking_share_of_prefill"] == pytest.approx(0.01)
    a = s["himap"]["analytic"]
    assert a["prefill_with_vision_speedup"] == pytest.approx(
        (costs["vanilla"].prefill + costs["vanilla"].vision) / (costs["himap"].prefill + costs["himap"].vision))
    assert s["himap"]["prefill_speedup_vs_analytic"]["full_with_vision"] == pytest.approx(
        3.0 / a["prefill_with_vision_speedup"])


def test_run_benchmark_jsonl(model, tmp_path):
    out = tmp_path / "bench.jsonl"
    cfg = BenchConfig(methods=("vanilla", "fastv"), reps=2, warmup=0, n_system=3, n_instruction=4, new_tokens=2)
    summary = run_benchmark(model, cfg, str(out), progress=False)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["config"] + ["run"] * 4 + ["summary"]
    assert [r["method"] for r in lines[1:5]] == ["vanilla", "fastv", "fastv", "vanilla"]  # rotated rounds
    assert lines[-1]["methods"].keys() == {"vanilla", "fastv"} == summary["methods"].keys()
    assert summary["methods"]["fastv"]["kv_cache_lengths"] == [71] * 2 + [39] * 8


def test_bad_config():
    with pytest.raises(ValueError, match="new_tokens"):
        BenchConfig(new_tokens=1)
    with pytest.raises(ValueError, match="reps"):
        BenchConfig(reps=0)


def test_cli_bench(tmp_path, capsys):
    from himap.cli import main
    from himap.models.testing import tiny_llava_config

    tiny_llava_config(num_layers=4).save_pretrained(tmp_path / "cfg")
    plot = tmp_path / "lat.png"
    rc = main(["bench", "--model", str(tmp_path / "cfg"), "--random-weights", "--methods", "vanilla,himap",
               "--k", "1", "2", "--reps", "1", "--warmup", "0", "--prompt-tokens", "3", "4",
               "--new-tokens", "2", "--plot", str(plot), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])  # ends with one JSON line
    assert summary["kind"] == "summary" and set(summary["methods"]) == {"vanilla", "himap+k=1,2"}
    assert summary["methods"]["himap+k=1,2"]["kv_cache_lengths"] == [71, 39, 15, 15]  # K1=1, K2=2: 64 -> 32 -> 8
    assert plot.stat().st_size > 0
    assert main(["bench", "--arch", "llava-tiny-cpu"]) == 2
    assert "--random-weights" in capsys.readouterr().err
