"""Golden tests of the pruning engine on tiny random models of every supported family (issue 13):
LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, InternVL, Qwen3-VL; Gemma 3 is refused."""

import pytest
import torch
from torch.testing import assert_close

import himap
from himap.models.testing import (
    FAMILIES,
    VIDEO_FAMILIES,
    family_batch,
    family_processor,
    tiny_family_model,
)
from himap.prune import criteria
from himap.prune.adapters import find_adapter
from himap.prune.schedule import Schedule, Stage
from himap.prune.tokens import token_sets, visual_groups


def _k1(family):
    return 3 if family == "qwen3_vl" else 2  # Qwen3-VL: deepstack injects after layers 0..2


def noop(family):
    return Schedule((Stage(_k1(family), 0.0, "phi_sh"), Stage(5, 0.0, "phi_dp")), name="noop")


def two_stage(family):
    return Schedule((Stage(_k1(family), 0.5, "phi_sh"), Stage(5, 0.75, "phi_dp")), name="two-stage")


SAMPLES = [  # different image sizes per sample; the second sample has two images with text between
    {"system": "It is a picture .", "images": [(64, 96)], "text": "What color is the object ?"},
    {"images": [(96, 64), (64, 64)], "text": "Which shape is on the left ?"},
]


class Family:
    def __init__(self, name, tmp):
        from transformers import AutoModelForImageTextToText

        self.name = name
        self.processor = family_processor(name)
        base = tiny_family_model(name, self.processor.tokenizer, seed=0)
        base.save_pretrained(tmp)
        self.models = {}
        for impl in ("sdpa", "eager"):
            m = AutoModelForImageTextToText.from_pretrained(tmp, attn_implementation=impl, dtype=torch.float32).eval()
            m.generation_config = base.generation_config
            self.models[impl] = m
        self.batch = family_batch(self.processor, SAMPLES, seed=1)
        self.visual_ids = find_adapter(base).visual_token_ids(base)

    def alone(self, i):
        return family_batch(self.processor, [SAMPLES[i]], seed=1 + i) if i else family_batch(
            self.processor, [SAMPLES[0]], seed=1)


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory):
    torch.set_num_threads(1)
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def greedy(model, inputs, n=4):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_dropping_nothing_is_bit_exact(fam, impl):
    model, batch = fam.models[impl], fam.batch
    ref_logits, ref_tokens = model(**batch).logits, greedy(model, batch)
    with himap.pruned(model, noop(fam.name)) as handle:
        assert_close(model(**batch).logits, ref_logits, rtol=0, atol=0)
        assert torch.equal(greedy(model, batch), ref_tokens)
    n_visual = token_sets(batch["input_ids"], fam.visual_ids, batch["attention_mask"]).image.sum(1).tolist()
    assert handle.stats.pruned and [row[0] for row in handle.stats.image_tokens_per_layer] == n_visual
    assert min(n_visual) >= 8


def _step_inputs(batch, ids, mask):
    """The batch's pixel inputs for a longer sequence (mm_token_type_ids grown with text zeros)."""
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in batch:
        grow = ids.shape[1] - batch["mm_token_type_ids"].shape[1]
        out["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"],
                                              batch["mm_token_type_ids"].new_zeros((ids.shape[0], grow))], dim=1)
    return {"input_ids": ids, "attention_mask": mask, **out}


def test_cached_generate_equals_uncached_recompute(fam):
    model, batch, schedule = fam.models["sdpa"], fam.batch, two_stage(fam.name)
    with himap.pruned(model, schedule) as handle:
        cached = greedy(model, batch, n=5)
        kept = handle.stats.kept_image_indices
    ids, mask = batch["input_ids"], batch["attention_mask"]
    suppress = torch.tensor(fam.visual_ids)
    with himap.pruned(model, schedule, replay=kept):
        for _ in range(5):
            logits = model(**_step_inputs(batch, ids, mask), use_cache=False).logits
            nxt = logits[:, -1].index_fill(-1, suppress, float("-inf")).argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(cached, ids)


def test_left_padded_batch_equals_samples_alone(fam):
    model, batch = fam.models["sdpa"], fam.batch
    with himap.pruned(model, two_stage(fam.name)) as handle:
        together = greedy(model, batch, n=4)
        kept_together = handle.stats.kept_image_indices
        for b in range(len(SAMPLES)):
            alone = greedy(model, fam.alone(b), n=4)
            assert torch.equal(alone[0, -4:], together[b, -4:])
            assert [s[0] for s in handle.stats.kept_image_indices] == [s[b] for s in kept_together]


def test_kv_cache_lengths_follow_schedule(fam):
    model, inputs = fam.models["sdpa"], fam.alone(1)  # two images
    t = inputs["input_ids"].shape[1]
    n = int(token_sets(inputs["input_ids"], fam.visual_ids).image.sum())
    k1 = _k1(fam.name)
    n1 = n - n // 2
    n2 = n1 - int(0.75 * n1)
    with himap.pruned(model, two_stage(fam.name)) as handle:
        model(**inputs)
        expected = [t] * k1 + [t - n + n1] * (5 - k1) + [t - n + n2] * 5
        assert handle.stats.kv_cache_lengths == expected
        assert handle.stats.image_tokens_per_layer == [[n] * k1 + [n1] * (5 - k1) + [n2] * 5]
        greedy(model, inputs, n=3)
        assert handle.stats.kv_cache_lengths == [x + 2 for x in expected]


def test_several_images_rank_together_or_per_image(fam):
    """V is every visual token of both images; quota='image' keeps n_g - floor(R n_g) of each."""
    model, inputs = fam.models["sdpa"], fam.alone(1)
    sets = token_sets(inputs["input_ids"], fam.visual_ids)
    groups = visual_groups(inputs["input_ids"], sets.image)
    sizes = [int((groups == g).sum()) for g in range(int(groups.max()) + 1)]
    assert len(sizes) >= 2 and sum(sizes) == int(sets.image.sum())
    stage = Schedule((Stage(_k1(fam.name), 0.75, "phi_sh"),))
    with himap.pruned(model, stage) as handle:
        model(**inputs)
    kept = handle.stats.kept_image_indices[0][0]
    assert len(kept) == sum(sizes) - int(0.75 * sum(sizes))
    with himap.pruned(model, stage, quota="image") as handle:
        model(**inputs)
    kept = handle.stats.kept_image_indices[0][0]
    group_of = groups[sets.image]  # group of each visual token, in order
    per_group = [int((group_of[kept] == g).sum()) for g in range(len(sizes))]
    assert per_group == [n - int(0.75 * n) for n in sizes]


def test_replay_across_attention_implementations(fam):
    batch, schedule = fam.batch, two_stage(fam.name)
    out = {}
    for impl in ("sdpa", "eager"):
        with himap.pruned(fam.models[impl], schedule) as handle:
            out[impl] = (greedy(fam.models[impl], batch), handle.stats.kept_image_indices)
    assert out["sdpa"][1] == out["eager"][1]
    assert torch.equal(out["sdpa"][0], out["eager"][0])
    with himap.pruned(fam.models["eager"], schedule, replay=out["sdpa"][1]) as handle:
        assert torch.equal(greedy(fam.models["eager"], batch), out["sdpa"][0])
    assert handle.stats.kept_image_indices == out["sdpa"][1]


def _masked_reference(model, inputs, keep, k):
    """The unmodified eager model with the dropped positions masked out as keys from layer k on:
    the kept tokens keep the positions (M-RoPE included) the model gave them, so the last
    position's logits must equal the pruned model's."""
    lm = find_adapter(model).language_model(model)
    hooks = []

    def pre(module, args, kwargs):
        m = kwargs["attention_mask"]
        blocked = ~keep[:, None, None, :]  # [B, 1, 1, T]
        if m is None:
            t = keep.shape[1]
            m = torch.ones((1, 1, t, t), dtype=torch.bool).tril()
        kwargs["attention_mask"] = m & ~blocked if m.dtype == torch.bool else m.masked_fill(blocked, torch.finfo(m.dtype).min)
        return args, kwargs

    for layer in lm.layers[k:]:
        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        return model(**inputs).logits[:, -1]
    finally:
        for h in hooks:
            h.remove()


def test_kept_tokens_keep_their_original_positions(fam):
    model, inputs = fam.models["eager"], fam.alone(0)
    k = _k1(fam.name)
    with himap.pruned(model, Schedule((Stage(k, 0.5, "phi_sh"),))) as handle:
        pruned = model(**inputs).logits[:, -1]
    sets = token_sets(inputs["input_ids"], fam.visual_ids)
    vis = sets.image[0].nonzero().squeeze(1)
    keep = ~sets.image.clone()
    keep[0, vis[handle.stats.kept_image_indices[0][0]]] = True
    reference = _masked_reference(model, inputs, keep, k)
    assert_close(pruned, reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pruned, model(**inputs).logits[:, -1], atol=1e-4)  # pruning did change something


def test_remove_restores(fam):
    model, batch = fam.models["sdpa"], fam.batch
    ref = model(**batch).logits
    himap.apply(model, two_stage(fam.name))
    himap.remove(model)
    lm = find_adapter(model).language_model(model)
    assert not hasattr(lm, "_himap_handle") and not lm._forward_pre_hooks and not lm._forward_hooks
    assert not any(layer._forward_pre_hooks for layer in lm.layers)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert_close(model(**batch).logits, ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------- video


@pytest.fixture(scope="module")
def video_batch(fam):
    if fam.name not in VIDEO_FAMILIES:
        return None
    return family_batch(fam.processor, [{"system": "It is a picture .", "video": (4, (64, 64)), "text": "What is this ?"},
                                        {"images": [(64, 64)], "video": (4, (64, 96))}], seed=3)


def test_video_tokens_are_visual_and_pruned(fam, video_batch):
    if video_batch is None:
        assert fam.name not in VIDEO_FAMILIES  # InternVL: one image per frame; Qwen3-VL: checkpoint processor
        return
    model = fam.models["sdpa"]
    sets = token_sets(video_batch["input_ids"], fam.visual_ids, video_batch["attention_mask"])
    video_id = find_adapter(model).video_token_id(model)
    assert bool((video_batch["input_ids"] == video_id).any())
    ref = greedy(model, video_batch)
    with himap.pruned(model, noop(fam.name)):
        assert torch.equal(greedy(model, video_batch), ref)
    with himap.pruned(model, two_stage(fam.name)) as handle:
        greedy(model, video_batch)
    n = sets.image.sum(1).tolist()
    assert [row[0] for row in handle.stats.image_tokens_per_layer] == n
    assert [len(k) for k in handle.stats.kept_image_indices[0]] == [x - x // 2 for x in n]
    with himap.pruned(model, two_stage(fam.name), quota="image") as handle:  # per frame
        model(**video_batch)
    groups = visual_groups(video_batch["input_ids"], sets.image, video_id,
                           find_adapter(model).video_frames(model, video_batch))
    frames = int((groups[0] >= 0).any()) and int(groups[0].max()) + 1
    assert frames == 4 // (2 if "qwen" in fam.name else 1)  # Qwen: temporal patches of 2 frames
    sizes = [int((groups[0] == g).sum()) for g in range(frames)]
    kept = handle.stats.kept_image_indices[0][0]
    order = groups[0][sets.image[0]]
    assert [int((order[kept] == g).sum()) for g in range(frames)] == [s - s // 2 for s in sizes]


# ----------------------------------------------------------------------------- family limits


def test_qwen3_vl_deepstack_needs_k_after_the_injections(fam):
    if fam.name != "qwen3_vl":
        return
    with pytest.raises(ValueError, match=r"deepstack .* layers 0\.\.2.*K=2"):
        himap.apply(fam.models["sdpa"], "himap")
    assert not hasattr(fam.models["sdpa"].model.language_model, "_himap_handle")


def test_gemma3_is_refused_with_the_reason():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=32, patch_size=8),
                       mm_tokens_per_image=4)
    model = Gemma3ForConditionalGeneration(cfg)
    with pytest.raises(TypeError, match="bidirectional"):
        himap.apply(model, "himap")


def test_quota_name_is_checked(fam):
    with pytest.raises(ValueError, match="quota"):
        himap.apply(fam.models["sdpa"], "himap", quota="frame")


def test_criteria_reductions_equal_dense_criteria():
    """Chunked reductions give the dense criteria's scores, whatever the chunk size."""
    from himap.prune.rows import attention_rows, reduced_attention

    g = torch.Generator().manual_seed(0)
    b, hq, hkv, t, d = 2, 4, 2, 40, 8
    q, k = torch.randn(b, hq, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    ids = torch.randint(5, 50, (b, t), generator=g)
    ids[:, 6:30] = 3
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :4] = 0
    sets = token_sets(ids, 3, mask)
    for name, reduce in criteria.REDUCTIONS.items():
        rows = criteria.needed_rows(name, sets)
        dense = criteria.ATTENTION_CRITERIA[name](attention_rows(q, k, rows, sets.valid, 0.3), sets)
        for budget in (1, 4096, 10 ** 9):  # one row per chunk, a few rows, everything at once
            red = reduced_attention(q, k, rows, sets.valid, 0.3, reduce, sets.image if reduce == "row" else None,
                                    budget_bytes=budget)
            assert_close(criteria.from_reduction(red, sets), dense, rtol=1e-5, atol=1e-6)


def test_segment_with_full_and_sliding_layers_gets_each_its_mask(tmp_path):
    """A Qwen2 decoder whose layers mix full and sliding-window attention: every pruned layer gets
    the mask of its own kind (dropping nothing stays bit-exact, also decoding)."""
    from transformers import AutoModelForImageTextToText

    from himap.models.testing import tiny_family_config

    processor = family_processor("llava_onevision")
    cfg = tiny_family_config("llava_onevision", processor.tokenizer)
    cfg.text_config.use_sliding_window = True
    cfg.text_config.sliding_window = 6
    cfg.text_config.layer_types = ["full_attention"] * 4 + ["sliding_attention"] * 6
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    batch = family_batch(processor, SAMPLES, seed=1)
    ref_logits, ref_tokens = model(**batch).logits, greedy(model, batch)
    nothing = Schedule((Stage(2, 0.0, "phi_sh"), Stage(5, 0.0, "phi_dp")), name="noop")
    with himap.pruned(model, nothing):
        assert_close(model(**batch).logits, ref_logits, rtol=0, atol=0)
        assert torch.equal(greedy(model, batch), ref_tokens)


def test_stage_before_the_llm_on_mrope_decode_needs_the_mask():
    """Qwen numbers a decode step from layer 0's cache, which a stage at K = 0 shortened: without an
    attention mask to count the true past from, the step is refused, not run at a wrong position."""
    import inspect

    from transformers import Qwen2VLTextModel

    from himap.prune.engine import CACHE_KEYWORDS

    kw = next(k for k in CACHE_KEYWORDS if k in inspect.signature(Qwen2VLTextModel.forward).parameters)
    processor = family_processor("qwen2_vl")
    model = tiny_family_model("qwen2_vl", processor.tokenizer)
    batch = family_batch(processor, SAMPLES[:1], seed=1)
    with torch.no_grad(), himap.pruned(model, Schedule((Stage(0, 0.5, "random"),), name="k0")):
        out = model(**batch, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        with pytest.raises(ValueError, match="needs the attention_mask"):
            model(input_ids=nxt, **{kw: getattr(out, kw)})
