"""`himap generate` and himap.models.loading on a tiny random model saved with an offline processor."""

import json

import pytest

from himap.cli import main
from himap.models.loading import build_inputs, generate_texts, load_model
from himap.models.testing import save_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_with_processor"), seed=3)


def test_generate_prints_answer_and_statistics(model_dir, image_files, tmp_path, capsys):
    image = image_files[0]
    overlay = tmp_path / "kept.png"
    assert main(["generate", "--model", model_dir, "--image", image, "--prompt", "What is the color of the object?",
                 "--method", "himap", "--max-new-tokens", "4", "--save-kept", str(overlay)]) == 0
    out = capsys.readouterr().out
    assert "image tokens per layer:     64 x2, 32 x6, 8 x2" in out
    assert "stage 2 kept image tokens (8)" in out
    assert overlay.exists()
    _assert_titled_panels(str(overlay), panels=3)  # the input, stage 1, stage 2
    assert "himap generate: " in out.strip().splitlines()[-1]  # the one-line summary comes last
    assert main(["generate", "--model", model_dir, "--image", image, "--prompt", "What is it?",
                 "--method", "himap", "--k", "3", "6", "--ratio", "0.25", "0.5", "--max-new-tokens", "2",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stats"]["image_tokens_per_layer"][0] == [64] * 3 + [48] * 3 + [24] * 4
    assert result["method"] == "himap+k=3,6+ratio=0.25,0.5"


def test_batched_generation_equals_one_by_one(model_dir, image_files):
    model, processor = load_model(model_dir)
    model.generation_config.eos_token_id = None
    images = image_files
    prompts = ["What is the color of the object?", "Is there a red square in the image?"]
    inputs = build_inputs(processor, images, prompts)
    assert inputs["attention_mask"][0, 0] == 0 or inputs["attention_mask"][1, 0] == 0  # left padded
    import himap

    with himap.pruned(model, "himap"):
        together = generate_texts(model, processor, images, prompts, max_new_tokens=4)
        alone = [generate_texts(model, processor, [im], [p], max_new_tokens=4)[0] for im, p in zip(images, prompts)]
    assert together == alone


def test_generate_rejects_bad_stage_override(model_dir, image_files, capsys):
    image = image_files[0]
    assert main(["generate", "--model", model_dir, "--image", image, "--prompt", "x", "--k", "2", "12"]) == 2
    assert "--k 12: the model has 10 decoder layers" in capsys.readouterr().err
    assert main(["generate", "--model", model_dir, "--image", image, "--prompt", "x", "--ratio", "1.0"]) == 2
    assert "[0, 1)" in capsys.readouterr().err


def _assert_titled_panels(path, panels, size=336):
    """The overlay has one panel per stage plus the input, each with a title (dark text pixels
    in the strip above it)."""
    import numpy as np
    from PIL import Image

    from himap.analysis.overlay import TITLE_HEIGHT

    pixels = np.asarray(Image.open(path).convert("L"))
    assert pixels.shape == (size + TITLE_HEIGHT, panels * size + 8 * (panels - 1))
    for p in range(panels):
        strip = pixels[:TITLE_HEIGHT, p * (size + 8):p * (size + 8) + size]
        assert (strip < 100).sum() > 20, f"panel {p} has no title"


def test_overlay_titles_name_each_stage():
    from PIL import Image

    from himap.analysis.overlay import kept_overlay

    image = Image.new("RGB", (64, 64), (128, 128, 128))
    out = kept_overlay(image, 16, [list(range(8)), [0, 1]], size=96, titles=["in", "stage 1", "stage 2"])
    assert out.size == (96 * 3 + 16, 96 + 24)
    with pytest.raises(ValueError, match="2 titles for 3 panels"):
        kept_overlay(image, 16, [list(range(8)), [0, 1]], size=96, titles=["a", "b"])


def test_threads_flag_sets_torch_threads(model_dir, image_files, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["generate", "--model", model_dir, "--image", image_files[0], "--prompt", "x",
                     "--max-new-tokens", "1", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", "--model", model_dir, "--image", image_files[0], "--prompt", "x", "--threads", "0"])
        assert exit_info.value.code == 2
        assert "--threads" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
