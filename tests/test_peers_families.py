"""The peers (docs/peers.md) on every supported family's tiny model (issue 13's families): the
engine's guarantees hold (cached == uncached recompute, padded batch == each sample alone), and
what cannot be done faithfully is refused with the way out."""

import pytest
import torch

import himap
from himap.evaluation.ablations import resolve
from himap.prune.engine import LayoutError
from himap.prune.schedule import Schedule, Stage
from himap.prune.tokens import token_sets
from test_families import SAMPLES, _step_inputs, fam  # noqa: F401  (the per-family fixture)

MROPE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # multi-axis positions: no contiguous renumbering


def peer_schedules(family):
    """dart-128 as published; pdrop-128 and divprune-128 with original positions on M-RoPE decoders;
    Qwen3-VL (deepstack until layer 3) runs PyramidDrop from K = 3 (its q/k norms are recomputed)."""
    pos = "pos=original@" if family in MROPE else ""
    if family == "qwen3_vl":
        return [Schedule((Stage(3, 0.0, "pdrop", keep=0.5), Stage(6, 0.0, "pdrop", keep=0.25)), name="pdrop-k3")]
    return [resolve("dart-128"), resolve(f"{pos}pdrop-128"), resolve(f"{pos}divprune-128")]


def test_peers_cached_generate_equals_uncached_recompute(fam):
    model, batch = fam.models["sdpa"], fam.batch
    suppress = torch.tensor(fam.visual_ids)
    for schedule in peer_schedules(fam.name):
        with himap.pruned(model, schedule) as handle:
            cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
            kept = handle.stats.kept_image_indices
        n_visual = int(token_sets(batch["input_ids"], fam.visual_ids, batch["attention_mask"]).image[0].sum())
        assert handle.stats.image_tokens_per_layer[0][-1] < n_visual  # it pruned
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with himap.pruned(model, schedule, replay=kept):
            for _ in range(4):
                logits = model(**_step_inputs(batch, ids, mask), use_cache=False).logits
                nxt = logits[:, -1].index_fill(-1, suppress, float("-inf")).argmax(-1, keepdim=True)
                ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        assert torch.equal(cached, ids), schedule.name


def test_peers_left_padded_batch_equals_samples_alone(fam):
    model, batch = fam.models["sdpa"], fam.batch
    for schedule in peer_schedules(fam.name):
        with himap.pruned(model, schedule) as handle:
            together = model.generate(**batch, max_new_tokens=3, do_sample=False)
            kept_together = handle.stats.kept_image_indices
            for b in range(len(SAMPLES)):
                alone = model.generate(**fam.alone(b), max_new_tokens=3, do_sample=False)
                assert torch.equal(alone[0, -3:], together[b, -3:]), (schedule.name, b)
                assert [s[0] for s in handle.stats.kept_image_indices] == [s[b] for s in kept_together]


def test_what_a_family_cannot_run_is_refused_with_the_reason(fam):
    model, batch = fam.models["sdpa"], fam.batch
    refusal = (ValueError, "deepstack") if fam.name == "qwen3_vl" else (TypeError, "VisionZip")
    with pytest.raises(refusal[0], match=refusal[1]):  # VisionZip reads LLaVA-1.5's CLIP tower only
        himap.apply(model, "visionzip-128")
    assert not hasattr(model.model.language_model, "_himap_handle")
    if fam.name in MROPE and fam.name != "qwen3_vl":
        with himap.pruned(model, "divprune-128"):
            with pytest.raises(LayoutError, match="pos=original@divprune-128"):
                model(**batch)
    if fam.name == "qwen3_vl":
        with pytest.raises(ValueError, match="deepstack"):
            himap.apply(model, "dart-128")
