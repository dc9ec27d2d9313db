"""Attention disruption (sections 3.2-3.3, appendix D): exactness, blocked entries, seeds,
windows, consistency, E and D."""

import math

import pytest
import torch

from himap.analysis.disrupt import (
    DisruptConfig,
    disrupt_batch,
    disrupted_logits,
    flow_block,
    jaccard,
    log_ratio,
    parse_windows,
    summarize,
)
from himap.analysis.probe import probed
from himap.models.testing import BOS_TOKEN_ID, IMAGE_TOKEN_ID, tiny_inputs, tiny_llava
from himap.prune.tokens import token_sets

LAYERS = 5


@pytest.fixture(scope="module")
def eager_model():
    return tiny_llava(seed=3, attn_implementation="eager", num_layers=LAYERS)


@pytest.fixture(scope="module")
def batch(eager_model):
    return tiny_inputs(eager_model.config, n_system=(4, 2), n_instruction=(6, 9), seed=2)


def _sets(inputs):
    return token_sets(inputs["input_ids"], IMAGE_TOKEN_ID, inputs["attention_mask"])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_empty_disruption_equals_the_undisturbed_model(impl, batch):
    model = tiny_llava(seed=3, attn_implementation=impl, num_layers=LAYERS)
    with torch.no_grad():
        ref_full = model(**batch, use_cache=False).logits
        ref_last = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]
        with probed(model, blocks={}):
            full = model(**batch, use_cache=False).logits
    assert torch.equal(full, ref_full)
    assert torch.equal(disrupted_logits(model, batch, {}), ref_last)
    unpadded = tiny_inputs(model.config, seed=5)  # no padding: SDPA runs with mask=None
    with torch.no_grad():
        ref = model(**unpadded, use_cache=False, logits_to_keep=1).logits[:, -1]
    assert torch.equal(disrupted_logits(model, unpadded, {}), ref)


def _attentions(model, inputs, blocks):
    with torch.no_grad(), probed(model, blocks=blocks):
        return model(**inputs, use_cache=False, output_attentions=True).attentions


@pytest.mark.parametrize("flow", ["img2ins", "img2img", "img2rnd"])
def test_blocked_entries_get_zero_probability_only_in_blocked_layers(eager_model, batch, flow):
    block = flow_block(_sets(batch), flow, seeds=7)  # [B, T, T]
    assert block.any()
    ref = _attentions(eager_model, batch, {})
    got = _attentions(eager_model, batch, {2: block})
    sel = block[:, None].expand_as(got[2])  # [B, H, T, T]
    t = block.shape[-1]
    causal = sel & torch.ones(t, t, dtype=torch.bool).tril()  # blocked entries causal attention can reach
    for layer in (0, 1):  # before the blocked layer: identical
        assert torch.equal(got[layer], ref[layer])
    assert torch.all(got[2][sel] == 0) and ref[2][causal].min() > 0
    rows = batch["attention_mask"].bool()[:, None, :].expand(-1, got[2].shape[1], -1)  # [B, H, T]
    torch.testing.assert_close(got[2].sum(-1)[rows], torch.ones(int(rows.sum())))  # rows still sum to 1
    for layer in (3, 4):  # after it: the block does not persist
        assert got[layer][causal].min() > 0
    # "from layer l on" is explicit: every later layer blocked
    onward = _attentions(eager_model, batch, {l: block for l in range(2, LAYERS)})
    for layer in range(2, LAYERS):
        assert torch.all(onward[layer][sel] == 0)


def test_sdpa_disruption_equals_eager_disruption(eager_model, batch):
    sdpa = tiny_llava(seed=3, attn_implementation="sdpa", num_layers=LAYERS)
    block = flow_block(_sets(batch), "img2ins")
    blocks = {0: block, 1: block}
    a = disrupted_logits(eager_model, batch, blocks)
    b = disrupted_logits(sdpa, batch, blocks)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, disrupted_logits(eager_model, batch, {}), atol=1e-6)


def test_flow_blocks_cover_the_right_entries(batch):
    sets = _sets(batch)
    ins = flow_block(sets, "img2ins")
    img = flow_block(sets, "img2img")
    for b in range(2):
        v, i = sets.image[b], sets.instruction[b]
        assert torch.equal(ins[b], i[:, None] & v[None, :])
        assert torch.equal(img[b], v[:, None] & v[None, :])
    rnd = flow_block(sets, "img2rnd", seeds=[11, 12])
    for b in range(2):
        rows = rnd[b].any(1)
        assert int(rows.sum()) == int(sets.instruction[b].sum())  # |I| random rows
        assert not (rows & (sets.system[b] | ~sets.valid[b])).any()  # never system tokens or padding
        assert torch.equal(rnd[b][rows], sets.image[b].expand(int(rows.sum()), -1))  # columns V
    with pytest.raises(ValueError, match="unknown flow"):
        flow_block(sets, "img2sys")


def test_img2rnd_is_reproducible_by_seed(batch):
    sets = _sets(batch)
    a = flow_block(sets, "img2rnd", seeds=[1, 2])
    assert torch.equal(a, flow_block(sets, "img2rnd", seeds=[1, 2]))
    assert torch.equal(a, flow_block(sets, "img2rnd", seeds=1))  # int seed: sample b gets seed + b
    assert not torch.equal(a, flow_block(sets, "img2rnd", seeds=[3, 4]))


def test_a_row_left_without_keys_raises(eager_model):
    # no system tokens at all: blocking img2img leaves the first image token with nothing to attend to
    inputs = tiny_inputs(eager_model.config, n_system=(0,), n_instruction=(3,))
    inputs["input_ids"] = inputs["input_ids"][:, 1:]
    inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    assert inputs["input_ids"][0, 0] == IMAGE_TOKEN_ID and BOS_TOKEN_ID not in inputs["input_ids"]
    block = flow_block(_sets(inputs), "img2img")
    with pytest.raises(ValueError, match="no key to attend to"):
        disrupted_logits(eager_model, inputs, {1: block})


def test_parse_windows():
    names = lambda ws: [(w.name, w.layers) for w in ws]  # noqa: E731
    assert names(parse_windows("first:5,last:5", 12)) == [("first5", (0, 1, 2, 3, 4)), ("last5", (7, 8, 9, 10, 11))]
    assert names(parse_windows("every:2", 5)) == [("0-1", (0, 1)), ("2-3", (2, 3)), ("4", (4,))]
    assert names(parse_windows("each", 3)) == [("0", (0,)), ("1", (1,)), ("2", (2,))]
    assert names(parse_windows("3, 1-2, 3", 4)) == [("3", (3,)), ("1-2", (1, 2))]
    assert names(parse_windows("first:2,every:2", 6, from_layer_on=True)) == [
        ("from0", (0, 1, 2, 3, 4, 5)), ("from2", (2, 3, 4, 5)), ("from4", (4, 5))]
    for bad in ("first:0", "7", "3-1", "middle", ""):
        with pytest.raises(ValueError):
            parse_windows(bad, 6)


def test_disrupt_batch_scores_against_the_undisturbed_run(eager_model, batch):
    with torch.no_grad():
        top = eager_model(**batch, use_cache=False).logits[:, -1].topk(5, dim=-1).indices.tolist()
    targets = [top[0][0], top[1][1]]  # sample 0 correct before disruption, sample 1 wrong
    cfg = DisruptConfig(flows=("img2ins", "img2rnd"), windows="first:2,4")
    recs = disrupt_batch(eager_model, batch, targets, config=cfg, seeds=[5, 6])
    assert [r["base"]["top"] for r in recs] == top
    assert [r["base"]["correct"] for r in recs] == [True, False]
    assert set(recs[0]["runs"]) == {"img2ins@first2", "img2ins@4", "img2rnd@first2", "img2rnd@4"}
    for r in recs:
        for run in r["runs"].values():
            assert run["label_consistent"] == (run["pred"] == r["base"]["pred"])
            assert run["score_consistency"] == jaccard(run["top"], r["base"]["top"])
    again = disrupt_batch(eager_model, batch, targets, config=cfg, seeds=[5, 6])
    assert again == recs


def _rec(base_correct, runs):
    return {"base": {"correct": base_correct, "pred": 1, "top": [1]},
            "runs": {k: {"layers": [0], "pred": p, "top": [p], "correct": c,
                         "label_consistent": p == 1, "score_consistency": float(p == 1)}
                     for k, (p, c) in runs.items()}}


def test_summary_e_and_d_hand_computed():
    # 4 samples, all correct before; img2img breaks 3 in window "a", img2ins breaks 1 -> D = log 3
    a_b = [  # (img2img@a, img2ins@a, img2img@b, img2ins@b) per sample: (prediction, correct)
        ((2, False), (2, False), (1, True), (2, False)),
        ((2, False), (1, True), (1, True), (1, True)),
        ((2, False), (1, True), (1, True), (1, True)),
        ((1, True), (1, True), (1, True), (1, True)),
    ]
    keys = ("img2img@a", "img2ins@a", "img2img@b", "img2ins@b")
    recs = [_rec(True, dict(zip(keys, runs))) for runs in a_b]
    s = summarize(recs)
    assert s["correct_before"] == 4
    assert s["conditions"]["img2img@a"]["E"] == 3 and s["conditions"]["img2ins@a"]["E"] == 1
    assert s["conditions"]["img2img@a"]["label_consistency"] == 0.25
    assert s["conditions"]["img2ins@b"]["accuracy_after"] == 0.75
    assert s["D"]["a"]["D"] == pytest.approx(math.log(3))
    assert s["D"]["b"] == {"layers": [0], "E_vv": 0, "E_vt": 1, "D": None}  # E_vv = 0: undefined, not -inf


def test_log_ratio_and_jaccard():
    assert log_ratio(2, 2) == 0.0 and log_ratio(0, 3) is None and log_ratio(3, 0) is None
    assert log_ratio(-1, 2) is None
    assert jaccard([1, 2, 3, 4, 5], [1, 2, 3, 4, 6]) == 4 / 6
