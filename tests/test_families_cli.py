"""`himap generate` (several --image, --video frames), `himap eval` and `himap analyze` on tiny
random models of each family saved with their offline processors (issue 13)."""

import json

import pytest

from himap.cli import main
from himap.models.testing import FAMILIES, VIDEO_FAMILIES, random_images, save_tiny_family_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_files")
    paths = []
    for i, im in enumerate(random_images([(64, 96), (96, 64), (64, 64), (64, 64), (64, 64), (64, 64)], seed=5)):
        paths.append(str(root / f"im{i}.png"))
        im.save(paths[-1])
    return {"images": paths[:2], "frames": paths[2:]}


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    return request.param, save_tiny_family_dir(tmp_path_factory.mktemp(request.param), request.param, seed=2)


def _generate(capsys, model_dir, *argv):
    rc = main(["generate", "--model", model_dir, "--prompt", "What is this ?", "--max-new-tokens", "3",
               "--json", *argv])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err


def _visual_count(model_dir, images, frames=None):
    from himap.models.loading import build_inputs, load_model
    from himap.prune.adapters import visual_token_ids
    from himap.prune.tokens import token_sets

    model, processor = load_model(model_dir)
    inputs = build_inputs(processor, [images], ["What is this ?"], videos=[frames] if frames else None)
    return int(token_sets(inputs["input_ids"], visual_token_ids(model)).image.sum())


def test_generate_with_several_images_and_video(family_dir, files, capsys):
    family, model_dir = family_dir
    k = ["--k", "3", "6"] if family == "qwen3_vl" else []
    rc, out, err = _generate(capsys, model_dir, "--image", files["images"][0], "--image", files["images"][1],
                             "--method", "himap", *k)
    assert rc == 0, err
    n = _visual_count(model_dir, files["images"])
    per_layer = out["stats"]["image_tokens_per_layer"][0]
    assert per_layer[0] == n and per_layer[-1] == (n - n // 2) - int(0.75 * (n - n // 2))
    rc, out, err = _generate(capsys, model_dir, "--image", files["images"][0], "--method", "fastv",
                             "--quota", "image", *(["--k", "3"] if k else []))
    assert rc == 0, err
    rc, out, err = _generate(capsys, model_dir, "--video", *files["frames"], "--method", "himap", *k)
    if family in VIDEO_FAMILIES:
        assert rc == 0, err
        n = _visual_count(model_dir, [], files["frames"])
        assert out["stats"]["image_tokens_per_layer"][0][0] == n
    else:
        assert rc == 2 and "video" in err


def test_eval_through_the_family_chat_template(family_dir, tmp_path, capsys):
    family, model_dir = family_dir
    if family not in ("qwen2_5_vl", "llava_next"):
        return  # one run per decoder kind keeps the suite fast; generate covers the others
    argv = ["eval", "--model", model_dir, "--task", "shapes", "--limit", "3", "--batch-size", "2",
            "--method", "vanilla,himap", "--max-new-tokens", "2", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(final["methods"]) == ["vanilla", "himap"]


def test_analyze_saliency_disrupt_filter(family_dir, tmp_path, capsys):
    family, model_dir = family_dir
    if family != "qwen2_vl":
        return  # M-RoPE family: the analysis reads attention through the same hooks for every family
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, im in enumerate(random_images([(64, 64), (64, 96)], seed=9)):
        im.save(data / f"im{i}.png")
        rows.append({"id": f"q{i}", "image": f"im{i}.png", "question": "What color is it ?", "answer": "red"})
    (data / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for cmd, extra in (("filter", []), ("saliency", []), ("disrupt", ["--windows", "first:1"])):
        rc = main(["analyze", cmd, "--model", model_dir, "--jsonl", str(data / "s.jsonl"),
                   "--out", str(tmp_path / cmd), "--batch-size", "2", *extra])
        out, err = capsys.readouterr()
        assert rc == 0, (cmd, err)


def test_a_method_the_family_cannot_run_is_one_line(tmp_path, files, capsys):
    """VisionZip reads LLaVA-1.5's CLIP tower: on LLaVA-NeXT it is refused with a message and exit 2."""
    model_dir = save_tiny_family_dir(tmp_path / "next", "llava_next", seed=2)
    rc, _, err = _generate(capsys, model_dir, "--image", files["images"][0], "--method", "visionzip")
    assert rc == 2 and "himap generate: error: llava-next models have no vision-tower adapter" in err
    assert "Traceback" not in err
