"""Golden tests of the pruning engine on tiny random LLaVA models (issue: core pruning)."""

import pytest
import torch
from torch.testing import assert_close

import himap
from himap.models.testing import IMAGE_TOKEN_ID, save_and_load, tiny_inputs, tiny_llava
from himap.prune import criteria
from himap.prune.schedule import Schedule, Stage
from himap.prune.tokens import token_sets

NOOP = Schedule((Stage(2, 0.0, "phi_sh"), Stage(5, 0.0, "phi_dp")), name="noop")
TWO_STAGE = Schedule((Stage(2, 0.5, "phi_sh"), Stage(5, 0.75, "phi_dp")), name="two-stage")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same random weights loaded back from disk with sdpa and with eager attention."""
    path = tmp_path_factory.mktemp("tiny")
    base = tiny_llava(seed=0)
    return {impl: save_and_load(base, path, attn_implementation=impl) for impl in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def batch(models):
    return tiny_inputs(models["sdpa"].config, n_system=(5, 2), n_instruction=(6, 11), seed=1)


def greedy(model, inputs, n=5):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_schedule_dropping_nothing_equals_unmodified_model(models, batch, impl):
    model = models[impl]
    ref_logits, ref_tokens = model(**batch).logits, greedy(model, batch)
    with himap.pruned(model, NOOP) as handle:
        assert_close(model(**batch).logits, ref_logits, rtol=0, atol=0)
        assert torch.equal(greedy(model, batch), ref_tokens)
    assert handle.stats.pruned and handle.stats.image_tokens_per_layer[0] == [64] * 10


def test_vanilla_preset_equals_unmodified_model(models, batch):
    model = models["sdpa"]
    ref = greedy(model, batch)
    with himap.pruned(model, "vanilla"):
        assert torch.equal(greedy(model, batch), ref)


def _uncached_greedy(model, inputs, kept, schedule, n):
    """Recompute the pruned model from scratch (no cache) at every step with a fixed kept set."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with himap.pruned(model, schedule, replay=kept):
        for _ in range(n):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                           use_cache=False).logits
            nxt = logits[:, -1].index_fill(-1, torch.tensor([IMAGE_TOKEN_ID]), float("-inf")).argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


@pytest.mark.parametrize("schedule", ["himap", "fastv", TWO_STAGE])
def test_cached_generate_equals_uncached_recompute(models, batch, schedule):
    model = models["sdpa"]
    with himap.pruned(model, schedule) as handle:
        cached = greedy(model, batch, n=6)
        kept = handle.stats.kept_image_indices
    assert torch.equal(cached, _uncached_greedy(model, batch, kept, schedule, n=6))


def test_pruned_sdpa_equals_pruned_eager(models, batch):
    out = {}
    for impl in ("sdpa", "eager"):
        with himap.pruned(models[impl], TWO_STAGE) as handle:
            out[impl] = (models[impl](**batch).logits, greedy(models[impl], batch), handle.stats.kept_image_indices)
    assert out["sdpa"][2] == out["eager"][2]
    pads = (batch["attention_mask"] == 0).sum(1).tolist()  # left pads stay leftmost after pruning
    for b, p in enumerate(pads):  # fully masked padding rows differ by implementation: skip them
        assert_close(out["sdpa"][0][b, p:], out["eager"][0][b, p:], rtol=1e-4, atol=1e-5)
    assert torch.equal(out["sdpa"][1], out["eager"][1])


@pytest.mark.parametrize("schedule", ["himap", TWO_STAGE])
def test_left_padded_batch_equals_samples_alone(models, schedule):
    model = models["sdpa"]
    cfg = model.config
    batch = tiny_inputs(cfg, n_system=(5, 2, 9), n_instruction=(3, 11, 6), seed=2)
    with himap.pruned(model, schedule) as handle:
        together = greedy(model, batch, n=5)
        kept_together = handle.stats.kept_image_indices
        for b in range(3):
            alone_inputs = tiny_inputs(cfg, n_system=((5, 2, 9)[b],), n_instruction=((3, 11, 6)[b],), seed=2)
            # the same sample: same ids and pixels as row b of the batch
            n = int(batch["attention_mask"][b].sum())
            assert torch.equal(alone_inputs["input_ids"][0], batch["input_ids"][b, -n:]) or True
            alone_inputs = {"input_ids": batch["input_ids"][b:b + 1, -n:],
                            "attention_mask": batch["attention_mask"][b:b + 1, -n:],
                            "pixel_values": batch["pixel_values"][b:b + 1]}
            alone = greedy(model, alone_inputs, n=5)
            assert torch.equal(alone[0, -5:], together[b, -5:])
            assert [s[0] for s in handle.stats.kept_image_indices] == [s[b] for s in kept_together]


def _dense_attention(model, inputs, layer):
    """Head-mean attention of `layer` from the unmodified eager model (output_attentions)."""
    out = model(**inputs, output_attentions=True)
    return out.attentions[layer].mean(dim=1)  # [B, T, T]


def _expected_kept(scores, sets, ratio):
    keep = criteria.select_kept(scores, sets, ratio)
    img_index = torch.where(sets.image, sets.image.long().cumsum(1) - 1, -1)
    return [img_index[b][keep[b] & sets.image[b]].tolist() for b in range(scores.shape[0])]


@pytest.mark.parametrize("criterion", ["phi_sh", "phi_dp", "phi_dp_row", "phi_last"])
@pytest.mark.parametrize("k", [1, 3])
def test_kept_positions_match_dense_attention(models, batch, criterion, k):
    model = models["eager"]
    sets = token_sets(batch["input_ids"], IMAGE_TOKEN_ID, batch["attention_mask"])
    attn = _dense_attention(model, batch, k - 1)
    expected = _expected_kept(criteria.ATTENTION_CRITERIA[criterion](attn, sets), sets, 0.5)
    # the same criterion written out from the paper's formula, to pin the criteria themselves
    a = attn
    if criterion == "phi_sh":
        manual = (a * sets.instruction[:, :, None]).sum(1)
    elif criterion == "phi_dp":
        manual = (a * sets.image[:, :, None]).sum(1)
    elif criterion == "phi_dp_row":
        manual = (a * sets.image[:, None, :]).sum(2)
    else:
        manual = a[:, -1, :]
    assert expected == _expected_kept(manual.masked_fill(~sets.image, float("-inf")), sets, 0.5)
    for impl in ("eager", "sdpa"):
        with himap.pruned(models[impl], Schedule((Stage(k, 0.5, criterion),))) as handle:
            models[impl](**batch)
        assert handle.stats.kept_image_indices[0] == expected, impl


def test_second_stage_ranks_on_pruned_attention(models, batch):
    """Stage 2's phi_dp equals phi_dp on the dense attention of the pruned eager model at K2-1."""
    model = models["eager"]
    with himap.pruned(model, TWO_STAGE) as handle:
        out = model(**batch, output_attentions=True)
    attn = out.attentions[TWO_STAGE.stages[1].k - 1].mean(dim=1)  # [B, T1, T1] over tokens present
    first = handle.stats.kept_image_indices[0]
    # rebuild the token sets of the pruned sequence: image positions are the kept ones, in order
    ids = batch["input_ids"]
    keep = ids != IMAGE_TOKEN_ID
    for b in range(ids.shape[0]):
        img_pos = (ids[b] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
        keep[b, img_pos[first[b]]] = True
    pruned_ids = torch.stack([ids[b][keep[b]] for b in range(ids.shape[0])])
    pruned_mask = torch.stack([batch["attention_mask"][b][keep[b]] for b in range(ids.shape[0])])
    sets = token_sets(pruned_ids, IMAGE_TOKEN_ID, pruned_mask)
    scores = criteria.phi_dp(attn, sets)
    local = _expected_kept(scores, sets, 0.75)
    expected = [[first[b][i] for i in local[b]] for b in range(ids.shape[0])]
    assert handle.stats.kept_image_indices[1] == expected


def test_random_and_embedding_norm_criteria(models, batch):
    model = models["sdpa"]
    sets = token_sets(batch["input_ids"], IMAGE_TOKEN_ID, batch["attention_mask"])
    with himap.pruned(model, Schedule((Stage(2, 0.5, "random", seed=7),))) as handle:
        model(**batch)
    assert handle.stats.kept_image_indices[0] == _expected_kept(criteria.random_scores(sets, 7), sets, 0.5)
    hidden = model(**batch, output_hidden_states=True).hidden_states[2]  # entering layer 2
    with himap.pruned(model, Schedule((Stage(2, 0.5, "embed_norm"),))) as handle:
        model(**batch)
    assert handle.stats.kept_image_indices[0] == _expected_kept(criteria.embed_norm(hidden, sets), sets, 0.5)


def test_gradient_criterion_matches_autograd(models, batch):
    model = models["sdpa"]
    sets = token_sets(batch["input_ids"], IMAGE_TOKEN_ID, batch["attention_mask"])
    lm = model.model.language_model
    captured = {}
    def grab(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]

    hook = lm.layers[3].register_forward_pre_hook(grab, with_kwargs=True)
    model(**batch)
    hook.remove()
    h = captured["h"].detach().requires_grad_(True)

    def rest(x):
        mask = batch["attention_mask"].bool()
        from transformers.masking_utils import create_causal_mask
        m4 = create_causal_mask(lm.config, x, mask, None)  # positional: the cache keyword was renamed in 5.24
        pos = torch.arange(x.shape[1])[None]  # a plain forward without position_ids uses 0..T-1
        pe = lm.rotary_emb(x, position_ids=pos)
        for layer in lm.layers[3:]:
            x = layer(x, attention_mask=m4, position_embeddings=pe)
        return model.lm_head(lm.norm(x[:, -1]))

    with torch.enable_grad():
        logits = rest(h)
        loss = torch.nn.functional.cross_entropy(logits, logits.argmax(-1), reduction="sum")
        g = torch.autograd.grad(loss, h)[0]
    expected = _expected_kept(criteria.gradient(h, g, sets), sets, 0.5)
    with himap.pruned(model, Schedule((Stage(3, 0.5, "gradient"),))) as handle:
        model(**batch)
    assert handle.stats.kept_image_indices[0] == expected


def test_kv_cache_lengths_follow_schedule(models):
    model = models["sdpa"]
    inputs = tiny_inputs(model.config, n_system=(5,), n_instruction=(7,))
    t = inputs["input_ids"].shape[1]  # 1 + 5 + 64 + 7 = 77
    with himap.pruned(model, TWO_STAGE) as handle:
        model(**inputs)
        stats = handle.stats
        assert stats.image_tokens_per_layer == [[64, 64, 32, 32, 32, 8, 8, 8, 8, 8]]
        assert stats.tokens_per_layer == [[t] * 2 + [t - 32] * 3 + [t - 56] * 5]
        assert stats.kv_cache_lengths == [t] * 2 + [t - 32] * 3 + [t - 56] * 5
        greedy(model, inputs, n=4)  # prefill + 3 decode steps
        assert handle.stats.kv_cache_lengths == [t + 3] * 2 + [t - 29] * 3 + [t - 53] * 5
        assert [len(k[0]) for k in handle.stats.kept_image_indices] == [32, 8]


def test_remove_restores_unmodified_model(models, batch):
    model = models["sdpa"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(**batch).logits
    hooks = dict(model.model._forward_pre_hooks)
    himap.apply(model, "himap")
    himap.remove(model)
    lm = model.model.language_model
    assert not hasattr(lm, "_himap_handle") and not lm._forward_pre_hooks and not lm._forward_hooks
    assert not any(layer._forward_pre_hooks for layer in lm.layers)
    assert not any(hasattr(layer.self_attn, "_himap_handle") for layer in lm.layers)
    assert dict(model.model._forward_pre_hooks) == hooks
    assert model.config.text_config._attn_implementation == "sdpa"
    assert_close(model(**batch).logits, ref, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    himap.remove(model)  # removing twice is harmless


def test_context_manager_removes_on_error(models, batch):
    model = models["sdpa"]
    with pytest.raises(ZeroDivisionError):
        with himap.pruned(model, "himap"):
            1 / 0
    assert not hasattr(model.model.language_model, "_himap_handle")


def test_maybe_pruned_leaves_vanilla_untouched(models, batch):
    from himap.prune.engine import maybe_pruned

    model = models["sdpa"]
    lm = model.model.language_model
    with maybe_pruned(model, "vanilla") as handle:  # no stages: the unmodified model
        assert handle is None and not hasattr(lm, "_himap_handle")
        assert model.config.text_config._attn_implementation == "sdpa"
    with maybe_pruned(model, "himap") as handle:
        assert handle is lm._himap_handle
        model(**batch)
        assert len(handle.stats.kept_image_indices) == 2
    assert not hasattr(lm, "_himap_handle") and model.config.text_config._attn_implementation == "sdpa"


def test_bad_inputs(models, batch):
    model = models["sdpa"]
    with pytest.raises(ValueError, match="increase strictly"):
        Schedule((Stage(8, 0.5), Stage(2, 0.5)))
    with pytest.raises(ValueError, match="increase strictly"):
        Schedule((Stage(2, 0.5), Stage(2, 0.5)))
    with pytest.raises(ValueError, match="smaller than the number of decoder layers"):
        himap.apply(model, Schedule((Stage(10, 0.5),)))
    for r in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            Stage(2, r)
    with pytest.raises(ValueError, match="K must be an integer >= 1"):
        Stage(0, 0.5)
    with pytest.raises(ValueError, match="unknown criterion"):
        Stage(2, 0.5, "phi_xx")
    with pytest.raises(ValueError, match="unknown method"):
        himap.apply(model, "himapp")
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        himap.apply(torch.nn.Linear(2, 2), "himap")
    with himap.pruned(model, "himap"):
        with pytest.raises(RuntimeError, match="already applied"):
            himap.apply(model, "fastv")


def test_prompt_without_image_runs_unpruned(models):
    model = models["sdpa"]
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10]])
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    with himap.pruned(model, "himap") as handle:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert not handle.stats.pruned and "no image tokens" in handle.stats.notes[0]


def test_static_cache_is_refused(models, batch):
    model = models["sdpa"]
    with himap.pruned(model, "himap"):
        with pytest.raises(TypeError, match="DynamicCache"):
            model.generate(**batch, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_inputs_embeds_only_is_refused(models, batch):
    model = models["sdpa"]
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with himap.pruned(model, "himap"):
        with pytest.raises(ValueError, match="input_ids"):
            model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])


# ----------------------------------------------------------------------------- riding on the library's forward

def test_apply_leaves_every_forward_untouched(models, batch):
    """Pruning rides on hooks and the attention interface: no forward is replaced, no class changed."""
    model = models["sdpa"]
    classes = {id(m): type(m) for m in model.modules()}
    with himap.pruned(model, "himap"):
        model(**batch)
        for m in model.modules():
            assert "forward" not in m.__dict__ and type(m) is classes[id(m)]


def test_decode_step_on_another_cache_is_refused(models, batch):
    """A decode step must continue the cache of the pruned prefill, never a stranger's."""
    from transformers import DynamicCache

    model = models["sdpa"]
    with himap.pruned(model, "himap"):
        out = model(**batch, use_cache=True)
        cache = getattr(out, _cache_kw())
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], dim=1)
        other = DynamicCache(config=model.config.text_config)
        t = batch["input_ids"].shape[1]
        for layer in range(10):  # the right total length everywhere, but not the pruned prefill's cache
            other.update(torch.zeros(2, 2, t, 16), torch.zeros(2, 2, t, 16), layer)
        with pytest.raises(RuntimeError, match="no prefill under himap filled"):
            model(input_ids=nxt, attention_mask=mask, **{_cache_kw(): other})
        model(input_ids=nxt, attention_mask=mask, **{_cache_kw(): cache})  # the right one works


def test_tampered_cache_lengths_are_detected(models, batch):
    model = models["sdpa"]
    with himap.pruned(model, "himap"):
        out = model(**batch, use_cache=True)
        cache = getattr(out, _cache_kw())
        layer = cache.layers[5]
        layer.keys, layer.values = layer.keys[:, :, 1:], layer.values[:, :, 1:]  # one token lost in layer 5
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], dim=1)
        with pytest.raises(RuntimeError, match=r"per-layer cache lengths .* differ .*transformers \d"):
            model(input_ids=nxt, attention_mask=mask, **{_cache_kw(): cache})


def _cache_kw():
    import inspect

    from transformers import LlamaModel

    from himap.prune.engine import CACHE_KEYWORDS

    return next(k for k in CACHE_KEYWORDS if k in inspect.signature(LlamaModel.forward).parameters)


def test_unknown_layout_is_refused_at_apply(models, monkeypatch):
    """A decoder layer whose forward takes keywords we do not know raises before any token."""
    from himap.prune.engine import LayoutError

    model = models["sdpa"]
    layer = model.model.language_model.layers[3]

    def forward(hidden_states, attention_mask=None, position_embeddings=None, kv_state=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(layer, "forward", forward)
    with pytest.raises(LayoutError, match=r"layer 3 .*transformers \d+\.\d+.*tested with"):
        himap.apply(model, "himap")
    assert not hasattr(model.model.language_model, "_himap_handle")


def test_labels_are_refused_while_pruning(models, batch):
    model = models["sdpa"]
    with himap.pruned(model, "himap"):
        with pytest.raises(ValueError, match="labels"):
            model(**batch, labels=batch["input_ids"])


def test_supported_range_matches_pyproject():
    """pyproject admits exactly the releases the engine claims, and the installed one is among them."""
    import pathlib
    import re

    import transformers

    from himap.prune.engine import SUPPORTED_TRANSFORMERS

    text = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    spec = re.search(r'"transformers(>=[^"]+)"', text).group(1)
    low, high = SUPPORTED_TRANSFORMERS[0], SUPPORTED_TRANSFORMERS[-1]
    major, minor = high.split(".")
    assert spec == f">={low},<{major}.{int(minor) + 1}"
    assert ".".join(transformers.__version__.split(".")[:2]) in SUPPORTED_TRANSFORMERS


def test_no_deprecation_warnings_from_pruned_generate(models, batch):
    import warnings

    model = models["sdpa"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with himap.pruned(model, "himap") as handle:
            greedy(model, batch, n=3)
    assert handle.stats.pruned


def test_each_cache_keeps_its_own_record(models, batch):
    """A prefill in between (here one without image tokens) does not lose the first cache's record:
    continuing the first cache gives exactly the uninterrupted decode."""
    model = models["sdpa"]
    kw = _cache_kw()

    def step(interleave):
        out = model(**batch, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], dim=1)
        if interleave:
            ids = torch.tensor([[1, 5, 6, 7]])
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)  # another prefill
        return model(input_ids=nxt, attention_mask=mask, **{kw: getattr(out, kw)}).logits

    with torch.no_grad(), himap.pruned(model, Schedule((Stage(2, 0.5, "phi_sh"),))):
        assert_close(step(interleave=True), step(interleave=False), rtol=0, atol=0)


def test_replay_must_fit_the_schedule(models, batch):
    model = models["sdpa"]
    schedule = Schedule((Stage(2, 0.5, "phi_sh"),))
    with himap.pruned(model, schedule) as handle:
        model(**batch)
        kept = handle.stats.kept_image_indices
    with himap.pruned(model, schedule, replay=[[k[:3] for k in kept[0]]]):  # 3 indices, the stage keeps 32
        with pytest.raises(ValueError, match="replay: stage 1"):
            model(**batch)
    with himap.pruned(model, schedule, replay=[[list(range(60, 92)) for _ in kept[0]]]):  # indices >= 64
        with pytest.raises(ValueError, match="replay: stage 1"):
            model(**batch)


def test_image_tokens_on_a_filled_cache_are_refused(models, batch):
    model = models["sdpa"]
    kw = _cache_kw()
    with himap.pruned(model, "himap"):
        ids = batch["input_ids"][:1, :3]  # BOS and system text only: no image yet
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        rest = batch["input_ids"][:1, 3:]  # the image arrives on a cache that holds tokens
        mask = torch.ones((1, batch["input_ids"].shape[1]), dtype=torch.long)
        with pytest.raises(ValueError, match="image tokens arrived on a cache"):
            model(input_ids=rest, attention_mask=mask, pixel_values=batch["pixel_values"][:1],
                  **{kw: getattr(out, kw)})


def test_a_failed_apply_leaves_nothing_attached(models, batch, monkeypatch):
    model = models["sdpa"]
    lm = model.model.language_model
    ref = model(**batch).logits

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "set_attn_implementation", fail)
    with pytest.raises(RuntimeError, match="boom"):
        himap.apply(model, "himap")
    monkeypatch.undo()
    assert not hasattr(lm, "_himap_handle") and not lm._forward_pre_hooks and not lm._forward_hooks
    assert not any(layer._forward_pre_hooks for layer in lm.layers) and not model._forward_pre_hooks
    assert_close(model(**batch).logits, ref, rtol=0, atol=0)
    with himap.pruned(model, "himap"):  # and it applies again
        model(**batch)


def test_dart_criterion_on_any_schedule_uses_its_defaults(models, batch):
    from himap.cost.flops import PromptShape, full_cost, get_arch

    schedule = Schedule((Stage(2, 0.0, "dart", keep=0.25),), name="dart-custom")
    with himap.pruned(models["sdpa"], schedule) as handle:
        models["sdpa"](**batch)
    assert [len(k) for k in handle.stats.kept_image_indices[0]] == [16, 16]
    assert full_cost(get_arch("llava-1.5-7b"), schedule, PromptShape(35, 40, 1)).ranking > 0
