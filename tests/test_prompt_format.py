"""The llava-v1 prompt format (LLaVA's vicuna_v1 conversation, as the official HiMAP scripts build
it) and generation without KV cache (the official code's use_cache=False), issue 14."""

import json

import pytest
import torch
from PIL import Image

import himap
from himap.cli import main
from himap.models.loading import build_inputs, chat_text, generate_ids, llava_v1_text
from himap.models.testing import (
    IMAGE_TOKEN_ID,
    save_tiny_model_dir,
    tiny_inputs,
    tiny_llama_processor,
    tiny_llava,
)
from himap.prune import criteria
from himap.prune.schedule import Schedule, Stage
from himap.prune.tokens import token_sets

# LLaVA's conv_vicuna_v1 (llava/conversation.py), written out from its definition: separator
# style TWO with seps (" ", "</s>"), roles ("USER", "ASSISTANT"); a user message followed by an
# open assistant turn renders as system + sep + "USER: " + message + sep + "ASSISTANT:".
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def vicuna_v1_prompt(message: str) -> str:
    seps = (" ", "</s>")
    return VICUNA_V1_SYSTEM + seps[0] + "USER" + ": " + message + seps[0] + "ASSISTANT" + ":"


def tokenizer_image_token_reference(text: str, tokenizer, image_ids: list[int]) -> list[int]:
    """LLaVA's tokenizer_image_token written out: split at "<image>", tokenize each chunk with the
    tokenizer's special tokens, keep the first chunk's BOS once and drop each chunk's first id,
    put the image tokens between the chunks."""
    chunks = [tokenizer(c).input_ids for c in text.split("<image>")]
    assert chunks[0][0] == tokenizer.bos_token_id
    ids = [chunks[0][0]]
    for i, chunk in enumerate(chunks):
        if i:
            ids += image_ids
        ids += chunk[1:]
    return ids


QUESTIONS = ["What is shown here?\nA. a cat\nB. a dog\nAnswer with the option's letter from the given choices directly.",
             "Is it red?"]


def test_llava_v1_text_is_the_vicuna_v1_conversation():
    from himap.builtin.offline_processor import build_processor

    proc = build_processor(image_size=32, patch_size=4)
    for q in QUESTIONS:
        assert chat_text(proc, q, prompt_format="llava-v1") == vicuna_v1_prompt("<image>\n" + q)
        assert chat_text(proc, q, with_image=False, prompt_format="llava-v1") == vicuna_v1_prompt(q)
    assert chat_text(proc, "Q ?") != chat_text(proc, "Q ?", prompt_format="llava-v1")  # hf: the checkpoint's template
    with pytest.raises(ValueError, match="places the image itself"):
        llava_v1_text("<image>\nWhat?")
    with pytest.raises(ValueError, match="unknown prompt format"):
        chat_text(proc, "Q", prompt_format="vicuna")


def test_llava_v1_ids_equal_tokenizer_image_token_token_by_token():
    proc = tiny_llama_processor([vicuna_v1_prompt(q) for q in QUESTIONS])
    tok = proc.tokenizer
    images = [Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (32, 32), (0, 90, 200))]
    batch = build_inputs(proc, images, QUESTIONS, prompt_format="llava-v1")
    n_img = (32 // 4) ** 2
    image_id = proc.image_token_id
    for b, q in enumerate(QUESTIONS):
        want = tokenizer_image_token_reference(vicuna_v1_prompt("<image>\n" + q), tok, [image_id] * n_img)
        keep = batch["attention_mask"][b].bool()
        got = batch["input_ids"][b][keep].tolist()
        assert not batch["attention_mask"][b][-len(want):].eq(0).any()  # left padding only
        for pos, (g, w) in enumerate(zip(got, want)):
            assert g == w, f"sample {b} position {pos}: {tok.convert_ids_to_tokens([g])} != {tok.convert_ids_to_tokens([w])}"
        assert len(got) == len(want)
        first = got.index(image_id)
        pieces = tok.convert_ids_to_tokens(got)
        # LLaVA-1.5's ids around the image: ... "USER", ":", "▁" <image> "▁", "<0x0A>" ...
        assert pieces[0] == "<s>" and pieces.count("<s>") == 1
        assert pieces[first - 1] == "\u2581" and pieces[first + n_img:first + n_img + 2] == ["\u2581", "<0x0A>"]
        assert got[first:first + n_img] == [image_id] * n_img
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    # text-only: one chunk, BOS once
    text_only = build_inputs(proc, None, QUESTIONS[1:], prompt_format="llava-v1")
    assert text_only["input_ids"][0].tolist() == tok(vicuna_v1_prompt(QUESTIONS[1])).input_ids


def test_llava_v1_with_a_tokenizer_that_adds_no_bos():
    """The built-in word-level tokenizer adds no BOS itself: the format still starts with BOS once."""
    from himap.builtin.offline_processor import build_processor

    proc = build_processor(image_size=32, patch_size=4)
    tok = proc.tokenizer
    x = build_inputs(proc, [Image.new("RGB", (32, 32))], ["What color is the circle ?"], prompt_format="llava-v1")
    ids = x["input_ids"][0].tolist()
    before, after = vicuna_v1_prompt("<image>\nWhat color is the circle ?").split("<image>")
    want = [tok.bos_token_id] + tok(before).input_ids + [IMAGE_TOKEN_ID] * 64 + tok(after).input_ids
    assert ids == want


@pytest.fixture(scope="module")
def eager_model():
    return tiny_llava(seed=4, attn_implementation="eager")


def brute_force_uncached(model, inputs, schedule, n):
    """The official generation written as a loop: every step a fresh forward of the whole
    sequence (prompt + generated) under the schedule, no cache, greedy, never the image token."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    kept = []
    with himap.pruned(model, schedule) as handle:
        for _ in range(n):
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                               use_cache=False).logits[:, -1]
            nxt = logits.index_fill(-1, torch.tensor([IMAGE_TOKEN_ID]), float("-inf")).argmax(-1, keepdim=True)
            kept.append(handle.stats.kept_image_indices)
            ids = torch.cat([ids, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids[:, inputs["input_ids"].shape[1]:], kept


@pytest.mark.parametrize("schedule", ["himap", "fastv"])
def test_recompute_generation_equals_brute_force_loop(eager_model, schedule):
    batch = tiny_inputs(eager_model.config, n_system=(5, 2), n_instruction=(6, 9), seed=7)
    want, kept_steps = brute_force_uncached(eager_model, batch, schedule, n=5)
    with himap.pruned(eager_model, schedule) as handle:
        got = generate_ids(eager_model, batch, max_new_tokens=5, recompute=True)
    assert torch.equal(got, want)
    assert handle.stats.kept_image_indices == kept_steps[-1]  # the last step ranked the longest sequence
    assert handle.stats.tokens_per_layer[0][0] == batch["input_ids"].shape[1] + 4
    assert handle.stats.kv_cache_lengths == []  # no cache


def test_recompute_ranks_with_generated_tokens_among_the_instruction_rows(eager_model):
    """phi_sh at step t reads rows I plus the t tokens generated so far (the official code's rows
    SYS+IMG: to the end of the sequence), from layer K-1's dense attention."""
    schedule = Schedule((Stage(2, 0.5, "phi_sh"),), name="sh")
    batch = tiny_inputs(eager_model.config, n_system=(4,), n_instruction=(5,), seed=8)
    new, kept_steps = brute_force_uncached(eager_model, batch, schedule, n=4)
    for t in range(4):
        ids = torch.cat([batch["input_ids"], new[:, :t]], dim=1)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            attn = eager_model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                               use_cache=False, output_attentions=True).attentions[1].mean(1)  # [1, T, T]
        first_image = int((ids[0] == IMAGE_TOKEN_ID).nonzero()[0])
        text_after = [i for i in range(first_image, ids.shape[1]) if ids[0, i] != IMAGE_TOKEN_ID]
        assert len(text_after) == 5 + t
        image_pos = [i for i in range(ids.shape[1]) if ids[0, i] == IMAGE_TOKEN_ID]
        scores = torch.full((1, ids.shape[1]), float("-inf"))
        for v in image_pos:
            scores[0, v] = sum(float(attn[0, i, v]) for i in text_after)
        sets = token_sets(ids, IMAGE_TOKEN_ID, mask)
        keep = criteria.select_kept(scores, sets, 0.5)
        expected = [j for j, v in enumerate(image_pos) if keep[0, v]]
        assert kept_steps[t][0][0] == expected, t


def test_generate_and_eval_cli_take_prompt_format_and_no_cache(tmp_path, image_files, capsys):
    model_dir = save_tiny_model_dir(tmp_path / "model", seed=3)
    image = image_files[1]
    assert main(["generate", "--model", model_dir, "--image", image, "--prompt", "What is it?", "--method", "himap",
                 "--max-new-tokens", "3", "--prompt-format", "llava-v1", "--no-cache", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    from transformers import AutoProcessor

    prompt_len = build_inputs(AutoProcessor.from_pretrained(model_dir), [image], ["What is it?"],
                              prompt_format="llava-v1")["input_ids"].shape[1]
    assert out["stats"]["tokens_per_layer"][0][0] == prompt_len + 2  # the last step re-ran prompt + 2 tokens
    assert out["stats"]["kv_cache_lengths"] == []  # no KV cache
    assert main(["eval", "--model", "builtin", "--task", "shapes", "--method", "himap", "--limit", "2",
                 "--prompt-format", "llava-v1", "--no-cache", "--out", str(tmp_path / "eval"), "--no-progress",
                 "--device", "cpu"]) == 0
    meta = json.loads((tmp_path / "eval" / "shapes" / "himap.meta.json").read_text())
    assert meta["prompt_format"] == "llava-v1" and meta["no_cache"] is True
    capsys.readouterr()
    # resuming under the default format refuses to mix predictions
    assert main(["eval", "--model", "builtin", "--task", "shapes", "--method", "himap", "--limit", "2",
                 "--out", str(tmp_path / "eval"), "--no-progress", "--device", "cpu"]) == 2
    assert "prompt_format" in capsys.readouterr().err
