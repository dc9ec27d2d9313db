"""lmms-eval's model `himap` (himap.integrations.lmms_eval) through the real `lmms-eval` command.

These tests skip only when lmms-eval is not installed (`pip install -e ".[lmms-eval]"`); an lmms-eval
that is installed but fails to import fails them, and under HIMAP_REQUIRE_LMMS_EVAL=1 (what CI
sets, after installing it) a missing lmms-eval is an error, so a skip never stands in for them.
"""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
MISSING = "lmms-eval is not installed (pip install -e '.[lmms-eval]')"
if not HAVE_LMMS_EVAL and os.environ.get("HIMAP_REQUIRE_LMMS_EVAL") == "1":  # CI: these tests must run
    raise RuntimeError(f"HIMAP_REQUIRE_LMMS_EVAL=1 but {MISSING}")
needs_lmms_eval = pytest.mark.skipif(not HAVE_LMMS_EVAL, reason=MISSING)


def test_without_lmms_eval_the_message_says_what_to_install():
    code = ("import sys; sys.modules['lmms_eval'] = None\n"
            "try:\n    import himap.integrations.lmms_eval\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install -e ".[lmms-eval]"' in out and "torch" in out


@needs_lmms_eval
def test_the_entry_point_registers_the_model():
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model

    from himap.integrations.lmms_eval import HimapLmms

    (ep,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "himap"]
    assert ep.value == "himap.integrations:lmms_eval_manifest"
    assert get_model("himap") is HimapLmms


@needs_lmms_eval
def test_results_pass_through_lmms_eval_unchanged():
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output

    from himap.integrations.lmms_eval import PruningTokenCounts

    counts = PruningTokenCounts(input_tokens=5, output_tokens=1, himap={"tflops": 0.5})
    pair, got = unwrap_generation_output(GenerationResult(text=(1.25, True), token_counts=counts))
    assert pair == (1.25, True) and got.to_dict() == {"input_tokens": 5, "output_tokens": 1, "himap": {"tflops": 0.5}}


@needs_lmms_eval
def test_video_frames_are_sampled_uniformly(tmp_path):
    import av
    import numpy as np

    from himap.models.loading import load_video_frames

    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(6):  # frame i is pure red, green or blue (i % 3)
            rgb = np.zeros((32, 32, 3), np.uint8)
            rgb[..., i % 3] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames = load_video_frames(path, 3)  # frames 0, 2, 5 -> red, blue, blue
    assert [int(np.asarray(f).mean((0, 1)).argmax()) for f in frames] == [0, 2, 2]


# ----------------------------------------------------------------------------- the command line

METHODS = ("vanilla", "himap")
TASKS = ("himap_shapes_mc", "himap_shapes_pope", "himap_shapes_mc_ll")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`lmms-eval --config` with one run per method (one process: lmms-eval's startup is paid once)
    on the example tasks reading 4 + 4 exported shapes items, and `himap eval` on the same items."""
    if not HAVE_LMMS_EVAL:
        pytest.skip(MISSING)
    from himap.cli import main as himap_main
    from himap.tasks import shapes

    tmp = tmp_path_factory.mktemp("lmms")
    tasks = tmp / "tasks"
    shutil.copytree(os.path.join(ROOT, "examples", "lmms_eval"), tasks, ignore=shutil.ignore_patterns("data"))
    shapes.export(str(tasks / "data"), split="mc,pope", limit=8)
    config = [{"model": "himap", "model_args": f"pretrained=builtin,method={m}", "tasks": ",".join(TASKS),
               "include_path": str(tasks), "batch_size": 4, "device": "cpu", "log_samples": True,
               "output_path": str(tmp / "out" / m)} for m in METHODS]
    (tmp / "runs.yaml").write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = shutil.which("lmms-eval", path=os.path.dirname(sys.executable)) or "lmms-eval"
    proc = subprocess.run([command, "--config", str(tmp / "runs.yaml")], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    out = {}
    for m in METHODS:
        found = glob.glob(str(tmp / "out" / m / "*" / "*_results.json"))
        assert found, f"lmms-eval wrote no results for {m} (it exits 0 when an evaluation fails):\n{log[-4000:]}"
        samples = {t: [json.loads(line) for line in open(glob.glob(str(tmp / "out" / m / "*" / f"*_samples_{t}.jsonl"))[0])]
                   for t in TASKS}
        out[m] = {"results": json.load(open(found[0])), "samples": samples}
    assert himap_main(["eval", "--model", "builtin", "--task", "shapes", "--split", "mc,pope", "--limit", "8",
                       "--method", ",".join(METHODS), "--batch-size", "4", "--device", "cpu", "--no-progress",
                       "--out", str(tmp / "eval")]) == 0
    from himap.evaluation.runner import run_dir

    directory = run_dir(str(tmp / "eval"), "shapes", "mc,pope")
    out["eval"] = {s["method"]: s for s in json.load(open(os.path.join(directory, "summary.json")))}
    for m in METHODS:
        out["eval"][m]["predictions"] = {r["id"]: r for r in map(json.loads, open(os.path.join(directory, f"{m}.jsonl")))}
    out["log"] = log
    return out


def _item_id(sample) -> str:
    return os.path.splitext(os.path.basename(sample["input_media"][0]))[0]


@needs_lmms_eval
@pytest.mark.parametrize("method", METHODS)
def test_lmms_eval_accuracy_equals_himap_eval(runs, method):
    """Same items, prompts and greedy decoding: the same answers, the same accuracies."""
    results, samples, ours = runs[method]["results"]["results"], runs[method]["samples"], runs["eval"][method]
    assert results["himap_shapes_mc"]["accuracy,none"] == pytest.approx(ours["scores"]["mc_accuracy"], abs=1e-9)
    assert results["himap_shapes_pope"]["accuracy,none"] == pytest.approx(ours["scores"]["pope_accuracy"], abs=1e-9)
    generated = samples["himap_shapes_mc"] + samples["himap_shapes_pope"]
    assert len(generated) == 8
    for s in generated:
        assert s["filtered_resps"].strip() == ours["predictions"][_item_id(s)]["prediction"]
    # scoring by log-likelihood agrees with generation: the choice greedy decoding would produce is the answer
    answers = {_item_id(s): s["filtered_resps"].strip() for s in samples["himap_shapes_mc"]}
    for s in samples["himap_shapes_mc_ll"]:
        greedy = [str(g).lower() == "true" for _, g in s["filtered_resps"]]
        assert greedy.count(True) <= 1 and greedy == [x == answers[_item_id(s)] for x in "ABCD"]
    assert results["himap_shapes_mc_ll"]["acc,none"] == pytest.approx(ours["scores"]["mc_accuracy"] / 100)


@needs_lmms_eval
@pytest.mark.parametrize("method", METHODS)
def test_pruning_statistics_reach_the_sample_logs_and_the_summary(runs, method):
    from himap.cost.flops import PromptShape, full_cost
    from himap.evaluation.runner import arch_of_model
    from himap.prune.schedule import PRESETS, image_tokens_per_layer

    arch = arch_of_model("builtin")
    schedule = PRESETS[method]
    samples, throughput = runs[method]["samples"], runs[method]["results"]["throughput"]
    per_example = {}
    for task in TASKS:
        costs = []
        for s in samples[task]:
            stats = [c["himap"] for c in s["token_counts"]]
            for st in stats:
                assert st["method"] == method and st["visual_tokens"] == 144
                assert st["visual_tokens_per_layer"] == image_tokens_per_layer(schedule, 144, arch.num_layers)
                assert st["kept_visual_tokens"] == ([72, 18] if method == "himap" else [])
                shape = PromptShape(st["system_tokens"], st["instruction_tokens"], st["new_tokens"], 144)
                assert st["tflops"] == pytest.approx(full_cost(arch, schedule, shape).decoder / 1e12, rel=1e-12)
            costs.append(sum(st["tflops"] for st in stats))  # a multiple-choice question: all its choices
        per_example[task] = costs
        assert throughput[f"avg_himap_tflops_per_example/{task}"] == pytest.approx(sum(costs) / len(costs), rel=1e-9)
    everything = [c for costs in per_example.values() for c in costs]
    assert throughput["avg_himap_tflops_per_example"] == pytest.approx(sum(everything) / len(everything), rel=1e-9)
    assert throughput["avg_himap_examples"] == 12
    generated = per_example["himap_shapes_mc"] + per_example["himap_shapes_pope"]
    assert sum(generated) / len(generated) == pytest.approx(runs["eval"][method]["tflops_full"], rel=1e-9)
    ratio = throughput["avg_himap_tflops_per_example"] / throughput["avg_himap_tflops_vanilla_per_example"]
    assert ratio == pytest.approx(1.0) if method == "vanilla" else ratio < 0.7
    assert f"himap ({method}): mean analytic TFLOPs per example" in runs["log"]


@needs_lmms_eval
def test_requests_become_harness_requests_and_padding_is_not_counted():
    from lmms_eval.api.instance import Instance

    from himap.integrations.lmms_eval import HimapLmms

    model = object.__new__(HimapLmms)  # the translation only: no model loaded
    model.task_dict = {"t": {"test": [{"image": "a.png"}, {"image": "b.png"}]}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    meta = {"task": "t", "doc_id": 1, "repeats": 1, "split": "test"}
    real = Instance("generate_until", ("Q?", {"until": ["\n"]}, visual, 1, "t", "test"), 0, dict(meta))
    pad = Instance("generate_until", real.arguments, 0, {**meta, "__padding_only__": True})
    choice = Instance("loglikelihood", ("", " A"), 0, dict(meta))  # acc_mutual_info's unconditional request
    got = [model._request(real, gen_kwargs=real.args[1]), model._request(pad), model._request(choice, continuation=" A")]
    assert (got[0].context, got[0].visuals, got[0].key, got[0].gen_kwargs) == ("Q?", ["b.png"], ("t", "test", 1), {"until": ["\n"]})
    assert got[1].key is None and got[1].visuals == ["b.png"]
    assert (got[2].context, got[2].visuals, got[2].key) == ("", [], ("t", "test", 1))
    with pytest.raises(ValueError, match="applies the model's chat template itself"):
        model.chat_template  # what lmms-eval reads under --apply_chat_template
