"""The evaluation runner (himap.evaluation.runner): resume, shards, summaries; `himap eval` end to end."""

import contextlib
import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from himap.evaluation import runner as E
from himap.prune.schedule import PRESETS, Schedule, Stage

TOY_TASK = '''
"""A toy task for the runner tests: 12 text-only items whose answer is a letter."""
from himap.tasks.base import Item

NAME = "toy"
NEEDS_DATA = False
VERSION = "3"
METRIC = "accuracy"
DEFAULT_METHOD = "himap"
MAX_NEW_TOKENS = 4
DATA_HELP = "no data needed"


def load(data_dir, split=None, limit=None):
    items = [Item(id=f"q{i}", image=None, prompt=f"question {i}", answer="ABCD"[i % 4],
                  meta={"split": split or "test"}) for i in range(12)]
    return items if limit is None else items[:limit]


def score(items, predictions, **kw):
    right = sum(predictions[it.id] == it.answer for it in items)
    return {"accuracy": 100.0 * right / len(items), "n": len(items)}
'''

FAKE_PREDICT = '''
import contextlib

def answer(method, item_id):
    """Deterministic fake model: vanilla answers all right, pruned methods get every third wrong."""
    i = int(item_id[1:])
    right = "ABCD"[i % 4]
    return right if method == "vanilla" or i % 3 else "E"


def factory(calls, crash_after=None):
    """A PredictorFactory recording (method, id) of every item predicted; raises after
    `crash_after` items to simulate an interrupted run."""
    @contextlib.contextmanager
    def make(schedule, max_new_tokens=None):
        def predict(items):
            if crash_after is not None and len(calls) + len(items) > crash_after:
                raise KeyboardInterrupt("simulated crash")
            calls.extend((schedule.name, it.id) for it in items)
            return [{"prediction": answer(schedule.name, it.id), "latency_s": 0.01,
                     "n_system": 5, "n_image": 576, "n_instruction": 20, "new_tokens": 1}
                    for it in items]
        yield predict
    return make
'''


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    """Register the toy task and the fake predictor as importable modules."""
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "himap_toy_task.py").write_text(TOY_TASK)
    (mod_dir / "himap_fake_predict.py").write_text(FAKE_PREDICT)
    monkeypatch.syspath_prepend(str(mod_dir))
    from himap import tasks

    monkeypatch.setitem(tasks.TASKS, "toy", "himap_toy_task")
    return importlib.import_module("himap_fake_predict"), mod_dir


def _timeless(summaries):
    return [{k: v for k, v in s.items() if k not in E.TIMING_KEYS} for s in summaries]


def _cfg(out, **kw):
    return E.EvalConfig(task="toy", out=str(out), model="fake", progress=False, **kw)


METHODS = [PRESETS["vanilla"], PRESETS["himap"]]


def test_resume_after_crash_equals_uninterrupted_run(toy, tmp_path):
    fake, _ = toy
    ref_calls = []
    ref = E.evaluate(_cfg(tmp_path / "ref", batch_size=2), METHODS, fake.factory(ref_calls))
    assert len(ref_calls) == 24
    assert [s["score"] for s in ref.summaries] == [100.0, 100.0 * 8 / 12]

    calls = []
    with pytest.raises(KeyboardInterrupt):  # dies while predicting vanilla's items 6-7
        E.evaluate(_cfg(tmp_path / "run", batch_size=2), METHODS, fake.factory(calls, crash_after=6))
    path = E.prediction_path(E.run_dir(str(tmp_path / "run"), "toy", None), "vanilla")
    assert [json.loads(l)["id"] for l in open(path)] == ["q0", "q1", "q2", "q3", "q4", "q5"]
    with open(path, "a") as f:  # a crash in the middle of a write leaves half a line
        f.write('{"id": "q6", "predic')

    calls2 = []
    res = E.evaluate(_cfg(tmp_path / "run", batch_size=2), METHODS, fake.factory(calls2))
    assert calls2 == [("vanilla", f"q{i}") for i in range(6, 12)] + [("himap", f"q{i}") for i in range(12)]
    assert _timeless(res.summaries) == _timeless(ref.summaries)
    assert res.predicted == {"vanilla": 6, "himap": 12}
    lines = [json.loads(l) for l in open(path)]
    assert [r["id"] for r in lines] == [f"q{i}" for i in range(12)]
    assert set(lines[0]) >= {"id", "prediction", "method", "task", "split"}
    assert lines[0]["method"] == "vanilla" and lines[0]["task"] == "toy"

    calls3 = []  # a third run has nothing to do and gives the same summary
    res3 = E.evaluate(_cfg(tmp_path / "run", batch_size=2), METHODS, fake.factory(calls3))
    assert calls3 == [] and _timeless(res3.summaries) == _timeless(ref.summaries)


def test_larger_limit_continues_and_summary_covers_selection(toy, tmp_path):
    fake, _ = toy
    calls = []
    small = E.evaluate(_cfg(tmp_path, limit=4, batch_size=3), [PRESETS["himap"]], fake.factory(calls))
    assert small.summaries[0]["n_items"] == 4 and len(calls) == 4
    big = E.evaluate(_cfg(tmp_path, limit=9, batch_size=3), [PRESETS["himap"]], fake.factory(calls))
    assert len(calls) == 9 and [c[1] for c in calls[4:]] == ["q4", "q5", "q6", "q7", "q8"]
    assert big.summaries[0]["n_items"] == 9
    # back to a smaller selection: nothing predicted, the summary covers only the 4 items
    again = E.evaluate(_cfg(tmp_path, limit=4), [PRESETS["himap"]], fake.factory(calls))
    assert len(calls) == 9 and again.summaries[0]["n_items"] == 4
    assert again.summaries[0]["score"] == 100.0 * 2 / 4  # q0 and q3 wrong


def test_changed_schedule_is_refused_then_overwritten(toy, tmp_path):
    fake, _ = toy
    calls = []
    E.evaluate(_cfg(tmp_path, limit=3), [PRESETS["himap"]], fake.factory(calls))
    other = Schedule((Stage(3, 0.5, "phi_sh"),), name="himap")
    with pytest.raises(E.EvalError, match="different settings.*schedule"):
        E.evaluate(_cfg(tmp_path, limit=3), [other], fake.factory(calls))
    with pytest.raises(E.EvalError, match="model"):
        E.evaluate(E.EvalConfig(task="toy", out=str(tmp_path), model="other", limit=3, progress=False),
                   [PRESETS["himap"]], fake.factory(calls))
    E.evaluate(_cfg(tmp_path, limit=3, overwrite=True), [other], fake.factory(calls))
    assert len(calls) == 6
    # settings left by a run that predicted nothing (it failed first) do not block a new one
    with pytest.raises(KeyboardInterrupt):
        E.evaluate(_cfg(tmp_path, limit=3), [PRESETS["fastv"]], fake.factory(calls, crash_after=0))
    E.evaluate(_cfg(tmp_path, limit=3, max_new_tokens=9), [PRESETS["fastv"]], fake.factory(calls))
    assert len(calls) == 9


def test_summary_files_and_costs(toy, tmp_path):
    fake, _ = toy
    from himap.cost.flops import ARCHS

    res = E.evaluate(_cfg(tmp_path), [PRESETS["vanilla"], PRESETS["fastv"], PRESETS["himap"]],
                     fake.factory([]), arch=ARCHS["llava-1.5-7b"])
    by = {s["method"]: s for s in res.summaries}
    # paper convention (Table 1, truncated to 2 decimals: 2.98, 1.56, 0.73)
    assert [int(by[m]["tflops_paper"] * 100) for m in ("vanilla", "fastv", "himap")] == [298, 156, 73]
    assert by["vanilla"]["tflops_paper_ratio"] == 1.0
    assert by["himap"]["tflops_full"] < by["fastv"]["tflops_full"] < by["vanilla"]["tflops_full"]
    from himap.cost.flops import (  # the fake records' shape: 5 + 576 + 20 tokens, 1 new
        PromptShape,
        full_cost,
    )

    assert by["himap"]["tflops_full"] == pytest.approx(
        full_cost(ARCHS["llava-1.5-7b"], PRESETS["himap"], PromptShape(5, 20, 1, 576)).decoder / 1e12)
    assert by["himap"]["task_version"] == "3" and by["himap"]["himap_version"]
    assert by["himap"]["schedule"][1] == {"k": 8, "ratio": 0.75, "criterion": "phi_dp", "seed": 0,
                                          "drop_all": False}
    assert by["himap"]["latency_s_per_example"] == pytest.approx(0.01)
    on_disk = json.load(open(os.path.join(res.directory, "summary.json")))
    assert on_disk == res.summaries
    md = open(os.path.join(res.directory, "summary.md")).read()
    assert md == res.markdown and "| himap | 66.67 | 12 | 0.735 | 25% |" in md
    # no cost model: the table says so rather than printing a number
    none = E.evaluate(_cfg(tmp_path / "b"), [PRESETS["himap"]], fake.factory([]), arch=None)
    assert none.summaries[0]["tflops_paper"] is None and "unavailable" in none.summaries[0]["flops_note"]
    assert "| himap | 66.67 | 12 | unavailable | unavailable | unavailable |" in none.markdown


def test_scoring_failure_is_reported_not_hidden(toy, tmp_path, monkeypatch):
    fake, _ = toy
    task = importlib.import_module("himap_toy_task")

    def no_judge(items, predictions, **kw):
        raise RuntimeError("no judge configured")

    monkeypatch.setattr(task, "score", no_judge)
    res = E.evaluate(_cfg(tmp_path, limit=2), [PRESETS["himap"]], fake.factory([]))
    assert res.summaries[0]["score"] is None
    assert "no judge configured" in res.summaries[0]["scores"]["error"]
    assert "unavailable: RuntimeError: no judge configured" in res.markdown


def test_bad_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "prediction": "A"}\n{"id": oops\n{"id": "b", "prediction": "B"}\n')
    with pytest.raises(E.EvalError, match="m.jsonl:2"):
        E.read_records(str(path))
    path.write_text('{"id": "a", "prediction": "A"}\n{"id": "b", "pre')
    assert [r["id"] for r in E.read_records(str(path))] == ["a"]


def test_shard_and_dist_env():
    assert E.shard(list(range(7)), 1, 3) == [1, 4]
    assert E.dist_env({}) == (0, 1)
    assert E.dist_env({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    with pytest.raises(E.EvalError):
        E.dist_env({"RANK": "2", "WORLD_SIZE": "2"})


SHARD_SCRIPT = textwrap.dedent('''
    import sys
    from himap.evaluation import runner as E
    from himap import tasks
    from himap.prune.schedule import PRESETS
    import himap_fake_predict as fake
    tasks.TASKS["toy"] = "himap_toy_task"
    rank, world = E.dist_env()
    cfg = E.EvalConfig(task="toy", out=sys.argv[1], model="fake", batch_size=2, rank=rank,
                       world_size=world, progress=False, poll_s=0.05, merge_timeout_s=60)
    calls = []
    res = E.evaluate(cfg, [PRESETS["vanilla"], PRESETS["himap"]], fake.factory(calls))
    print("CALLS", rank, sorted({c[1] for c in calls}))
''')


def test_sharded_two_processes_equal_one_process(toy, tmp_path):
    fake, mod_dir = toy
    single = E.evaluate(_cfg(tmp_path / "one", batch_size=2), METHODS, fake.factory([]))
    script = tmp_path / "shard_run.py"
    script.write_text(SHARD_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(mod_dir), os.environ.get("PYTHONPATH", "")]),
               WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "two")],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert "CALLS 0 ['q0', 'q10', 'q2', 'q4', 'q6', 'q8']" in outs[0][0]
    assert "CALLS 1 ['q1', 'q11', 'q3', 'q5', 'q7', 'q9']" in outs[1][0]
    d1, d2 = single.directory, E.run_dir(str(tmp_path / "two"), "toy", None)
    for method in ("vanilla", "himap"):
        assert open(E.prediction_path(d1, method)).read() == open(E.prediction_path(d2, method)).read()
        assert E.method_files(d2, method) == [E.prediction_path(d2, method)]  # shards merged away
    assert _timeless(json.load(open(os.path.join(d2, "summary.json")))) == _timeless(single.summaries)


# ---------------------------------------------------------------- end to end: tiny model, every task

def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path.parent)


def _published_format_data(name, fixtures_dir, tmp_path):
    """A data folder for `name`: the fixture files (tests/fixtures) where they exist, small files
    in the published formats written here otherwise."""
    fixture = {"pope": "pope", "scienceqa_img": "scienceqa", "llava_bench": "llava_bench", "mmvet": "mmvet"}
    if name in fixture:
        return os.path.join(fixtures_dir, fixture[name])
    if name == "aokvqa_mc":
        return _write_json(tmp_path / "aok" / "aokvqa_v1p0_val.json", [
            {"split": "val", "image_id": 461751 + i, "question_id": f"q{i}", "question": f"What is {i}?",
             "choices": ["red", "blue", "green", "gray"], "correct_choice_idx": i % 4} for i in range(3)])
    if name == "nocaps":
        return _write_json(tmp_path / "nocaps" / "nocaps_val_4500_captions.json", {
            "images": [{"id": i, "file_name": f"{i:04d}.jpg", "domain": "in-domain"} for i in range(3)],
            "annotations": [{"image_id": i, "id": i, "caption": f"A red circle number {i}."} for i in range(3)]})
    if name == "flickr30k":
        return _write_json(tmp_path / "flickr" / "dataset_flickr30k.json", {"images": [
            {"filename": f"{i}.jpg", "split": "test", "imgid": i,
             "sentences": [{"raw": "A blue square.", "tokens": ["a", "blue", "square"]}]} for i in range(3)]})
    if name == "shapes":  # generated: its images are rendered into the data folder
        return str(tmp_path / "shapes")
    raise AssertionError(f"no test data for task {name!r}")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random tiny LLaVA (16 layers, so K2 = 15 fits) with the offline processor, saved."""
    from himap.models.testing import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llava"), num_layers=16)


def _make_images(task, data, image_dir, limit):
    """Small generated images wherever the task's items expect them."""
    from PIL import Image

    kwargs = {"image_dir": image_dir} if "image_dir" in E.inspect.signature(task.load).parameters else {}
    for i, it in enumerate(task.load(data, limit=limit, **kwargs)):
        if it.image is not None and not os.path.isfile(it.image):
            os.makedirs(os.path.dirname(it.image), exist_ok=True)
            Image.new("RGB", (40 + 8 * i, 30), (40 * i % 255, 120, 200)).save(it.image)
    return kwargs


def _judge_reply(body):
    text = json.dumps(body["messages"])
    return 200, ("8 6\nThe second answer is less detailed." if "Assistant 1" in text else "0.5")


@pytest.mark.parametrize("name", sorted(__import__("himap.tasks", fromlist=["TASKS"]).TASKS))
def test_eval_cli_end_to_end_every_task(name, tiny_model_dir, fixtures_dir, tmp_path, capsys, monkeypatch):
    from judge_server import FakeJudgeServer

    from himap import cli
    from himap.tasks import get_task

    try:
        task = get_task(name)
    except ModuleNotFoundError:
        pytest.fail(f"task module for {name!r} is missing")
    data = _published_format_data(name, fixtures_dir, tmp_path)
    kwargs = _make_images(task, data, str(tmp_path / "images"), 3)
    out = tmp_path / "out"
    argv = ["eval", "--model", tiny_model_dir, "--task", name, "--limit", "3", "--batch-size", "2",
            "--method", "vanilla,default", "--max-new-tokens", "3", "--out", str(out), "--no-progress",
            "--tokenizer", "python"]
    argv += (["--data", data] if data else []) + (["--image-dir", kwargs["image_dir"]] if kwargs else [])
    judged = name in ("llava_bench", "mmvet")
    with contextlib.ExitStack() as stack:
        if judged:
            server = stack.enter_context(FakeJudgeServer(_judge_reply))
            monkeypatch.setenv("HIMAP_TEST_JUDGE_KEY", "sk-test")
            argv += ["--judge-base-url", server.url, "--judge-model", "judge-x",
                     "--judge-api-key-env", "HIMAP_TEST_JUDGE_KEY"]
        assert cli.main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    final = json.loads(printed[-1])
    methods = ["vanilla", task.DEFAULT_METHOD]
    assert list(final["methods"]) == methods and final["task_version"] == str(task.VERSION)
    directory = E.run_dir(str(out), task.NAME, None)
    summary = json.load(open(os.path.join(directory, "summary.json")))
    assert [s["method"] for s in summary] == methods
    for s in summary:
        assert s["n_items"] == 3 and s["metric"] == task.METRIC
        assert isinstance(s["score"], (int, float)), s["scores"]  # judged tasks too (fake judge)
        assert s["tflops_paper"] > 0 and s["tflops_full"] > 0 and s["latency_s_per_example"] > 0
        records = [json.loads(l) for l in open(E.prediction_path(directory, s["method"]))]
        assert len(records) == 3 and all(r["method"] == s["method"] and r["task"] == task.NAME for r in records)
        assert all(r["n_image"] == 64 and 1 <= r["new_tokens"] <= 3 for r in records)
    assert summary[1]["tflops_paper"] < summary[0]["tflops_paper"]  # the default method prunes
    md = open(os.path.join(directory, "summary.md")).read()
    assert all(f"| {m} |" in md for m in methods) and md.strip() in "\n".join(printed)
    # a rerun resumes everything: nothing predicted, no model loaded, same scores
    assert cli.main(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["predicted"] == {} and {m: v["score"] for m, v in again["methods"].items()} == \
        {m: v["score"] for m, v in final["methods"].items()}


def test_eval_cli_sharded_ranks_equal_one_process(tiny_model_dir, fixtures_dir, tmp_path, capsys, monkeypatch):
    """`himap eval` under RANK/WORLD_SIZE (what torchrun sets) with the tiny model: rank 1 then
    rank 0 (which merges) give the same predictions and summary as one process (timings aside).
    Two ranks running concurrently are covered by test_sharded_two_processes_equal_one_process."""
    from himap import cli
    from himap.tasks import get_task

    data = os.path.join(fixtures_dir, "pope")
    _make_images(get_task("pope"), data, str(tmp_path / "images"), 5)
    args = ["eval", "--model", tiny_model_dir, "--task", "pope", "--data", data,
            "--image-dir", str(tmp_path / "images"), "--limit", "5", "--batch-size", "2",
            "--method", "vanilla,himap", "--max-new-tokens", "3", "--no-progress"]
    assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    outs = []
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        capsys.readouterr()
        assert cli.main(args + ["--out", str(tmp_path / "two")]) == 0
        outs.append(capsys.readouterr().out.strip().splitlines()[-1])
        if rank == "1":  # rank 1 leaves its shard files and no summary
            d2 = E.run_dir(str(tmp_path / "two"), "pope", None)
            assert sorted(f for f in os.listdir(d2) if "rank" in f) == ["himap.rank1of2.jsonl",
                                                                         "vanilla.rank1of2.jsonl"]
            assert not os.path.exists(os.path.join(d2, "summary.json"))
    assert json.loads(outs[0]) == {"rank": 1, "world_size": 2, "predicted": {"vanilla": 2, "himap": 2}}
    assert json.loads(outs[1])["predicted"] == {"vanilla": 3, "himap": 3}
    keep = ("id", "prediction", "method", "task", "split", "n_system", "n_image", "n_instruction", "new_tokens")
    for method in ("vanilla", "himap"):
        a, b = (E.prediction_path(E.run_dir(str(tmp_path / d), "pope", None), method) for d in ("one", "two"))
        rows_a = [{k: r[k] for k in keep} for r in map(json.loads, open(a))]
        rows_b = [{k: r[k] for k in keep} for r in map(json.loads, open(b))]
        assert rows_a == rows_b and len(rows_a) == 5
    s1, s2 = (json.load(open(os.path.join(E.run_dir(str(tmp_path / d), "pope", None), "summary.json")))
              for d in ("one", "two"))
    assert _timeless(s1) == _timeless(s2)


# ---------------------------------------------------------------- choosing items: --ids, --skip-missing

def test_eval_ids_and_skip_missing(tiny_model_dir, fixtures_dir, tmp_path, capsys):
    """--ids picks items; --skip-missing runs the items whose image exists and says how many it
    left out; without it the run is refused with a hint; --limit applies to what remains."""
    from PIL import Image

    from himap import cli
    from himap.tasks import get_task

    data = os.path.join(fixtures_dir, "pope")
    images = tmp_path / "images"
    images.mkdir()
    items = get_task("pope").load(data, image_dir=str(images))
    present = [it for it in items if it.image.endswith("900001.jpg")]  # 2 questions per split share it
    Image.new("RGB", (40, 30), (200, 30, 30)).save(present[0].image)
    base = ["eval", "--model", tiny_model_dir, "--task", "pope", "--data", data, "--image-dir", str(images),
            "--method", "vanilla", "--max-new-tokens", "2", "--no-progress", "--batch-size", "4"]
    rc = cli.main(base + ["--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert rc == 2 and "10 of 16 items have no image file" in err and "--skip-missing" in err

    assert cli.main(base + ["--out", str(tmp_path / "skip"), "--skip-missing"]) == 0
    out, err = capsys.readouterr()
    final = json.loads(out.strip().splitlines()[-1])
    assert final["n_items"] == 6 and final["skipped_missing"] == 10
    assert "--skip-missing left out 10 of 16 items whose image file is absent; evaluating 6" in err
    ran = [json.loads(l)["id"] for l in open(E.prediction_path(E.run_dir(str(tmp_path / "skip"), "pope", None), "vanilla"))]
    assert sorted(ran) == sorted(it.id for it in present)

    assert cli.main(base + ["--out", str(tmp_path / "limit"), "--skip-missing", "--limit", "3"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["n_items"] == 3 and final["methods"]["vanilla"]["n_items"] == 3  # one per split

    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([present[0].id, present[-1].id, "no-such-id"]))
    assert cli.main(base + ["--out", str(tmp_path / "ids"), "--ids", str(ids)]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["n_items"] == 2 and final["skipped_missing"] == 0
    ids.write_text(json.dumps(["v1_0"]))
    assert cli.main(base + ["--out", str(tmp_path / "ids"), "--ids", str(ids)]) == 2
    assert "none of the 1 ids in" in capsys.readouterr().err


def test_builtin_model_runs_the_caption_preset_scaled_to_its_depth(fixtures_dir, tmp_path, capsys):
    """himap-caption's K2 = 15 does not fit the built-in model's 10 layers: it is scaled to
    K = (1, 5) with a note, and mmvet runs on the items whose image ships with the fixture."""
    from himap import cli
    from himap.prune.schedule import fit_to_depth

    assert fit_to_depth(PRESETS["himap"], 10) is PRESETS["himap"]  # fits: unchanged
    scaled = fit_to_depth(PRESETS["himap-caption"], 10)
    assert [(s.k, s.ratio, s.criterion) for s in scaled.stages] == [(1, 0.5, "phi_sh"), (5, 0.75, "phi_dp")]
    assert [s.k for s in fit_to_depth(PRESETS["himap-13b-caption"], 10).stages] == [1, 4]  # 3, 15 of 40 layers
    # 8 and 9 of 32 layers both round to 1 of 4: the second is raised to stay strictly increasing
    assert [s.k for s in fit_to_depth(Schedule((Stage(8, 0.5), Stage(9, 0.5))), 4).stages] == [1, 2]
    with pytest.raises(ValueError, match="cannot be scaled"):
        fit_to_depth(Schedule((Stage(1, 0.5), Stage(2, 0.5), Stage(3, 0.5))), 3)

    argv = ["eval", "--model", "builtin", "--task", "mmvet", "--data", os.path.join(fixtures_dir, "mmvet"),
            "--skip-missing", "--max-new-tokens", "4", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "note: himap-caption: K=(2, 15) does not fit this model's 10 decoder layers; scaled to its depth: K=(1, 5)" in err
    final = json.loads(out.strip().splitlines()[-1])
    assert list(final["methods"]) == ["vanilla", "himap-caption"] and final["n_items"] == 3
    summary = json.load(open(os.path.join(E.run_dir(str(tmp_path), "mmvet", None), "summary.json")))
    assert [s["k"] for s in summary[1]["schedule"]] == [1, 5]
    assert summary[1]["score"] is None and "judge" in summary[1]["scores"]["error"]  # no judge given: scored later
