"""`himap analyze filter | saliency | disrupt` end to end on a tiny random model with an offline
processor, plus the data helpers they rely on (answers, ids, image removal, resumable files)."""

import json
import os

import pytest
import torch

from himap.analysis.data import (
    ResultFile,
    answer_tokens,
    blank_image,
    drop_image_tokens,
    load_items,
    sample_seed,
)
from himap.analysis.filter import FilterConfig, filter_batch, first_tokens
from himap.cli import main
from himap.models.testing import IMAGE_TOKEN_ID, PAD_TOKEN_ID
from himap.tasks.base import read_ids

N_LAYERS = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny model + processor, four images and a samples JSONL whose answers make the
    first two samples need their image (when the model's answers with and without differ)."""
    from PIL import Image

    from himap.analysis.data import build_batch, read_jsonl_items
    from himap.models.loading import load_model
    from himap.models.testing import save_tiny_model_dir

    root = tmp_path_factory.mktemp("analyze")
    model_dir = root / "model"
    save_tiny_model_dir(model_dir, seed=0, num_layers=N_LAYERS)
    data = root / "data"
    data.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (40, 30), (60 * i, 200 - 50 * i, 90)).save(data / f"im{i}.png")
        rows.append({"id": f"q{i}", "image": f"im{i}.png", "question": "What color is the circle ?", "answer": "red"})
    rows.append({"id": "text-only", "image": None, "question": "Is it red ?", "answer": "yes"})
    path = data / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    model, processor = load_model(str(model_dir))
    tok = processor.tokenizer
    items = read_jsonl_items(str(path))[:4]
    inputs = build_batch(processor, items)
    with_img = first_tokens(model, inputs)
    without = first_tokens(model, drop_image_tokens(inputs, IMAGE_TOKEN_ID, PAD_TOKEN_ID))
    for i, row in enumerate(rows[:4]):  # q0, q1: the answer with the image; q2, q3: the one without
        row["answer"] = tok.decode([with_img[i] if i < 2 else without[i]])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected_kept = [r["id"] for i, r in enumerate(rows[:2])
                     if without[i] not in answer_tokens(tok, r["answer"])[1]]
    assert expected_kept, "fixture model answers the same with and without the image; change the seed"
    return {"root": root, "model": str(model_dir), "jsonl": str(path), "kept": expected_kept}


def _run(capsys, *argv):
    rc = main(["analyze", *argv])
    out, err = capsys.readouterr()
    lines = [l for l in out.splitlines() if l.strip()]
    return rc, (json.loads(lines[-1]) if rc == 0 else None), err


def _base(ws, out, *extra):
    return ["--model", ws["model"], "--jsonl", ws["jsonl"], "--out", str(out), *extra]


def test_filter_then_saliency_and_disrupt_on_the_kept_ids(workspace, capsys):
    ws, root = workspace, workspace["root"]
    rc, line, err = _run(capsys, "filter", *_base(ws, root / "filter"))
    assert rc == 0, err
    kept_file = root / "filter" / "kept_ids.json"
    assert json.loads(kept_file.read_text()) == ws["kept"] and line["kept_ids_file"] == str(kept_file)
    assert line["n"] == 5 and line["skipped"] == 1 and line["kept"] == len(ws["kept"])
    recs = [json.loads(l) for l in (root / "filter" / "samples.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in recs}
    assert by_id["text-only"] == {"id": "text-only", "skipped": "no image"}
    assert not by_id["q3"]["keep"] and by_id["q3"]["correct_without"]
    assert all(by_id[i]["correct_with"] and not by_id[i]["correct_without"] for i in ws["kept"])

    rc, line, err = _run(capsys, "saliency", *_base(ws, root / "sal", "--ids", str(kept_file),
                                                    "--save-matrix-layer", "1", "--batch-size", "2"))
    assert rc == 0, err
    assert line["n"] == len(ws["kept"]) and line["accuracy"] == 1.0  # kept samples are answered correctly
    summary = json.loads((root / "sal" / "summary.json").read_text())
    assert summary["means"]["layers"] == list(range(N_LAYERS))
    assert all(v is not None and v >= 0 for k in ("S_sys", "S_img", "S_ins", "S_vv", "S_vt")
               for v in summary["means"][k])
    rec = json.loads((root / "sal" / "samples.jsonl").read_text().splitlines()[0])
    import numpy as np

    npz = np.load(root / "sal" / rec["matrix_file"])
    n_valid = sum(rec["counts"].values())
    assert npz["matrix"].shape == (n_valid, n_valid) and len(npz["image"]) == 64
    assert all(os.path.isfile(f) for f in line["figures"]) and len(line["figures"]) == 2

    rc, line, err = _run(capsys, "disrupt", *_base(ws, root / "dis", "--ids", str(kept_file),
                                                   "--windows", "first:1,last:2", "--batch-size", "2"))
    assert rc == 0, err
    summary = json.loads((root / "dis" / "summary.json").read_text())
    assert summary["correct_before"] == len(ws["kept"])
    assert set(summary["conditions"]) == {f"{f}@{w}" for f in ("img2ins", "img2img", "img2rnd")
                                          for w in ("first1", "last2")}
    assert set(summary["D"]) == {"first1", "last2"} and set(line["D"]) == {"first1", "last2"}
    for w, d in summary["D"].items():
        e_vv = summary["conditions"][f"img2img@{w}"]["E"]
        assert d["E_vv"] == e_vv and (d["D"] is None) == (e_vv <= 0 or d["E_vt"] <= 0)
    assert all(os.path.isfile(f) for f in line["figures"])


def test_an_interrupted_run_resumes_to_the_same_summary(workspace, capsys):
    ws, root = workspace, workspace["root"]
    args = ("--windows", "last:1", "--flows", "img2ins,img2rnd", "--no-plots")
    rc, line, err = _run(capsys, "disrupt", *_base(ws, root / "resumed", "--limit", "2", *args))
    assert rc == 0 and line["computed"] == 2, err
    samples = root / "resumed" / "samples.jsonl"
    first_two = samples.read_text()
    with open(samples, "a") as f:  # a crash in the middle of writing the third record
        f.write('{"id": "q2", "target": 1')
    rc, line, err = _run(capsys, "disrupt", *_base(ws, root / "resumed", *args))
    assert rc == 0, err
    assert (line["computed"], line["reused"], line["skipped"]) == (2, 2, 1)  # q2, q3 computed; q0, q1 reused
    assert samples.read_text().startswith(first_two)
    assert len(samples.read_text().splitlines()) == 5
    rc, fresh, err = _run(capsys, "disrupt", *_base(ws, root / "fresh", *args))
    assert rc == 0 and fresh["computed"] == 4, err
    a = json.loads((root / "resumed" / "summary.json").read_text())
    b = json.loads((root / "fresh" / "summary.json").read_text())
    assert a == b
    # a finished run reruns without computing anything
    rc, line, err = _run(capsys, "disrupt", *_base(ws, root / "fresh", *args))
    assert rc == 0 and line["computed"] == 0 and line["reused"] == 4


def test_bad_runs_fail_clearly(workspace, capsys, tmp_path):
    ws, root = workspace, workspace["root"]
    rc, _, err = _run(capsys, "saliency", *_base(ws, root / "sal2", "--limit", "1", "--layers", "0"))
    assert rc == 0, err
    rc, _, err = _run(capsys, "saliency", *_base(ws, root / "sal2", "--limit", "1", "--layers", "1"))
    assert rc == 2 and "other settings" in err and "layers" in err
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": "x.png", "question": "Describe it", "answer": ["a", "b"]}) + "\n")
    rc, _, err = _run(capsys, "filter", "--model", ws["model"], "--jsonl", str(captions), "--out", str(tmp_path / "o"))
    assert rc == 2 and "short text answers" in err
    rc, _, err = _run(capsys, "saliency", *_base(ws, tmp_path / "o2", "--ids", str(captions)))
    assert rc == 2 and "id" in err
    # a task that reads files needs --data-dir, said clearly; the built-in shapes task does not
    rc, _, err = _run(capsys, "filter", "--model", ws["model"], "--task", "pope", "--out", str(tmp_path / "o3"))
    assert rc == 2 and "needs its data folder (--data-dir DIR)" in err
    assert [it.meta["split"] for it in load_items(task="shapes", split="mc,pope", limit=4)] == ["mc", "mc", "pope", "pope"]


def test_answer_tokens_accept_case_and_space_variants():
    from himap.builtin.offline_processor import build_tokenizer

    tok = build_tokenizer()
    target, accepted = answer_tokens(tok, "yes")
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("yes", "Yes", "no")}
    assert target == ids["yes"] and set(accepted) == {ids["yes"], ids["Yes"]}
    assert answer_tokens(tok, "A")[0] == tok.convert_tokens_to_ids("A")
    assert answer_tokens(tok, "red circle")[0] == tok.convert_tokens_to_ids("red")  # first token only
    for bad in (["a caption"], "", None):
        with pytest.raises(ValueError, match="short text answer"):
            answer_tokens(tok, bad)


def test_drop_and_blank_image():
    ids = torch.tensor([[0, 1, 5, 3, 3, 3, 7, 8], [1, 6, 3, 3, 3, 9, 9, 9]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8])
    out = drop_image_tokens({"input_ids": ids, "attention_mask": mask, "pixel_values": torch.ones(2, 3)}, 3, 0)
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].tolist() == [[0, 1, 5, 7, 8], [1, 6, 9, 9, 9]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    blank = blank_image({"input_ids": ids, "pixel_values": torch.ones(2, 3)})
    assert torch.equal(blank["pixel_values"], torch.zeros(2, 3)) and blank["input_ids"] is ids


def test_filter_batch_keeps_samples_that_need_the_image():
    from himap.models.testing import tiny_inputs, tiny_llava

    model = tiny_llava(seed=1, num_layers=2)
    inputs = tiny_inputs(model.config, n_system=(3, 4), n_instruction=(5, 2), seed=4)
    with_img = first_tokens(model, inputs)
    without = first_tokens(model, drop_image_tokens(inputs, IMAGE_TOKEN_ID, PAD_TOKEN_ID))
    recs = filter_batch(model, inputs, [{with_img[0]}, {without[1]}])
    assert recs[0]["pred_with"] == with_img[0] and recs[0]["keep"] == (with_img[0] != without[0])
    assert recs[1]["correct_without"] and not recs[1]["keep"]
    blank = filter_batch(model, inputs, [{with_img[0]}, {with_img[1]}], FilterConfig(without="blank"))
    assert blank[0]["correct_with"] and blank[1]["correct_with"]


def test_ids_files_result_files_and_seeds(tmp_path):
    p = tmp_path / "ids.json"
    p.write_text(json.dumps(["a", 2, {"id": "c"}]))
    assert read_ids(str(p)) == ["a", "2", "c"]
    p.write_text('{"id": "x"}\n"y"\n')
    assert read_ids(str(p)) == ["x", "y"]
    jl = tmp_path / "s.jsonl"
    jl.write_text("".join(json.dumps({"image": f"i{i}.png", "question": "q", "answer": "A"}) + "\n" for i in range(5)))
    p.write_text(json.dumps(["4", "2", "5"]))
    items = load_items(jsonl=str(jl), ids_file=str(p), limit=2)
    assert [it.id for it in items] == ["2", "4"] and items[0].image == str(tmp_path / "i1.png")
    rf = tmp_path / "r.jsonl"
    rf.write_text('{"id": "a", "v": 1}\n{"id": "b", "v"')
    res = ResultFile(str(rf))
    assert list(res.records) == ["a"] and rf.read_text() == '{"id": "a", "v": 1}\n'
    res.append({"id": "b", "v": 2})
    assert "b" in ResultFile(str(rf))
    rf.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="not valid JSON"):
        ResultFile(str(rf))
    assert sample_seed(0, "q1") == sample_seed(0, "q1") != sample_seed(1, "q1")
