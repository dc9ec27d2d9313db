"""The offline processor: word-level tokenizer, chat template, image processor, save/reload."""

import numpy as np
import pytest
import torch
from PIL import Image

from himap.builtin import offline_processor as op
from himap.models.testing import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
)

PROMPT = "What color is the circle? Options: (A) red (B) blue. Answer with the option's letter."


@pytest.fixture(scope="module")
def processor():
    return op.build_processor(image_size=32, patch_size=4)


def _images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_vocabulary_ids_and_size():
    vocab = op.vocabulary()
    assert [vocab[t] for t in op.SPECIAL_TOKENS] == [PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, IMAGE_TOKEN_ID, 4]
    assert len(vocab) <= 128  # fits himap.models.testing's tiny models
    assert op.vocabulary(["x", "y", "x"]) == {**{t: i for i, t in enumerate(op.SPECIAL_TOKENS)}, "x": 5, "y": 6}
    with pytest.raises(ValueError, match="whitespace"):
        op.vocabulary(["two words"])


def test_tokenizer_words_punctuation_unknown(processor):
    tok = processor.tokenizer
    v = op.vocabulary()
    ids = tok("Is there a red circle? zebra", add_special_tokens=False)["input_ids"]
    assert ids == [v["Is"], v["there"], v["a"], v["red"], v["circle"], v["?"], v[op.UNK]]
    assert tok("(A)", add_special_tokens=False)["input_ids"] == [v["("], v["A"], v[")"]]
    assert tok.decode(tok("a red circle and a blue square.", add_special_tokens=False)["input_ids"]) == \
        "a red circle and a blue square."
    assert tok.image_token_id == IMAGE_TOKEN_ID and tok.pad_token_id == PAD_TOKEN_ID
    assert tok.padding_side == "left"


def test_chat_template_matches_helper(processor):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == f"<s>USER: <image>\n{PROMPT}\nASSISTANT:" == op.chat_prompt(PROMPT)
    msgs.append({"role": "assistant", "content": "A"})
    full = processor.apply_chat_template(msgs)
    assert full == op.chat_prompt(PROMPT) [:-len("ASSISTANT:")] + "ASSISTANT: A</s>\n"


def test_image_expansion_padding_and_pixels(processor):
    texts = [op.chat_prompt(PROMPT), op.chat_prompt("Is there a red circle?")]
    ims = _images(2)
    out = processor(images=ims, text=texts, return_tensors="pt", padding=True)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ((ids == IMAGE_TOKEN_ID).sum(1) == 64).all()  # (32 / 4)^2
    assert ids[0, 0] == BOS_TOKEN_ID and mask[0].all()  # the longer row has no padding
    n_pad = int((mask[1] == 0).sum())
    assert n_pad > 0 and (ids[1, :n_pad] == PAD_TOKEN_ID).all() and ids[1, n_pad] == BOS_TOKEN_ID  # left pad
    assert out["pixel_values"].shape == (2, 3, 32, 32)
    expected = (torch.from_numpy(np.asarray(ims[0], dtype=np.float32)).permute(2, 0, 1) / 255 - 0.5) / 0.5
    torch.testing.assert_close(out["pixel_values"][0], expected)
    torch.testing.assert_close(op.pixel_values(ims, 32), out["pixel_values"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="32x32"):
        op.pixel_values(_images(1, size=40), 32)


def test_save_and_reload_with_autoprocessor(processor, tmp_path):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    texts = [op.chat_prompt(PROMPT), op.chat_prompt("Provide a one-sentence caption for the provided image.")]
    ims = _images(2, seed=1)
    a = processor(images=ims, text=texts, return_tensors="pt", padding=True)
    b = again(images=ims, text=texts, return_tensors="pt", padding=True)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(a[key], b[key])
    assert again.chat_template == op.CHAT_TEMPLATE


def test_runs_through_tiny_llava(processor):
    from himap.models.testing import tiny_llava

    model = tiny_llava(num_layers=2)
    out = processor(images=_images(1), text=[op.chat_prompt(PROMPT)], return_tensors="pt")
    logits = model(**out).logits
    assert logits.shape == (1, out["input_ids"].shape[1], 128)


def test_bad_sizes():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        op.build_processor(image_size=30, patch_size=4)
