"""himap.integrations.harness: the harness-independent model behind `lmms-eval --model himap`,
on the built-in model (no lmms-eval needed)."""

import math

import pytest
import torch

from himap.cost.flops import PromptShape, full_cost, paper_flops
from himap.integrations.harness import (
    HarnessArgs,
    HarnessModel,
    Request,
    continuation_ids,
    cut_at,
    generation_settings,
    parse_args,
    plan_batches,
    split_visuals,
    summarize,
)
from himap.prune.schedule import PRESETS, image_tokens_per_layer
from himap.tasks import shapes


@pytest.fixture(scope="module")
def items():
    return shapes.load(None, split="mc,pope", limit=8)  # 4 + 4, rendered into $HIMAP_CACHE or ~/.cache


@pytest.fixture(scope="module")
def pruned_model():
    model = HarnessModel(HarnessArgs(method="himap", batch_size=4, log_kept_indices=True), device="cpu")
    yield model
    model.close()


@pytest.fixture(scope="module")
def vanilla_model():
    model = HarnessModel(HarnessArgs(method="vanilla", batch_size=4), device="cpu")
    yield model
    model.close()


def _requests(items, **extra):
    return [Request(context=it.prompt, visuals=[it.image], key=("shapes", "test", it.id), **extra) for it in items]


# ----------------------------------------------------------------------------- pure helpers

def test_parse_args_reads_lmms_eval_strings():
    args = parse_args({"pretrained": "builtin", "method": "himap", "k": "2 8", "ratio": 0.5, "criterion": "- phi_dp_row",
                       "batch_size": "8", "log_kept_indices": "true", "max_batch_size": None, "device": None,
                       "prompt_format": "llava-v1", "quota": "image"})
    assert (args.prompt_format, args.quota) == ("llava-v1", "image")
    assert (args.k, args.ratio, args.criterion) == ([2, 8], [0.5], [None, "phi_dp_row"])
    assert (args.batch_size, args.log_kept_indices, args.device) == (8, True, None)
    with pytest.raises(ValueError, match="unknown model argument"):
        parse_args({"pretrianed": "builtin"})
    with pytest.raises(ValueError, match="no 'auto'"):
        parse_args({"batch_size": "auto"})
    with pytest.raises(ValueError, match="k expects int"):
        parse_args({"k": "2 x"})


def test_generation_settings_follow_lmms_eval_conventions():
    assert generation_settings({"until": "\n\n", "max_new_tokens": 5, "temperature": 0}, 99) == (
        {"do_sample": False}, ["\n\n"], 5)
    kwargs, until, max_new = generation_settings({"temperature": 0.7, "top_p": 0.9, "num_beams": 1}, 99)
    assert kwargs == {"do_sample": True, "temperature": 0.7, "top_p": 0.9} and until == [] and max_new == 99
    with pytest.raises(ValueError, match="num_beams=4"):
        generation_settings({"num_beams": 4}, 8)
    with pytest.warns(UserWarning, match="image_aspect_ratio"):
        generation_settings({"image_aspect_ratio": "pad"}, 8)
    assert cut_at("yes.\n\nUSER: no", ["\n\n", "USER"]) == "yes." and cut_at("abc", []) == "abc"


def test_plan_batches_groups_sorts_and_covers_every_request():
    lengths = [5, 9, 1, 7, 3, 8]
    groups = ["a", "b", "a", "a", "b", "a"]
    plan = plan_batches(lengths, groups, 2)
    assert plan == [[5, 3], [0, 2], [1, 4]]  # group a longest first (8, 7, 5, 1), then group b
    assert sorted(i for batch in plan for i in batch) == list(range(6))
    with pytest.raises(ValueError):
        plan_batches(lengths, groups, 0)


def test_summarize_sums_requests_of_one_example_and_averages_examples():
    rows = [{"key": ["t1", "test", 0], "tflops": 1.0, "tflops_vanilla": 2.0, "tflops_paper": 0.5, "visual_tokens": 4},
            {"key": ["t1", "test", 0], "tflops": 1.0, "tflops_vanilla": 2.0, "tflops_paper": 0.5, "visual_tokens": 4},
            {"key": ["t1", "test", 1], "tflops": 4.0, "tflops_vanilla": 4.0, "tflops_paper": 1.0, "visual_tokens": 8},
            {"key": ["t2", "test", 0], "tflops": None, "tflops_vanilla": None, "tflops_paper": None, "visual_tokens": 2}]
    s = summarize(rows)
    t1 = s["tasks"]["t1"]
    assert (t1["examples"], t1["requests"], t1["tflops_per_example"], t1["tflops_vanilla_per_example"]) == (2, 3, 3.0, 4.0)
    assert t1["visual_tokens_per_example"] == 6.0
    assert s["examples"] == 3 and s["tflops_per_example"] is None  # one task without a cost model
    assert s["tasks"]["t2"]["tflops_per_example"] is None


def test_continuation_ids_follow_the_context(pruned_model):
    tok = pruned_model.tokenizer
    assert tok.convert_ids_to_tokens(continuation_ids(tok, "<s>USER: hi\nASSISTANT:", " A")) == ["A"]
    assert tok.convert_ids_to_tokens(continuation_ids(tok, "ASSISTANT:", " yes .")) == ["yes", "."]
    with pytest.raises(ValueError, match="non-empty"):
        continuation_ids(tok, "x", "")


# ----------------------------------------------------------------------------- the model

def test_generation_equals_the_eval_runner(pruned_model, items):
    from himap.evaluation.runner import model_predictor

    model = pruned_model
    answers = model.generate(_requests(items, gen_kwargs={"max_new_tokens": shapes.MAX_NEW_TOKENS, "until": ["\n\n"]}))
    model.close()  # the runner applies the schedule itself
    try:
        with model_predictor(model.model, model.processor, model.schedule, shapes.MAX_NEW_TOKENS) as predict:
            expected = [r for i in range(0, len(items), 4) for r in predict(items[i:i + 4])]
    finally:
        import himap

        model.handle = himap.apply(model.model, model.schedule)
    assert [a.text.strip() for a in answers] == [e["prediction"] for e in expected]
    assert [a.output_tokens for a in answers] == [e["new_tokens"] for e in expected]
    schedule = PRESETS["himap"]
    for a, e in zip(answers, expected):
        s = a.stats
        assert s["visual_tokens"] == e["n_image"] == 144
        assert s["visual_tokens_per_layer"] == image_tokens_per_layer(schedule, 144, 10)
        assert s["kept_visual_tokens"] == [72, 18] and [len(k) for k in s["kept_indices"]] == [72, 18]
        shape = PromptShape(e["n_system"], e["n_instruction"], e["new_tokens"], 144)
        assert s["tflops"] == pytest.approx(full_cost(model.arch, schedule, shape).decoder / 1e12, rel=1e-12)
        assert s["tflops_vanilla"] == pytest.approx(full_cost(model.arch, "vanilla", shape).decoder / 1e12, rel=1e-12)
        assert s["tflops_paper"] == pytest.approx(paper_flops(model.arch, schedule, 144) / 1e12, rel=1e-12)
        assert a.input_tokens == e["n_system"] + e["n_image"] + e["n_instruction"]
    assert len(model.records) >= len(items)


def test_until_stops_generation_and_cuts_the_text(vanilla_model, items):
    caption = shapes.load(None, split="caption", limit=1)[0]
    full = vanilla_model.generate(_requests([caption], gen_kwargs={"max_new_tokens": 24}))[0]
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = f" {words[1]} "
    cut = vanilla_model.generate(_requests([caption], gen_kwargs={"max_new_tokens": 24, "until": [stop]}))[0]
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.output_tokens < full.output_tokens


def _reference_nll(model, processor, context: str, image: str, continuation: str) -> tuple[float, bool]:
    """-log p(continuation | context) from one forward over context + continuation (no cache, no
    padding) of the unmodified model: the textbook definition."""
    from himap.models.loading import build_inputs, chat_text

    ctx = build_inputs(processor, [image], [context])
    ids = continuation_ids(processor.tokenizer, chat_text(processor, context), continuation)
    full = {**ctx, "input_ids": torch.cat([ctx["input_ids"], torch.tensor([ids])], 1),
            "attention_mask": torch.ones(1, ctx["input_ids"].shape[1] + len(ids), dtype=torch.long)}
    with torch.no_grad():
        logits = model(**full).logits[0, -len(ids) - 1:-1].float()  # the rows that predict the continuation
    logp = torch.log_softmax(logits, -1)[torch.arange(len(ids)), torch.tensor(ids)]
    return -float(logp.sum()), bool((logits.argmax(-1) == torch.tensor(ids)).all())


def test_loglikelihood_unpruned_equals_one_forward(vanilla_model, items):
    import himap

    conts = [" A", " B .", " yes", " no , there is a circle"]
    reqs = [Request(context=it.prompt, visuals=[it.image], continuation=c, key=("t", "s", i))
            for i, (it, c) in enumerate(zip(items[::2], conts))]
    got = vanilla_model.loglikelihood(reqs)  # one batch: different contexts and continuation lengths
    himap.remove(vanilla_model.model)
    try:
        for r, a in zip(reqs, got):
            nll, greedy = _reference_nll(vanilla_model.model, vanilla_model.processor, r.context, r.visuals[0],
                                         r.continuation)
            assert a.nll == pytest.approx(nll, abs=1e-4) and a.is_greedy == greedy
    finally:
        vanilla_model.handle = himap.apply(vanilla_model.model, vanilla_model.schedule)
    assert [a.output_tokens for a in got] == [1, 2, 1, 6]


def test_pruned_loglikelihood_ranks_on_the_context_only(pruned_model, items):
    mc = [it for it in items if it.meta["split"] == "mc"]
    gen = pruned_model.generate(_requests(mc[:1], gen_kwargs={"max_new_tokens": 4}))[0]
    letters = [Request(context=mc[0].prompt, visuals=[mc[0].image], continuation=f" {x}", key=("t", "s", 0))
               for x in "ABCD"]
    together = pruned_model.loglikelihood(letters)
    alone = [pruned_model.loglikelihood([r])[0] for r in letters]
    for a, b in zip(together, alone):
        assert a.nll == pytest.approx(b.nll, abs=1e-4) and a.is_greedy == b.is_greedy
        assert a.stats["kept_indices"] == gen.stats["kept_indices"]  # the continuation does not change the ranking
    gold = "ABCD".index(mc[0].answer)
    assert [a.is_greedy for a in together] == [i == gold for i in range(4)]
    assert min(range(4), key=lambda i: together[i].nll) == gold
    assert gen.text.strip() == mc[0].answer
    assert math.isfinite(sum(a.nll for a in together))


def test_several_images_per_request(pruned_model, items):
    two = Request(context=items[0].prompt, visuals=[items[0].image, items[1].image], key=("t", "s", 0),
                  gen_kwargs={"max_new_tokens": 2})
    one = Request(context=items[2].prompt, visuals=[items[2].image], key=("t", "s", 1), gen_kwargs={"max_new_tokens": 2})
    a2, a1 = pruned_model.generate([two, one])
    assert a2.stats["visual_tokens"] == 288 and a1.stats["visual_tokens"] == 144
    assert a2.stats["visual_tokens_per_layer"] == image_tokens_per_layer(PRESETS["himap"], 288, 10)
    assert a2.stats["kept_visual_tokens"] == [144, 36]


def test_video_on_an_image_only_family_raises(pruned_model, items):
    from PIL import Image

    frames = [Image.open(items[0].image)] * 2
    assert split_visuals([items[0].image, frames]) == ([items[0].image], [frames])
    assert split_visuals(["clip.MP4", None]) == ([], ["clip.MP4"])
    with pytest.raises(ValueError, match="takes no video"):
        pruned_model.generate([Request(context="x", visuals=[frames], gen_kwargs={"max_new_tokens": 1})])
    with pytest.raises(ValueError, match="one video per request"):
        split_visuals([frames, frames])
    with pytest.raises(ValueError, match="audio is not"):
        split_visuals([{"array": [0.0], "sampling_rate": 16000}])


def test_sampling_follows_the_temperature(vanilla_model, items):
    greedy = vanilla_model.generate(_requests(items, gen_kwargs={"max_new_tokens": 3, "temperature": 0}))
    torch.manual_seed(0)
    sampled = vanilla_model.generate(_requests(items, gen_kwargs={"max_new_tokens": 3, "temperature": 50.0}))
    assert [a.text for a in sampled] != [a.text for a in greedy]  # near-uniform sampling leaves the greedy answers


# ----------------------------------------------------------------------------- another family

@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from himap.models.testing import random_images, save_tiny_family_dir

    images = random_images([(64, 96), (96, 64), (64, 64), (64, 64), (64, 64), (64, 64)], seed=5)
    return save_tiny_family_dir(tmp_path_factory.mktemp("qwen_harness"), "qwen2_5_vl", seed=2), images


def test_a_family_with_video_plugs_in_through_loading(qwen_dir):
    """Qwen2.5-VL (M-RoPE positions, video): several images, a video as frames, and the unpruned
    log-likelihood equal to one forward over context + continuation."""
    from himap.models.loading import build_inputs, chat_text

    model_dir, images = qwen_dir
    frames = images[2:]
    pruned = HarnessModel(HarnessArgs(pretrained=model_dir, method="himap", batch_size=4), device="cpu")
    try:
        two, video = pruned.generate([
            Request(context="What is this ?", visuals=images[:2], gen_kwargs={"max_new_tokens": 2}),
            Request(context="What is this ?", visuals=[frames], gen_kwargs={"max_new_tokens": 2})])
    finally:
        pruned.close()
    for answer in (two, video):
        n = answer.stats["visual_tokens"]
        assert n > 0 and answer.stats["visual_tokens_per_layer"] == image_tokens_per_layer(PRESETS["himap"], n, 10)

    plain = HarnessModel(HarnessArgs(pretrained=model_dir, method="vanilla", batch_size=4), device="cpu")
    reqs = [Request(context="What is this ?", visuals=[images[0]], continuation=c) for c in (" is", " this is it")]
    got = plain.loglikelihood(reqs)  # one batch, continuations of 1 and 3 tokens
    plain.close()  # the reference runs the unmodified model
    for r, a in zip(reqs, got):
        ctx = build_inputs(plain.processor, [r.visuals[0]], [r.context])
        ids = torch.tensor([continuation_ids(plain.tokenizer, chat_text(plain.processor, r.context), r.continuation)])
        width = ctx["input_ids"].shape[1]  # extend every per-token input: ids, mask (ones), token types (text: 0)
        full = {k: torch.cat([v, ids if k == "input_ids" else torch.full_like(ids, int(k == "attention_mask"))], 1)
                if v.dim() == 2 and v.shape[1] == width else v for k, v in ctx.items()}
        with torch.no_grad():
            logits = plain.model(**full).logits[0, -ids.shape[1] - 1:-1].float()
        nll = -float(torch.log_softmax(logits, -1)[torch.arange(ids.shape[1]), ids[0]].sum())
        assert a.nll == pytest.approx(nll, abs=1e-4)
    assert [a.output_tokens for a in got] == [1, 3]


def test_shapes_export_writes_the_items_himap_eval_reads(tmp_path):
    import json
    import os

    path = shapes.export(str(tmp_path), split="mc,pope", limit=4)
    rows = [json.loads(line) for line in open(path)]
    items = shapes.load(None, split="mc,pope", limit=4)
    assert [(r["id"], r["prompt"], r["answer"], r["split"]) for r in rows] == \
        [(it.id, it.prompt, it.answer, it.meta["split"]) for it in items]
    assert all(os.path.isfile(os.path.join(tmp_path, r["image"])) for r in rows)
    assert rows[0]["options"] == items[0].meta["options"] and rows[-1]["options"] == []


def test_harness_takes_one_method():
    with pytest.raises(ValueError, match="method='himap,fastv' names 2 methods; give one"):
        HarnessModel(HarnessArgs(method="himap,fastv"), device="cpu")
