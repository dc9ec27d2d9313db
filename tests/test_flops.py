"""Analytic cost model (paper section 4.2, eq. 10) and measured FLOPs on a tiny random model."""

import json

import pytest

from himap.cost.flops import (
    ARCHS,
    Arch,
    PromptShape,
    VisionArch,
    flops_reduction,
    full_cost,
    get_arch,
    layer_tokens,
    omega,
    paper_flops,
    truncate,
)
from himap.prune.schedule import Schedule, Stage, image_tokens_per_layer


def test_omega_by_hand():
    # 4*576*4096^2 + 2*576^2*4096 + 2*576*4096*11008
    assert omega(576, 4096, 11008) == 38_654_705_664 + 2_717_908_992 + 51_942_260_736


@pytest.mark.parametrize("arch, method, table", [
    ("llava-1.5-7b", "vanilla", 2.98), ("llava-1.5-7b", "fastv", 1.56), ("llava-1.5-7b", "himap", 0.73),
    ("llava-1.5-13b", "vanilla", 5.81), ("llava-1.5-13b", "himap-13b", 1.36),
])
def test_paper_table1_tflops(arch, method, table):
    """Table 1's TFLOPs are eq. (10)'s sums truncated to two decimals."""
    assert truncate(paper_flops(get_arch(arch), method) / 1e12) == table


def test_truncation_not_rounding():
    v = paper_flops(get_arch("llava-1.5-7b"), "vanilla") / 1e12
    assert abs(v - 2.986) < 1e-3 and round(v, 2) == 2.99 and truncate(v) == 2.98
    f = paper_flops(get_arch("llava-1.5-7b"), "fastv") / 1e12
    assert round(f, 2) == 1.57 and truncate(f) == 1.56


def test_eq10_reduction_rate():
    """eta from eq. (10) written out with n1 = n/2, n2 = n1/4."""
    a = get_arch("llava-1.5-7b")
    w = lambda n: omega(n, a.hidden, a.intermediate)  # noqa: E731
    eta = 1 - (2 * w(576) + 6 * w(288) + 24 * w(72)) / (32 * w(576))
    assert flops_reduction(a, "himap") == pytest.approx(eta, rel=1e-12)
    assert 0.75 < eta < 0.76  # "reduces FLOPs by 75%" (section 5.2)


def test_paper_inconsistencies_stay_documented():
    """Numbers the docs quote where Tables 1-2 disagree with eq. (10)."""
    a7, a13 = get_arch("llava-1.5-7b"), get_arch("llava-1.5-13b")
    assert truncate(paper_flops(a7, "himap-caption") / 1e12) == 0.97  # Table 2 prints 1.01
    assert truncate(paper_flops(a13, "fastv") / 1e12) == 3.01  # Table 1: 3.09, Table 2: 3.06
    fastv_k3 = Schedule((Stage(3, 0.5, "phi_last"),))
    assert truncate(paper_flops(a13, fastv_k3) / 1e12) == 3.09  # Table 1's value is FastV at K=3
    assert truncate(paper_flops(a13, "himap-13b-caption") / 1e12) == 1.74  # Table 2 prints 1.93


TOY = Arch("toy", hidden=4, intermediate=6, num_layers=3, num_heads=2, num_kv_heads=1, vocab=10, image_tokens=4)


def test_full_cost_by_hand():
    """Toy sizes worked out on paper: d=4, m=6, 2 heads of 2, 1 KV head, vocab 10; 1 system,
    4 image, 2 instruction tokens; FastV-like stage K=1 dropping 2 of 4; 3 new tokens."""
    sched = Schedule((Stage(1, 0.5, "phi_last"),))
    c = full_cost(TOY, sched, PromptShape(n_system=1, n_instruction=2, new_tokens=3), dtype="fp16")
    assert c.tokens_per_layer == [7, 5, 5] and c.image_tokens_per_layer == [4, 2, 2]
    # per token: 2 * (q,o: 2*4*4 + k,v: 2*4*2 + mlp: 3*4*6) = 2 * 120
    assert c.prefill_linear == 240 * 17
    assert c.prefill_attention == 4 * (49 + 25 + 25) * 2 * 2  # dense QK^T + AV
    # one query row (the last token) against layer 0's 7 keys: QK^T over 2 heads of 2, then the
    # head-mean column sum as a matrix-vector product over the 2 heads' row
    assert c.ranking == 2 * 1 * 7 * 2 * 2 + 2 * 1 * 7 * 2
    assert c.lm_head_prefill == 2 * 4 * 10 and c.lm_head_decode == 2 * 2 * 4 * 10
    assert c.decode_linear == 2 * 3 * 240
    assert c.decode_attention == 16 * ((8 + 9) + 2 * (6 + 7))  # steps see cache + 1, cache + 2 keys
    assert c.kv_cache_bytes == 17 * 2 * 1 * 2 * 2 and c.kv_cache_bytes_final == (17 + 6) * 8
    assert c.decoder == 4080 + 1584 + 84 + 80 + 1440 + 688 + 160
    causal = full_cost(TOY, sched, PromptShape(n_system=1, n_instruction=2, new_tokens=3), attention="causal")
    assert causal.prefill_attention == 16 * (28 + 15 + 15)  # T(T+1)/2 pairs


def test_ranking_rows_per_criterion():
    shape = PromptShape(n_system=3, n_instruction=5, new_tokens=1)
    hd = TOY.num_heads * TOY.d_head
    sh = full_cost(TOY, Schedule((Stage(1, 0.5, "phi_sh"), Stage(2, 0.5, "phi_dp"))), shape)
    # phi_sh: 5 instruction rows (positions 7-11) x 12 keys at layer 0; phi_dp: the 2 image rows
    # (positions 3-4) at layer 1 see only keys 0-4 (causal: the chunk's keys stop at its last row);
    # each QK^T row costs 2 x heads x d_head per key and the reduction 2 x heads per key
    assert sh.ranking == 2 * (hd + TOY.num_heads) * (5 * 12 + 2 * 5)
    assert full_cost(TOY, Schedule((Stage(1, 0.5, "random"),)), shape).ranking == 0


def test_layer_tokens_single_source():
    a = get_arch("llava-1.5-7b")
    tokens, images = layer_tokens(Schedule((Stage(2, 0.5), Stage(8, 0.75))), PromptShape(35, 40), a)
    assert images == image_tokens_per_layer(Schedule((Stage(2, 0.5), Stage(8, 0.75))), 576, 32)
    assert tokens[:2] == [651, 651] and tokens[2] == 75 + 288 and tokens[-1] == 75 + 72


def test_vision_flops_by_hand():
    v = VisionArch(image_size=8, patch_size=4, hidden=2, intermediate=3, num_layers=1, num_heads=1)
    a = Arch("v", hidden=5, intermediate=7, num_layers=2, num_heads=1, num_kv_heads=1, vocab=3,
             image_tokens=4, vision=v)
    c = full_cost(a, "vanilla", PromptShape(0, 0, 1))
    patch = 2 * 4 * 2 * 3 * 16
    layer = 2 * 5 * (4 * 4 + 2 * 2 * 3) + 4 * 25 * 2  # 4 patches + CLS
    proj = 2 * 4 * (2 * 5 + 5 * 5)
    assert c.vision == patch + layer + proj


def test_arch_presets_build_configs_of_the_right_size():
    """The presets instantiate (on the meta device) to the published parameter counts."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        m = LlavaForConditionalGeneration(ARCHS["llava-1.5-7b"].to_llava_config())
    assert sum(p.numel() for p in m.parameters()) == 7_063_427_072  # llava-hf/llava-1.5-7b-hf
    cfg = ARCHS["llava-tiny-cpu"].to_llava_config()
    back = Arch.from_config(cfg, name="llava-tiny-cpu")
    assert back == ARCHS["llava-tiny-cpu"]


def test_arch_from_tiny_config():
    from himap.models.testing import IMAGE_TOKEN_ID, tiny_llava_config

    a = Arch.from_config(tiny_llava_config())
    assert (a.hidden, a.intermediate, a.num_layers, a.num_heads, a.num_kv_heads, a.d_head) == (64, 128, 10, 4, 2, 16)
    assert a.image_tokens == 64 and a.image_token_id == IMAGE_TOKEN_ID and a.vision.num_layers == 2


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown architecture"):
        get_arch("llava-99b")
    with pytest.raises(ValueError, match="smaller than the number of decoder layers"):
        paper_flops(TOY, Schedule((Stage(3, 0.5),)))
    with pytest.raises(ValueError, match="attention mode"):
        full_cost(TOY, "vanilla", attention="sparse")
    with pytest.raises(ValueError, match="n_instruction"):
        PromptShape(n_instruction=-1)


def test_cli_json_and_table(capsys):
    from himap.cli import main

    assert main(["flops", "--arch", "llava-1.5-7b", "--method", "fastv,himap", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [r["method"] for r in out["methods"]]
    assert names == ["vanilla", "fastv", "himap"]
    assert [truncate(r["paper_tflops"]) for r in out["methods"]] == [2.98, 1.56, 0.73]
    assert out["methods"][2]["image_tokens_after_stages"] == [576, 288, 72]
    assert main(["flops", "--arch", "llava-1.5-7b", "--method", "himap", "--k", "3", "-"]) == 0
    table = capsys.readouterr().out
    assert "2.986" in table and "himap+k=3,-" in table
    assert main(["flops", "--arch", "llava-1.5-7b", "--method", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err


# ---------------------------------------------------------------- measured FLOPs (torch.utils.flop_counter)

@pytest.fixture(scope="module")
def tiny():
    from himap.models.testing import tiny_inputs, tiny_llava

    model = tiny_llava(seed=0)
    return model, tiny_inputs(model.config, n_system=(5,), n_instruction=(7,))


@pytest.mark.parametrize("method", ["vanilla", "fastv", "himap"])
@pytest.mark.parametrize("new_tokens", [0, 3])
def test_measured_flops_match_analytic(tiny, method, new_tokens):
    """The full analytic count equals what flop_counter measures, part by part: vision tower +
    projector, decoder (ranking rows included) and LM head; prefill alone and with decode steps."""
    from himap.cost.measure import compare

    model, inputs = tiny
    r = compare(model, inputs, method, new_tokens)
    for part in ("vision", "decoder", "lm_head", "total"):
        assert abs(r["rel_error"][part]) < 0.05, (part, r)  # the tolerance
        assert r["measured"][part] == r["analytic"][part], (part, r)  # in fact exact
    if method != "vanilla":  # the ranking is measurable: leaving it out would break equality
        assert r["analytic"]["ranking"] > 0
    assert r["tokens_per_layer"][-1] == 6 + 7 + {"vanilla": 64, "fastv": 32, "himap": 8}[method]


def test_measured_flops_eager_attention():
    """Eager attention (matmuls over repeated KV heads) counts the same as SDPA."""
    from himap.cost.measure import compare
    from himap.models.testing import tiny_inputs, tiny_llava

    model = tiny_llava(seed=1, attn_implementation="eager", num_layers=4)
    inputs = tiny_inputs(model.config, n_system=(3,), n_instruction=(4,))
    from himap.prune.schedule import Schedule, Stage

    r = compare(model, inputs, Schedule((Stage(1, 0.5, "phi_sh"), Stage(2, 0.75, "phi_dp"))), 2)
    assert r["measured"]["total"] == r["analytic"]["total"]


def test_measured_flops_needs_one_unpadded_example(tiny):
    from himap.cost.measure import compare
    from himap.models.testing import tiny_inputs

    model, _ = tiny
    batch = tiny_inputs(model.config, n_system=(5, 3), n_instruction=(7, 7))
    with pytest.raises(ValueError, match="batch 1"):
        compare(model, batch, "himap")


def test_cli_measure(tmp_path, capsys):
    """`himap flops --measure` runs a random model of a config and reports zero error."""
    from himap.cli import main
    from himap.models.testing import tiny_llava_config

    tiny_llava_config(num_layers=4).save_pretrained(tmp_path)
    assert main(["flops", "--model", str(tmp_path), "--random-weights", "--measure", "--method", "himap",
                 "--k", "1", "2", "--system-tokens", "3", "--instruction-tokens", "4", "--new-tokens", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [m["method"] for m in out["measured"]] == ["vanilla", "himap+k=1,2"]
    for m in out["measured"]:
        assert m["measured"]["total"] == m["analytic"]["total"] > 0
    assert out["measured"][1]["tokens_per_layer"] == [71, 39, 15, 15]
