"""`himap score` on the project's prediction JSONL (several methods), LLaVA's answer files and
MM-Vet's {id: answer} format, with the table, the final JSON line and clear errors."""

import json
import os

import pytest
from judge_server import FakeJudgeServer

from himap.cli import main
from himap.cli.score import read_predictions
from himap.tasks import DataError, get_task


def run(capsys, *argv):
    rc = main(["score", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_project_jsonl_scored_per_method(fixtures_dir, tmp_path, capsys):
    pope_dir = os.path.join(fixtures_dir, "pope")
    items = get_task("pope").load(pope_dir, split="random", limit=4)  # labels yes, no, yes, no
    rows = []
    for it in items:
        rows.append({"id": it.id, "prediction": "Yes" if it.answer == "yes" else "No.",
                     "method": "vanilla", "task": "pope"})
        rows.append({"id": it.id, "prediction": "Yes", "method": "himap", "task": "pope"})
    path = write_jsonl(tmp_path / "preds.jsonl", rows)
    rc, out, err = run(capsys, "--task", "pope", "--data", pope_dir, "--split", "random",
                       "--predictions", path)
    assert rc == 0, err
    summary = last_json(out)
    assert summary["task"] == "pope" and summary["version"] == get_task("pope").VERSION
    res = summary["methods"]
    assert res["vanilla"]["accuracy"] == 100.0 and res["vanilla"]["splits"]["random"]["f1"] == 100.0
    assert res["himap"]["accuracy"] == 50.0 and res["himap"]["yes_ratio"] == 100.0
    assert res["himap"]["missing"] == 2  # the whole random split was loaded
    assert "2 of 6 items have no prediction" in err
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| method | accuracy |")
    assert table[2].startswith("| vanilla | 100.00 |") and table[3].startswith("| himap | 50.00 |")
    # one method only, and the JSON written to a file
    rc, out, _ = run(capsys, "--task", "pope", "--data", pope_dir, "--split", "random",
                     "--predictions", path, "--method", "himap", "--output", str(tmp_path / "r.json"))
    assert rc == 0 and list(last_json(out)["methods"]) == ["himap"]
    with open(tmp_path / "r.json") as f:
        assert json.load(f)["methods"]["himap"]["accuracy"] == 50.0


def test_llava_answer_file(fixtures_dir, tmp_path, capsys):
    """LLaVA's model_vqa_science answers: {question_id, prompt, text, answer_id, model_id},
    covering text-only questions too (ignored with a note)."""
    sqa_dir = os.path.join(fixtures_dir, "scienceqa")
    items = get_task("scienceqa_img").load(sqa_dir, limit=4)
    texts = [items[0].answer, "The answer is " + items[1].answer + ".", "Z", "FAILED"]
    rows = [{"question_id": it.id, "prompt": it.prompt, "text": t, "answer_id": "x", "model_id": "llava"}
            for it, t in zip(items, texts)]
    rows.append({"question_id": "4", "prompt": "text-only", "text": "B"})  # no image: not in the task
    path = write_jsonl(tmp_path / "llava-v1.5-7b.jsonl", rows)
    rc, out, err = run(capsys, "--task", "scienceqa_img", "--data", sqa_dir, "--predictions", path)
    assert rc == 0, err
    res = last_json(out)["methods"]["llava-v1.5-7b"]
    assert res["n"] == 4 and res["accuracy"] == 50.0 and res["unparsed"] == 2
    assert "1 predictions have ids outside" in err
    rc, out, _ = run(capsys, "--task", "scienceqa_img", "--data", sqa_dir, "--predictions", path,
                     "--label", "published")
    assert list(last_json(out)["methods"]) == ["published"]


def test_mmvet_results_json_and_llava_ids(fixtures_dir, tmp_path, capsys):
    mmvet_dir = os.path.join(fixtures_dir, "mmvet")
    (tmp_path / "mmvet_results.json").write_text(json.dumps({"v1_0": "x = -1 or x = -5", "v1_1": "no idea"}))
    write_jsonl(tmp_path / "llava_mmvet.jsonl", [{"question_id": 0, "text": "x = -1 or x = -5"},
                                                 {"question_id": 1, "text": "no idea"}])

    def reply(body):
        pred = body["messages"][0]["content"].split("\n")[-1].split(" | ")[2]
        return 200, "1.0" if pred.startswith("x = -1") else "0.0"

    with FakeJudgeServer(reply) as server:
        for name in ("mmvet_results.json", "llava_mmvet.jsonl"):
            rc, out, err = run(capsys, "--task", "mmvet", "--data", mmvet_dir, "--predictions",
                               str(tmp_path / name), "--judge-base-url", server.url,
                               "--judge-model", "gpt-4-0613", "--judge-cache", str(tmp_path / "c.jsonl"))
            assert rc == 0, err
            res = last_json(out)["methods"][name.split(".")[0]]
            assert res["judge_score"] == 50.0 and res["n"] == 2
        # the second file asked the same questions: answered from the cache
        assert len(server.requests) == 2
        # without --judge-cache the cache sits beside the (first) prediction file
        rc, _, _ = run(capsys, "--task", "mmvet", "--data", mmvet_dir, "--predictions",
                       str(tmp_path / "mmvet_results.json"), "--judge-base-url", server.url,
                       "--judge-model", "gpt-4-0613")
        assert rc == 0 and os.path.exists(str(tmp_path / "mmvet_results.json") + ".judge_cache.jsonl")


def test_errors_are_clear(fixtures_dir, tmp_path, capsys):
    pope_dir = os.path.join(fixtures_dir, "pope")
    rc, _, err = run(capsys, "--task", "vqa", "--data", pope_dir, "--predictions", "x.jsonl")
    assert rc == 2 and "unknown task" in err
    rc, _, err = run(capsys, "--task", "pope", "--data", pope_dir, "--predictions",
                     str(tmp_path / "none.jsonl"))
    assert rc == 2 and "not found" in err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"qid": 1, "answer": "yes"}])
    rc, _, err = run(capsys, "--task", "pope", "--data", pope_dir, "--predictions", bad)
    assert rc == 2 and "neither id+prediction nor question_id+text" in err
    wrong_ids = write_jsonl(tmp_path / "w.jsonl", [{"id": "v1_0", "prediction": "yes", "method": "m"}])
    rc, _, err = run(capsys, "--task", "pope", "--data", pope_dir, "--predictions", wrong_ids)
    assert rc == 2 and "wrong task, split or id scheme" in err
    other = write_jsonl(tmp_path / "o.jsonl", [{"id": "5", "prediction": "A", "method": "m",
                                                 "task": "scienceqa_img"}])
    rc, _, err = run(capsys, "--task", "pope", "--data", pope_dir, "--predictions", other)
    assert rc == 2 and "for task 'scienceqa_img', not 'pope'" in err
    llava_bench = os.path.join(fixtures_dir, "llava_bench")
    ok = write_jsonl(tmp_path / "lb.jsonl", [{"question_id": 0, "text": "It is red."}])
    rc, _, err = run(capsys, "--task", "llava_bench", "--data", llava_bench, "--predictions", ok)
    assert rc == 2 and "--judge-base-url" in err


def test_read_predictions_formats(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "prediction": "a", "method": "m"},
                                               {"id": "1", "prediction": "b", "method": "m"},
                                               {"question_id": 2, "text": "c"}])
    assert read_predictions(path) == {"m": {"1": "b"}, "p": {"2": "c"}}  # the later line wins
    (tmp_path / "list.json").write_text(json.dumps([{"question_id": 0, "text": "t"}]))
    assert read_predictions(str(tmp_path / "list.json"), canonical=get_task("mmvet").canonical_id) == \
        {"list": {"v1_0": "t"}}
    (tmp_path / "d.json").write_text(json.dumps({"v1_0": 3}))
    with pytest.raises(DataError, match="not text"):
        read_predictions(str(tmp_path / "d.json"))


def test_shapes_needs_no_data_and_renders_no_image(tmp_path, monkeypatch, capsys):
    from himap.tasks import shapes

    monkeypatch.setenv("HIMAP_CACHE", str(tmp_path / "cache"))
    items = shapes.load(None, split="mc,pope", limit=4, render=False)
    rows = [{"id": it.id, "prediction": it.answer, "method": "gold", "task": "shapes"} for it in items]
    path = write_jsonl(tmp_path / "gold.jsonl", rows)
    rc, out, err = run(capsys, "--task", "shapes", "--split", "mc,pope", "--predictions", path)
    assert rc == 0, err
    res = last_json(out)["methods"]["gold"]
    assert res["accuracy"] == 100.0 and res["n"] == 4 and res["missing"] == 396
    assert not (tmp_path / "cache").exists()  # scoring rendered nothing
    # the table's n says what the metric covers: captions are not in `accuracy`
    caps = shapes.load(None, split="caption", limit=2, render=False)
    rows += [{"id": it.id, "prediction": it.answer[0], "method": "gold", "task": "shapes"} for it in caps]
    path = write_jsonl(tmp_path / "gold.jsonl", rows)
    rc, out, err = run(capsys, "--task", "shapes", "--predictions", path)
    assert rc == 0, err
    assert "| gold | 100.00 |" in out and "| 4 of 6 | 594 |" in out


def test_another_tasks_answers_are_refused(fixtures_dir, tmp_path, capsys):
    """A ScienceQA answer file scored as pope (ids that happen to overlap, no yes/no at all) is an
    error, not a score; mostly-unreadable answers only warn."""
    pope_dir = os.path.join(fixtures_dir, "pope")
    ids = [it.id for it in get_task("pope").load(pope_dir)]
    letters = write_jsonl(tmp_path / "sqa.jsonl", [{"question_id": i, "text": "B"} for i in ids[:5]])
    rc, out, err = run(capsys, "--task", "pope", "--data", pope_dir, "--predictions", letters)
    assert rc == 2 and out == ""
    assert "none of the 5 predictions for pope items reads as a yes/no answer" in err
    assert "another task's answer file" in err
    sqa_dir = os.path.join(fixtures_dir, "scienceqa")
    sqa_ids = [it.id for it in get_task("scienceqa_img").load(sqa_dir)]
    yes_no = write_jsonl(tmp_path / "yes.jsonl", [{"question_id": i, "text": "Yes"} for i in sqa_ids])
    rc, _, err = run(capsys, "--task", "scienceqa_img", "--data", sqa_dir, "--predictions", yes_no)
    assert rc == 2 and "reads as an option letter" in err
    mostly = write_jsonl(tmp_path / "m.jsonl", [{"question_id": i, "text": t}
                                               for i, t in zip(ids[:5], ["Yes", "?", "?", "?", "No"])])
    rc, out, err = run(capsys, "--task", "pope", "--data", pope_dir, "--predictions", mostly)
    assert rc == 0 and "only 2 of 5 predictions read as a yes/no answer" in err
