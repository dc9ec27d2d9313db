"""Every bad input gets one clean line on stderr and exit code 2, from every command, through the
one error path of himap.cli (himap.cli.common.run_command); checks run before the slow work."""

import json
import os
import subprocess
import sys

import pytest
import torch

from himap.cli import main


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `himap ARGV` in this process (argparse errors included)."""
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean(rc, err, command, *fragments):
    """Exit code 2, no traceback, the message names the command and says what is wrong."""
    assert rc == 2, err
    assert "Traceback" not in err
    assert f"himap {command}: error: " in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory):
    """A missing file, a truncated PNG, a text file and a folder, next to a good image."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("bad_images")
    good = root / "good.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "notes.png").write_text("not an image\n")
    (root / "folder.png").mkdir()
    return {name: str(root / name) for name in ("good.png", "truncated.png", "notes.png", "folder.png",
                                                 "missing.png")}


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading weights fails the test: the check must come before it."""
    import himap.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


GENERATE_CASES = {
    # name: (flags replacing the good ones, fragments of the message); the built-in model has 10 layers
    "missing image": ({"--image": "missing.png"}, ["image file", "not found"]),
    "truncated png": ({"--image": "truncated.png"}, ["damaged or cut short", "truncated"]),
    "text file as image": ({"--image": "notes.png"}, ["not an image file"]),
    "folder as image": ({"--image": "folder.png"}, ["is a folder, not an image file"]),
    "unknown method": ({"--method": "himapp"}, ["unknown method 'himapp'"]),
    "ratio 1.5": ({"--ratio": "1.5"}, ["ratio R must lie in [0, 1), got 1.5"]),
    "K beyond the layers": ({"--k": ["3", "12"]}, ["--k 12: the model has 10 decoder layers", "at most 9"]),
    "K alone beyond the layers": ({"--k": "12"}, ["--k 12: the model has 10 decoder layers"]),
    "cuda on a CPU machine": ({"--device": "cuda" if not torch.cuda.is_available() else "cuda:99"},
                              ["device 'cuda", "torch sees"]),
    "flash-attn missing": ({"--attn": "flash_attention_2"}, ["flash_attention_2"]),
    "max new tokens 0": ({"--max-new-tokens": "0"}, ["--max-new-tokens: must be >= 1, got 0"]),
    "save-kept into no folder": ({"--save-kept": "/no/such/dir/k.png"}, ["folder /no/such/dir does not exist"]),
    "empty prompt": ({"--prompt": ""}, ["--prompt: is empty"]),
    "whitespace prompt": ({"--prompt": "  \n "}, ["--prompt: is empty"]),
    "mistyped builtin": ({"--model": "builtinn"}, ["'builtinn' is neither a local model folder nor a hub id",
                                                   "did you mean 'builtin'"]),
    "model folder missing": ({"--model": "/nonexistent"}, ["model '/nonexistent' does not exist"]),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_bad_input_fails_cleanly_before_loading(case, bad_images, no_model_load, monkeypatch, capsys):
    import transformers

    changes, fragments = GENERATE_CASES[case]
    if "--model" in changes:  # a mistyped model name must not reach the hub (nor any loader)
        monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                            classmethod(lambda cls, *a, **k: pytest.fail("a config was requested")))
    flags = {"--model": "builtin", "--image": "good.png", "--prompt": "Is there a red object?", **changes}
    argv = []
    for flag, value in flags.items():
        argv += [flag, *[bad_images.get(v, v) for v in (value if isinstance(value, list) else [value])]]
    rc, out, err = run(capsys, "generate", *argv)
    assert_clean(rc, err, "generate", *fragments)
    assert out == ""


def test_every_command_reports_bad_input_the_same_way(tmp_path, capsys):
    cases = [
        (["flops", "--arch", "llava-1.5-7b", "--method", "nope"], "flops", "unknown"),
        (["flops", "--arch", "llava-1.5-7b", "--method", "himap", "--k", "40"], "flops",
         "--k 40: the model has 32 decoder layers"),
        (["bench", "--arch", "llava-tiny-cpu", "--random-weights", "--device", "cuda:99"], "bench", "device"),
        (["score", "--task", "nope", "--predictions", "x.jsonl"], "score", "unknown task 'nope'"),
        (["sweep", str(tmp_path / "none.yaml")], "sweep", "none.yaml"),
        (["train-default", "--mix", "{bad"], "train-default", "--mix is not valid JSON"),
        (["demo", "--model", "/nonexistent"], "demo", "model '/nonexistent' does not exist"),
        (["eval", "--task", "nope"], "eval", "unknown task 'nope'"),
        (["eval", "--task", "shapes", "--device", "cuda:99"], "eval", "device 'cuda:99'"),
        (["eval", "--task", "shapes", "--model", "builtinn"], "eval", "did you mean 'builtin'"),
        (["analyze", "saliency", "--task", "shapes", "--device", "cuda:99", "--out", str(tmp_path / "a")],
         "analyze", "device 'cuda:99'"),
        (["analyze", "filter", "--jsonl", str(tmp_path / "none.jsonl")], "analyze", "does not exist"),
    ]
    for argv, command, fragment in cases:
        rc, _, err = run(capsys, *argv)
        assert_clean(rc, err, command, fragment)
    assert not os.path.exists(tmp_path / "a" / "run.json")  # nothing written by a run that could not start


def test_debug_env_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("HIMAP_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown"):
        main(["flops", "--arch", "llava-1.5-7b", "--method", "nope"])


def test_a_bug_is_not_dressed_as_bad_input(monkeypatch):
    import himap.cli.flops as flops

    monkeypatch.setattr(flops, "load_arch", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["flops", "--arch", "llava-1.5-7b"])


def test_as_a_process_one_line_and_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "himap", "generate", "--model", "builtin", "--image",
                           str(tmp_path / "none.png"), "--prompt", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"himap generate: error: image file '{tmp_path / 'none.png'}' not found"]
    version = subprocess.run([sys.executable, "-m", "himap", "--version"], capture_output=True, text=True)
    from himap import __version__

    assert version.returncode == 0 and version.stdout.strip() == f"himap {__version__}"


def test_corrupt_image_in_jsonl_then_the_corrected_rerun(bad_images, tmp_path, capsys):
    """analyze: a corrupt image fails cleanly after the good samples were saved; a run that failed
    before its first sample leaves nothing that blocks a rerun with other settings."""
    rows = [{"id": "good", "image": bad_images["good.png"], "question": "Is there a red object?", "answer": "yes"},
            {"id": "bad", "image": bad_images["truncated.png"], "question": "Is there a red object?", "answer": "no"}]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "filter")
    rc, _, err = run(capsys, "analyze", "filter", "--jsonl", str(samples), "--out", out, "--no-progress")
    assert_clean(rc, err, "analyze", "truncated.png", "damaged or cut short")
    assert [json.loads(l)["id"] for l in open(os.path.join(out, "samples.jsonl"))] == ["good"]
    rows[1]["image"] = bad_images["good.png"]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, stdout, err = run(capsys, "analyze", "filter", "--jsonl", str(samples), "--out", out, "--no-progress")
    assert rc == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["reused"] == 1  # the good sample was kept

    # a run that fails at its first batch (an unknown flow) leaves run.json but no result ...
    dis = str(tmp_path / "disrupt")
    rc, _, err = run(capsys, "analyze", "disrupt", "--jsonl", str(samples), "--out", dis, "--flows", "img2nowhere",
                     "--windows", "first:2", "--no-plots", "--no-progress")
    assert_clean(rc, err, "analyze", "unknown flow")
    assert os.path.exists(os.path.join(dis, "run.json"))
    # ... so the corrected rerun (other settings) runs without --overwrite
    rc, stdout, err = run(capsys, "analyze", "disrupt", "--jsonl", str(samples), "--out", dis, "--flows", "img2ins",
                          "--windows", "first:2", "--no-plots", "--no-progress")
    assert rc == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["computed"] == 2
    # once results exist, other settings are refused as before
    rc, _, err = run(capsys, "analyze", "disrupt", "--jsonl", str(samples), "--out", dis, "--flows", "img2img",
                     "--windows", "first:2", "--no-plots", "--no-progress")
    assert_clean(rc, err, "analyze", "holds a run with other settings", "--overwrite")
