"""What the official HiMAP code computes, offered next to the paper's equations (issue 14):
saliency value, set direction, S_vv/S_vt normalisation and target; disruption's label
consistency over generated tokens; generation without KV cache in the benchmark; the official
13B preset. Each against a reference written here from the official code's definition."""

import json

import pytest
import torch

from himap.analysis.data import answer_piece_id
from himap.analysis.disrupt import (
    DisruptConfig,
    blocked_greedy,
    disrupt_batch,
    disrupted_logits,
    label_in_output,
    summarize,
)
from himap.analysis.saliency import METRICS, REFERENCES, config_for, saliency
from himap.cli import main
from himap.models.testing import IMAGE_TOKEN_ID, tiny_inputs, tiny_llava
from test_saliency import batch, eager_model  # noqa: F401  (shared fixtures: 4-layer eager model, padded batch)

# ------------------------------------------------------------------------------ saliency


def official_reference(model, inputs, targets):
    """Per layer, the official code's saliency written out: A times a ones tensor m; the
    gradient of L with respect to m at m = 1 is A * dL/dA; saliency = |grad * A| per head, then
    the head mean. dL/dA from torch.autograd on the eager model's returned attentions."""
    out = model(**inputs, use_cache=False, output_attentions=True)
    loss = torch.nn.functional.cross_entropy(out.logits[:, -1].float(), targets, reduction="sum")
    grads = torch.autograd.grad(loss, out.attentions)
    per_layer = {}
    for layer, (a, g) in enumerate(zip(out.attentions, grads)):
        grad_of_ones = a * g  # d L(A * m) / dm at m = 1
        per_layer[layer] = {"official": (grad_of_ones * a).abs().mean(1).detach(),  # [B, T, T]
                            "eq1": (a * g).abs().mean(1).detach()}
    return per_layer


def metrics_by_loops(sal, ids, mask, b, direction, divide_visual):
    """S_sys, S_img, S_ins over the set's columns (eqs. 2-4) or rows (official get_props), and
    S_vv, S_vt with or without the 1/|V| of eqs. 5-6, by explicit loops."""
    ids, valid = ids[b].tolist(), mask[b].tolist()
    pos = [t for t in range(len(ids)) if valid[t]]
    first = min(t for t in pos if ids[t] == IMAGE_TOKEN_ID)
    S = [t for t in pos if t < first]
    V = [t for t in pos if ids[t] == IMAGE_TOKEN_ID]
    I = [t for t in pos if t > first and ids[t] != IMAGE_TOKEN_ID]
    m = sal[b]

    def total(rows, cols):
        return sum(float(m[i, j]) for i in rows for j in cols)

    def modality(tokens):
        return (total(pos, tokens) if direction == "columns" else total(tokens, pos)) / len(tokens)

    nv = len(V) if divide_visual else 1
    return {"S_sys": modality(S), "S_img": modality(V), "S_ins": modality(I),
            "S_vv": total(V, V) / nv, "S_vt": total(I, V) / nv}


@pytest.fixture(scope="module")
def reference(eager_model, batch):
    return official_reference(eager_model, batch, torch.tensor([17, 42]))


@pytest.mark.parametrize("value,direction,divide", [
    ("official", "rows", False),  # --reference official
    ("eq1", "columns", True),  # --reference paper
    ("official", "columns", True), ("eq1", "rows", False), ("eq1", "columns", False)])
def test_saliency_variants_equal_autograd_reference(eager_model, batch, reference, value, direction, divide):
    cfg = config_for("paper", value=value, set_direction=direction, divide_visual=divide, matrix_layer=1)
    got = saliency(eager_model, batch, torch.tensor([17, 42]), cfg)
    mask = batch["attention_mask"]
    for b in range(2):
        keep = mask[b].bool()
        torch.testing.assert_close(got[b].matrix, reference[1][value][b][keep][:, keep], rtol=1e-5, atol=1e-10)
        for layer in range(4):
            want = metrics_by_loops(reference[layer][value], batch["input_ids"], mask, b, direction, divide)
            for k in METRICS:
                assert got[b].metrics[k][layer] == pytest.approx(want[k], rel=1e-4, abs=1e-12), (b, layer, k)


def test_reference_presets():
    off = config_for("official")
    assert (off.value, off.set_direction, off.divide_visual, off.abs_per_head) == ("official", "rows", False, True)
    paper = config_for("paper")
    assert (paper.value, paper.set_direction, paper.divide_visual) == ("eq1", "columns", True)
    assert REFERENCES["official"]["target"] == "answer-piece" and REFERENCES["official"]["prompt_format"] == "llava-v1"
    assert config_for("official", divide_visual=True).divide_visual is True  # a single flag overrides
    with pytest.raises(ValueError, match="unknown reference"):
        config_for("code")


def test_answer_piece_is_the_bare_vocabulary_piece():
    from himap.models.testing import tiny_llama_processor

    tok = tiny_llama_processor(["A B yes"]).tokenizer
    first = tok("A", add_special_tokens=False).input_ids[0]
    assert tok.convert_ids_to_tokens([first]) == ["\u2581A"]  # what tokenizing the answer gives
    assert answer_piece_id(tok, "A") == tok.convert_tokens_to_ids("A") != first
    with pytest.raises(ValueError, match="not a single piece"):
        answer_piece_id(tok, "Apple")


# ------------------------------------------------------------------------------ disruption

def test_label_in_output_is_the_official_substring_test():
    decode = {5: "The", 6: " answer", 7: " is", 8: " B", 9: " A", 2: "</s>"}
    text = lambda ids: "".join(decode[i] for i in ids)  # noqa: E731
    assert label_in_output("B", [5, 6, 7, 8], text, eos_ids=[2]) == ("The answer is B", True)
    assert label_in_output("A", [8, 2, 9], text, eos_ids=[2]) == ("B", False)  # generation stops at eos
    assert label_in_output("b", [8], text) == ("B", False)  # case-sensitive, as `label in outputs`


def test_blocked_greedy_equals_a_hand_written_uncached_loop(eager_model):
    """Official img2txt generation: every step re-runs the whole sequence with rows 'after the
    image' (generated tokens included) blocked from the image columns in the blocked layers."""
    from himap.analysis.probe import probed

    x = tiny_inputs(eager_model.config, n_system=(4, 2), n_instruction=(5, 8), seed=3)
    layers = (1, 2, 3)
    ids, mask = x["input_ids"], x["attention_mask"]
    want = []
    for _ in range(4):
        t = ids.shape[1]
        block = torch.zeros((2, t, t), dtype=torch.bool)
        for b in range(2):
            pos = [i for i in range(t) if mask[b, i]]
            first = min(i for i in pos if ids[b, i] == IMAGE_TOKEN_ID)
            for i in pos:
                if i > first and ids[b, i] != IMAGE_TOKEN_ID:
                    for j in pos:
                        block[b, i, j] = bool(ids[b, j] == IMAGE_TOKEN_ID)
        with torch.no_grad(), probed(eager_model, blocks={l: block for l in layers}):
            logits = eager_model(input_ids=ids, attention_mask=mask, pixel_values=x["pixel_values"],
                                 use_cache=False).logits[:, -1]
        nxt = logits.index_fill(-1, torch.tensor([IMAGE_TOKEN_ID]), float("-inf")).argmax(-1, keepdim=True)
        want.append(nxt)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    from himap.analysis.disrupt import flow_block
    from himap.prune.tokens import token_sets

    def blocks_for(sets):
        return {l: flow_block(sets, "img2ins") for l in layers}

    first_logits = disrupted_logits(eager_model, x, blocks_for(token_sets(x["input_ids"], IMAGE_TOKEN_ID,
                                                                            x["attention_mask"])))
    got = blocked_greedy(eager_model, x, first_logits, blocks_for, 4)
    assert got == torch.cat(want, 1).tolist()


def test_disrupt_batch_reports_the_official_consistency_next_to_ours(eager_model):
    x = tiny_inputs(eager_model.config, n_system=(4, 2), n_instruction=(5, 8), seed=3)
    cfg = dict(flows=("img2ins", "img2img"), windows="1,3", seed=0)
    ours = disrupt_batch(eager_model, x, [10, 11], config=DisruptConfig(**cfg))
    names = {i: f"w{i}" for i in range(128)}
    decode = lambda ids: "".join(names[i] for i in ids)  # noqa: E731
    with_official = disrupt_batch(eager_model, x, [10, 11], config=DisruptConfig(**cfg, official_tokens=3),
                                  labels=["w10", "w11"], decode=decode)
    for a, b in zip(ours, with_official):  # the first-token measures are untouched
        for key, run in a["runs"].items():
            assert {k: run[k] for k in run} == {k: b["runs"][key][k] for k in run}
        assert all(r["output"].count("w") == 3 for r in [b["base"], *b["runs"].values()])  # 3 tokens each
    s = summarize(with_official)
    for key, c in s["conditions"].items():
        assert c["label_consistency_official"] == sum(r["runs"][key]["label_in_output"] for r in with_official) / 2
        assert c["label_consistency"] == summarize(ours)["conditions"][key]["label_consistency"]
    assert "label_consistency_official" not in summarize(ours)["conditions"]["img2ins@1"]
    with pytest.raises(ValueError, match="label text"):
        disrupt_batch(eager_model, x, [10, 11], config=DisruptConfig(**cfg, official_tokens=3))


# ------------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from PIL import Image

    from himap.models.testing import save_tiny_model_dir

    root = tmp_path_factory.mktemp("official")
    model_dir = save_tiny_model_dir(root / "model", seed=0, num_layers=4)
    rows = []
    for i, answer in enumerate(["red", "A", "yes"]):
        Image.new("RGB", (40, 30), (70 * i, 180 - 40 * i, 90)).save(root / f"im{i}.png")
        rows.append({"id": f"q{i}", "image": f"im{i}.png", "question": "What color is the circle ?", "answer": answer})
    (root / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model_dir


def test_analyze_saliency_reference_official(workspace, capsys):
    from himap.analysis.data import build_batch, read_jsonl_items
    from himap.models.loading import load_model

    root, model_dir = workspace
    out = root / "sal"
    assert main(["analyze", "saliency", "--model", model_dir, "--jsonl", str(root / "s.jsonl"), "--out", str(out),
                 "--reference", "official", "--no-plots", "--batch-size", "2"]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    s = summary["settings"]
    assert (s["reference"], s["value"], s["set_direction"], s["divide_visual"], s["target"], s["prompt_format"]) == \
        ("official", "official", "rows", False, "answer-piece", "llava-v1")
    assert set(METRICS) <= set(summary["means"]) and summary["means"]["layers"] == [0, 1, 2, 3]
    # the same numbers from the library, built by hand
    model, processor = load_model(model_dir)
    items = read_jsonl_items(str(root / "s.jsonl"))
    inputs = build_batch(processor, items, prompt_format="llava-v1")
    targets = [processor.tokenizer.convert_tokens_to_ids(it.answer) for it in items]
    want = saliency(model, inputs, torch.tensor(targets), config_for("official"))
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for rec, w in zip(records, want):
        assert rec["target"] == w.target
        for k in METRICS:
            assert rec["metrics"][k] == pytest.approx(w.metrics[k], rel=1e-4)
    # a single flag overrides the reference; a changed setting refuses to resume
    assert main(["analyze", "saliency", "--model", model_dir, "--jsonl", str(root / "s.jsonl"), "--out", str(out),
                 "--reference", "official", "--divide-visual", "--no-plots"]) == 2
    assert "divide_visual" in capsys.readouterr().err


def test_analyze_disrupt_reference_official(workspace, capsys):
    root, model_dir = workspace
    out = root / "dis"
    assert main(["analyze", "disrupt", "--model", model_dir, "--jsonl", str(root / "s.jsonl"), "--out", str(out),
                 "--reference", "official", "--flows", "img2ins", "--windows", "2", "--no-plots",
                 "--batch-size", "3"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    s = summary["settings"]
    assert (s["official_tokens"], s["from_layer_on"], s["prompt_format"]) == (8, True, "llava-v1")
    cond = summary["conditions"]["img2ins@from2"]
    assert cond["layers"] == [2, 3] and 0 <= cond["label_consistency_official"] <= 1
    assert line["label_consistency_official"] == {"img2ins@from2": cond["label_consistency_official"]}
    records = [json.loads(r) for r in (out / "samples.jsonl").read_text().splitlines()]
    for r in records:
        run = r["runs"]["img2ins@from2"]
        answer = {"q0": "red", "q1": "A", "q2": "yes"}[r["id"]]
        assert run["label_in_output"] == (answer in run["output"])


# ------------------------------------------------------------------------------ cost

def test_bench_runs_methods_without_kv_cache():
    from himap.cost.bench import BenchConfig, run_benchmark
    from himap.cost.flops import Arch, PromptShape, full_cost, get_arch, uncached_cost

    model = tiny_llava(seed=0)
    cfg = BenchConfig(methods=("vanilla", "himap"), reps=1, warmup=0, n_system=4, n_instruction=5, new_tokens=3,
                      uncached=True)
    summary = run_benchmark(model, cfg, progress=False)
    assert list(summary["methods"]) == ["vanilla", "himap", "vanilla/nocache", "himap/nocache"]
    m = summary["methods"]["himap/nocache"]
    assert m["kv_cache_bytes"] == 0 and m["kv_cache_lengths"] == []
    arch = Arch.from_config(model.config)
    shape = PromptShape(4, 5, 3)
    # the official generation recomputes everything: step t runs vision + decoder on prompt + t tokens
    steps = [full_cost(arch, "himap", PromptShape(4, 5 + t, 1), dtype="fp32") for t in range(3)]
    assert uncached_cost(arch, "himap", shape, dtype="fp32").total == sum(c.total for c in steps)
    llava = get_arch("llava-1.5-7b")  # VisionZip selects on the vision side again at every step
    zipped = [full_cost(llava, "visionzip", PromptShape(4, 5 + t, 1)) for t in range(3)]
    assert zipped[1].vision_ranking > 0
    assert uncached_cost(llava, "visionzip", shape).total == sum(c.total for c in zipped)
    assert m["analytic"]["total_tflops"] * 1e12 == pytest.approx(sum(c.total for c in steps))
    assert summary["methods"]["himap"]["analytic"]["total_tflops"] * 1e12 == pytest.approx(
        full_cost(arch, "himap", shape, dtype="fp32").total)


def test_official_13b_preset_and_its_flops(capsys):
    from himap.cost.flops import get_arch, omega, paper_flops
    from himap.prune.schedule import PRESETS

    official = PRESETS["himap-13b-official"]
    assert [(s.k, s.ratio, s.criterion) for s in official.stages] == [(2, 0.5, "phi_sh"), (8, 0.75, "phi_dp")]
    a = get_arch("llava-1.5-13b")
    o = lambda n: omega(n, 5120, 13824)  # noqa: E731
    assert paper_flops(a, official) == 2 * o(576) + 6 * o(288) + 32 * o(72)  # eq. (10) with K1=2, L=40
    assert paper_flops(a, "himap-13b") == 3 * o(576) + 5 * o(288) + 32 * o(72)
    assert main(["flops", "--arch", "llava-1.5-13b", "--method", "himap-13b,himap-13b-official", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["methods"]}
    assert rows["himap-13b-official"]["paper_tflops"] == pytest.approx(paper_flops(a, official) / 1e12)
    assert main(["flops", "--arch", "llava-1.5-13b", "--method", "himap", "--prompt-format", "hf", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"]["n_system"] == 5
    assert main(["flops", "--arch", "llava-1.5-13b", "--method", "himap", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"]["n_system"] == 35
