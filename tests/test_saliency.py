"""Saliency (eq. 1) and its block metrics (eqs. 2-6) against independent references."""

import math

import pytest
import torch

from himap.analysis.probe import PROBE_ATTR, decoder_layers, probed
from himap.analysis.saliency import (
    METRICS,
    SaliencyConfig,
    block_metrics,
    mean_metrics,
    saliency,
)
from himap.models.testing import IMAGE_TOKEN_ID, tiny_inputs, tiny_llava
from himap.prune.tokens import token_sets


def _reference(model, inputs, targets):
    """|A * dL/dA| head-mean for every layer, with A the attentions an eager model returns and
    dL/dA from torch.autograd.grad (independent of the probe)."""
    out = model(**inputs, use_cache=False, output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    loss = torch.nn.functional.cross_entropy(out.logits[:, -1].float(), targets, reduction="sum")
    grads = torch.autograd.grad(loss, out.attentions)
    return [(a * g).abs().mean(1).detach() for a, g in zip(out.attentions, grads)]  # [B, T, T] per layer


def _metrics_by_loops(sal, input_ids, mask, b):
    """Eqs. 2-6 for sample b by explicit loops over positions."""
    ids, valid = input_ids[b].tolist(), mask[b].tolist()
    pos = [t for t in range(len(ids)) if valid[t]]
    first_img = min(t for t in pos if ids[t] == IMAGE_TOKEN_ID)
    S = [t for t in pos if ids[t] != IMAGE_TOKEN_ID and t < first_img]
    V = [t for t in pos if ids[t] == IMAGE_TOKEN_ID]
    I = [t for t in pos if ids[t] != IMAGE_TOKEN_ID and t > first_img]
    m = sal[b]

    def total(rows, cols):
        return sum(float(m[i, j]) for i in rows for j in cols)

    return {"S_sys": total(pos, S) / len(S), "S_img": total(pos, V) / len(V), "S_ins": total(pos, I) / len(I),
            "S_vv": total(V, V) / len(V), "S_vt": total(I, V) / len(V)}


@pytest.fixture(scope="module")
def eager_model():
    return tiny_llava(seed=0, attn_implementation="eager", num_layers=4)


@pytest.fixture(scope="module")
def batch(eager_model):
    # two samples of different lengths: the shorter one is left-padded
    return tiny_inputs(eager_model.config, n_system=(5, 3), n_instruction=(7, 10), seed=1)


def test_saliency_equals_autograd_reference(eager_model, batch):
    targets = torch.tensor([17, 42])
    ref = _reference(eager_model, batch, targets)
    got = saliency(eager_model, batch, targets, SaliencyConfig(matrix_layer=2))
    mask = batch["attention_mask"]
    for b in range(2):
        keep = mask[b].bool()
        torch.testing.assert_close(got[b].matrix, ref[2][b][keep][:, keep], rtol=1e-5, atol=1e-9)
        assert got[b].matrix.abs().max() > 0
        for layer in range(4):
            want = _metrics_by_loops(ref[layer], batch["input_ids"], mask, b)
            for k in METRICS:
                assert got[b].metrics[k][layer] == pytest.approx(want[k], rel=1e-4, abs=1e-10), (b, layer, k)
        assert got[b].target == int(targets[b])
        assert got[b].counts == {"system": (6, 4)[b], "image": 64, "instruction": (7, 10)[b]}


def test_sdpa_model_gives_the_same_saliency(eager_model, batch):
    sdpa = tiny_llava(seed=0, attn_implementation="sdpa", num_layers=4)
    targets = torch.tensor([5, 9])
    a = saliency(eager_model, batch, targets, SaliencyConfig(layers=(1, 3)))
    b = saliency(sdpa, batch, targets, SaliencyConfig(layers=(1, 3)))
    for x, y in zip(a, b):
        assert x.layers == y.layers == [1, 3]
        for k in METRICS:
            assert x.metrics[k] == pytest.approx(y.metrics[k], rel=1e-4, abs=1e-10)
        assert x.prediction == y.prediction


def test_probe_is_removed_and_parameters_restored(eager_model, batch):
    before = {n: p.requires_grad for n, p in eager_model.named_parameters()}
    saliency(eager_model, batch, torch.tensor([1, 2]), SaliencyConfig(layers=(0,)))
    assert eager_model.config.text_config._attn_implementation == "eager"
    assert not any(hasattr(l.self_attn, PROBE_ATTR) for l in decoder_layers(eager_model))
    assert {n: p.requires_grad for n, p in eager_model.named_parameters()} == before
    with pytest.raises(RuntimeError, match="boom"):
        with probed(eager_model, blocks={}):
            raise RuntimeError("boom")
    assert eager_model.config.text_config._attn_implementation == "eager"
    assert not any(hasattr(l.self_attn, PROBE_ATTR) for l in decoder_layers(eager_model))


def test_greedy_target_is_the_models_top_token(eager_model, batch):
    with torch.no_grad():
        top = eager_model(**batch, use_cache=False).logits[:, -1].argmax(-1).tolist()
    res = saliency(eager_model, batch, None, SaliencyConfig(layers=(0, 3)))
    assert [r.target for r in res] == [r.prediction for r in res] == top
    assert all(r.loss > 0 for r in res)


def test_padding_does_not_change_a_samples_saliency(eager_model, batch):
    targets = torch.tensor([17, 42])
    both = saliency(eager_model, batch, targets, SaliencyConfig(layers=(0, 2)))
    alone = tiny_inputs(eager_model.config, n_system=(5,), n_instruction=(7,), seed=1)
    alone["pixel_values"] = batch["pixel_values"][:1]
    single = saliency(eager_model, alone, targets[:1], SaliencyConfig(layers=(0, 2)))
    for k in METRICS:
        assert single[0].metrics[k] == pytest.approx(both[0].metrics[k], rel=1e-4)


def test_bad_layers_raise(eager_model, batch):
    with pytest.raises(ValueError, match="4 decoder layers"):
        saliency(eager_model, batch, None, SaliencyConfig(layers=(4,)))
    with pytest.raises(ValueError, match="matrix layer"):
        saliency(eager_model, batch, None, SaliencyConfig(layers=(0,), matrix_layer=1))


def test_block_metrics_hand_computed():
    pad, bos, img, w = 0, 1, IMAGE_TOKEN_ID, 9
    ids = torch.tensor([[bos, w, img, img, w, w],       # S={0,1} V={2,3} I={4,5}
                        [pad, bos, img, img, w, w],     # padded: S={1} V={2,3} I={4,5}
                        [bos, img, img, img, img, img]])  # no instruction tokens
    mask = torch.tensor([[1] * 6, [0] + [1] * 5, [1] * 6])
    m = (10 * torch.arange(6)[:, None] + torch.arange(6)[None, :]).float()  # I(i, j) = 10 i + j
    got = block_metrics(m.expand(3, 6, 6), token_sets(ids, img, mask))
    # sample 0: column sums over rows 0..5 are 150 + 6 j
    assert got["S_sys"][0] == (150 + 156) / 2 and got["S_img"][0] == (162 + 168) / 2
    assert got["S_ins"][0] == (174 + 180) / 2
    assert got["S_vv"][0] == (22 + 23 + 32 + 33) / 2 and got["S_vt"][0] == (42 + 43 + 52 + 53) / 2
    # sample 1: rows 1..5 only (padding belongs to no set): column sums 150 + 5 j
    assert got["S_sys"][1] == 155 and got["S_img"][1] == (160 + 165) / 2 and got["S_ins"][1] == (170 + 175) / 2
    assert got["S_vv"][1] == 55 and got["S_vt"][1] == 95
    # sample 2: I empty -> S_ins undefined, S_vt = 0
    assert got["S_sys"][2] == 150 and got["S_img"][2] == (750 + 6 * 15) / 5
    assert got["S_vv"][2] == (750 + 75) / 5 and got["S_vt"][2] == 0
    assert math.isnan(got["S_ins"][2])


def test_mean_metrics_skips_undefined_values():
    a = {"layers": [0, 1], "metrics": {k: [1.0, None] for k in METRICS}}
    b = {"layers": [0, 1], "metrics": {k: [3.0, 4.0] for k in METRICS}}
    out = mean_metrics([a, b])
    assert out["n"] == 2 and out["S_vv"] == [2.0, 4.0]
    with pytest.raises(ValueError, match="different layers"):
        mean_metrics([a, {**b, "layers": [0, 2]}])
