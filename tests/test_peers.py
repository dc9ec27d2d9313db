"""Peer methods on the engine (docs/peers.md): presets, selections against brute-force references
written here from each paper's definition, and the engine's guarantees (drop-nothing, cached ==
uncached, padded batch == alone, sdpa == eager, measured == analytic FLOPs)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import himap
from himap.models.testing import IMAGE_TOKEN_ID, tiny_inputs
from himap.prune.schedule import PEER_PRESETS, PRESETS, Schedule, Stage, image_tokens_per_layer, pyramid_lambda
from himap.prune.tokens import token_sets
from test_engine import _uncached_greedy, batch, greedy, models  # noqa: F401  (fixtures, the golden helpers)

PEERS = ["pdrop", "pdrop-64", "visionzip", "visionzip-192", "dart", "dart-64", "divprune", "divprune-128"]


# ----------------------------------------------------------------------------- presets

def test_presets_keep_the_published_budgets_on_llava_15():
    """Image tokens entering each of LLaVA-1.5-7B's 32 layers under each preset."""
    count = lambda name: image_tokens_per_layer(PRESETS[name], 576, 32)  # noqa: E731
    assert count("pdrop") == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8  # layer_list 8,16,24, lambda 0.5
    for b in (192, 128, 64):
        assert count(f"visionzip-{b}") == [b] * 32 and count(f"divprune-{b}") == [b] * 32
        assert count(f"dart-{b}") == [576] * 2 + [b + 4] * 30  # max_num_trunction b, plus the 4 image pivots
        pdrop = count(f"pdrop-{b}")
        assert abs(sum(pdrop) / 32 - b) < 1.0  # PyramidDrop's budget is the average over the layers
    assert count("visionzip") == count("visionzip-64") and count("dart") == count("dart-128")
    assert count("divprune") == [56] * 32  # round(0.098 * 576)
    assert round(pyramid_lambda(64 / 576, (2, 8, 16)), 2) == 0.19  # the authors' value (PyramidDrop issue #29)
    vz = PRESETS["visionzip-192"].stages[0]
    assert round(vz.option("dominant") * 576) == 162 and vz.option("merge") == "official"
    assert {s.positions for n, s in PEER_PRESETS.items() if not n.startswith("dart")} == {"contiguous"}
    assert PRESETS["dart"].positions == "original"


def test_presets_scale_to_other_depths_and_token_counts():
    """A shallower decoder gets the same fractions of its depth; budgets scale with the image tokens."""
    assert [s.k for s in PRESETS["pdrop"].for_layers(10).stages] == [3, 5, 8]
    assert [s.k for s in PRESETS["pdrop-64"].for_layers(10).stages] == [1, 3, 5]
    assert PRESETS["pdrop"].for_layers(40) is PRESETS["pdrop"]  # 13B: the published layers fit
    assert PRESETS["dart"].for_layers(10).stages[0].k == 2
    assert image_tokens_per_layer(PRESETS["visionzip-192"], 144, 10) == [48] * 10
    assert image_tokens_per_layer(PRESETS["dart-128"], 144, 10) == [144] * 2 + [33] * 8


def test_bad_peer_stages_are_refused():
    with pytest.raises(ValueError, match="K = 0"):
        Stage(0, 0.0, "phi_sh")
    with pytest.raises(ValueError, match="before the LLM"):
        Stage(2, 0.0, "visionzip", keep=0.5)
    with pytest.raises(ValueError, match="keep"):
        Stage(2, 0.5, "pdrop", keep=0.5)
    with pytest.raises(ValueError, match="takes no option"):
        Stage(2, 0.0, "dart", keep=0.5, options=(("dominant", 0.1),))
    with pytest.raises(ValueError, match="positions"):
        Schedule((), positions="shuffled")


# ----------------------------------------------------------------------------- engine guarantees

NOTHING_DROPPED = [
    Schedule((Stage(3, 0.0, "pdrop", keep=1.0), Stage(6, 0.0, "pdrop", keep=1.0)), positions="contiguous"),
    Schedule((Stage(2, 0.0, "dart", keep=1.0, options=(("pivot_image", 0.0625), ("pivot_text", 4))),)),
    Schedule((Stage(0, 0.0, "divprune", keep=1.0),), positions="contiguous"),
    Schedule((Stage(0, 0.0, "visionzip", keep=1.0, options=(("dominant", 0.5),)),), positions="contiguous"),
]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("schedule", NOTHING_DROPPED, ids=["pdrop", "dart", "divprune", "visionzip"])
def test_peer_dropping_nothing_equals_unmodified_model(models, batch, impl, schedule):
    model = models[impl]
    ref_logits, ref_tokens = model(**batch).logits, greedy(model, batch)
    with himap.pruned(model, schedule) as handle:
        assert_close(model(**batch).logits, ref_logits, rtol=0, atol=0)
        assert torch.equal(greedy(model, batch), ref_tokens)
    assert handle.stats.pruned and handle.stats.image_tokens_per_layer[0] == [64] * 10


@pytest.mark.parametrize("name", PEERS)
def test_peer_cached_generate_equals_uncached_recompute(models, batch, name):
    model = models["sdpa"]
    with himap.pruned(model, name) as handle:
        cached = greedy(model, batch, n=6)
        kept = handle.stats.kept_image_indices
    assert torch.equal(cached, _uncached_greedy(model, batch, kept, name, n=6))


@pytest.mark.parametrize("name", PEERS)
def test_peer_left_padded_batch_equals_samples_alone(models, name):
    model = models["sdpa"]
    sizes = ((5, 2, 9), (3, 11, 6))
    batch = tiny_inputs(model.config, n_system=sizes[0], n_instruction=sizes[1], seed=2)
    with himap.pruned(model, name) as handle:
        together = greedy(model, batch, n=5)
        kept_together = handle.stats.kept_image_indices
        for b in range(3):
            n = int(batch["attention_mask"][b].sum())
            alone = greedy(model, {"input_ids": batch["input_ids"][b:b + 1, -n:],
                                   "attention_mask": batch["attention_mask"][b:b + 1, -n:],
                                   "pixel_values": batch["pixel_values"][b:b + 1]}, n=5)
            assert torch.equal(alone[0, -5:], together[b, -5:]), b
            assert [s[0] for s in handle.stats.kept_image_indices] == [s[b] for s in kept_together]


@pytest.mark.parametrize("name", PEERS)
def test_peer_sdpa_and_eager_keep_the_same_tokens(models, batch, name):
    kept = {}
    for impl in ("sdpa", "eager"):
        with himap.pruned(models[impl], name) as handle:
            models[impl](**batch)
        kept[impl] = handle.stats.kept_image_indices
    assert kept["sdpa"] == kept["eager"]


@torch.no_grad()
@pytest.mark.parametrize("name", ["divprune-128", "visionzip-192", "dart-64"])
def test_peer_sequence_equals_the_shortened_sequence(models, batch, name):
    """Contiguous positions (the peers' convention) give exactly the model run on the shortened
    sequence; original positions exactly the model given the kept tokens' own position ids."""
    model = models["eager"]
    lm = model.model.language_model
    k = PRESETS[name].for_layers(10).stages[0].k
    captured = {}

    def grab(module, args, kwargs):  # the hidden states entering layer K before himap prunes them
        captured["h"] = args[0] if args else kwargs["hidden_states"]

    hook = lm.layers[k].register_forward_pre_hook(grab, with_kwargs=True)  # runs before himap's hook
    with himap.pruned(model, name) as handle:
        logits = model(**batch).logits
    hook.remove()
    kept = handle.stats.kept_image_indices[0]
    ids = batch["input_ids"]
    for b in range(ids.shape[0]):
        img = (ids[b] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
        valid = batch["attention_mask"][b].bool()
        keep = valid.clone()
        keep[img] = False
        keep[img[kept[b]]] = True
        index = keep.nonzero().squeeze(1)
        h = captured["h"][b:b + 1, index]
        if PRESETS[name].positions == "contiguous":
            pos = torch.arange(index.numel())[None] + int((~valid).sum())  # numbered on from the first token
        else:
            pos = index[None]
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(lm.config, h, torch.ones_like(index)[None].bool(), None)
        pe = lm.rotary_emb(h, position_ids=pos)
        for layer in lm.layers[k:]:
            h = layer(h, attention_mask=mask, position_embeddings=pe)
        ref = model.lm_head(lm.norm(h))[0]
        assert_close(logits[b, -index.numel():], ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- selections vs references

def _rope(x, cos, sin):
    """RoPE as Llama applies it: x * cos + rotate_half(x) * sin ([B, H, T, D], cos/sin [B, T, D])."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _heads(x, hd):
    return x.view(x.shape[0], x.shape[1], -1, hd).transpose(1, 2)  # [B, H, T, hd]


def _image_local(ids_row, present_row):
    """Local indices (among the present tokens) and image indices of the present image tokens."""
    img_pos = (ids_row == IMAGE_TOKEN_ID).nonzero().squeeze(1).tolist()
    local = [j for j, p in enumerate(present_row) if p in img_pos]
    return local, [img_pos.index(present_row[j]) for j in local]


@torch.no_grad()
def test_pdrop_matches_reference(models, batch):
    """PyramidDrop: at each stage, layer K's own attention of the last prompt token (query and key
    projections of layer K on the tokens entering it, RoPE at their contiguous positions), mean over
    heads; the floor(lambda^s * N) image tokens with the most attention stay."""
    model = models["eager"]
    lm = model.model.language_model
    sched = Schedule((Stage(2, 0.0, "pdrop", keep=0.5), Stage(5, 0.0, "pdrop", keep=0.25)), positions="contiguous")
    with himap.pruned(model, sched) as handle:
        out = model(**batch, output_hidden_states=True)
    got = handle.stats.kept_image_indices
    ids, mask = batch["input_ids"], batch["attention_mask"]
    present = [list(range(ids.shape[1])) for _ in range(ids.shape[0])]  # original indices, per sample
    for s, stage in enumerate(sched.stages):
        hs = out.hidden_states[stage.k]  # input of layer K (output of K-1), tokens present before the stage
        attn_mod = lm.layers[stage.k].self_attn
        for b in range(ids.shape[0]):
            pad = int((mask[b] == 0).sum())
            valid = [p for p in present[b] if mask[b, p]]
            h = hs[b:b + 1, -len(valid):]  # valid tokens are right-aligned
            x = lm.layers[stage.k].input_layernorm(h)
            pos = torch.arange(len(valid))[None] + pad  # contiguous from the first prompt token
            cos, sin = lm.rotary_emb(x, position_ids=pos)
            q = _rope(_heads(attn_mod.q_proj(x), attn_mod.head_dim), cos, sin)[0]  # [Hq, T, D]
            k = _rope(_heads(attn_mod.k_proj(x), attn_mod.head_dim), cos, sin)[0]  # [Hkv, T, D]
            k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
            logits = (q[:, -1:] @ k.transpose(-1, -2))[:, 0] * attn_mod.head_dim ** -0.5  # [Hq, T]
            row = torch.softmax(logits, dim=-1).mean(0)
            local, img_idx = _image_local(ids[b], valid)
            n_keep = math.floor(stage.keep * 64)
            best = sorted(range(len(local)), key=lambda j: (-float(row[local[j]]), j))[:n_keep]
            expected = sorted(img_idx[j] for j in best)
            assert got[s][b] == expected, (s, b)
            img_pos = (ids[b] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
            dropped = set(img_pos.tolist()) - {int(img_pos[i]) for i in expected}
            present[b] = [p for p in present[b] if p not in dropped]


@torch.no_grad()
def test_dart_matches_reference(models, batch):
    """DART at K=2: pivots are the 4 image and 4 instruction tokens with the largest L1 norm of
    layer 1's (post-RoPE) keys; pivots, visited in the released code's `list(set(...))` order, each
    keep the image tokens least cosine-similar to them (final-norm'd hidden states entering layer 2)."""
    model = models["eager"]
    lm = model.model.language_model
    sched = Schedule((Stage(2, 0.0, "dart", keep=20 / 64, options=(("pivot_image", 4 / 64), ("pivot_text", 4))),))
    with himap.pruned(model, sched) as handle:
        model(**batch)
    got = handle.stats.kept_image_indices[0]
    out = model(**batch, output_hidden_states=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    sets = token_sets(ids, IMAGE_TOKEN_ID, mask)
    attn_mod = lm.layers[1].self_attn
    x = lm.layers[1].input_layernorm(out.hidden_states[1])
    cos, sin = lm.rotary_emb(x, position_ids=torch.arange(ids.shape[1])[None])
    keys = _rope(_heads(attn_mod.k_proj(x), attn_mod.head_dim), cos, sin)  # [B, Hkv, T, D]
    l1 = keys.abs().sum(dim=(1, 3))  # [B, T]
    hidden = lm.norm(out.hidden_states[2])
    for b in range(ids.shape[0]):
        pad = int((mask[b] == 0).sum())
        img = sets.image[b].nonzero().squeeze(1).tolist()
        ins = sets.instruction[b].nonzero().squeeze(1).tolist()
        img_piv = sorted(img, key=lambda i: (-float(l1[b, i]), i))[:4]
        txt_piv = sorted(ins, key=lambda i: (-float(l1[b, i]), i))[:4]
        kept = set(img_piv)
        valid = [i for i in img if i not in kept]
        # the released code: `for item in list(set(image_indices + query_indices))` over unpadded indices
        order = [p + pad for p in set([i - pad for i in img_piv] + [i - pad for i in txt_piv])]
        for pivot in order:  # 16 picks over 8 pivots: 2 each
            sims = {i: float(F.cosine_similarity(hidden[b, pivot], hidden[b, i], dim=0)) for i in valid}
            picks = sorted(valid, key=lambda i: (sims[i], i))[:2]
            kept |= set(picks)
            valid = [i for i in valid if i not in picks]
        assert got[b] == sorted(img.index(i) for i in kept), b


@torch.no_grad()
def test_divprune_matches_reference(models, batch):
    """DivPrune: max-min diversity on the LLM's input embeddings of the image tokens, distance
    1 - cosine: first the token farthest from its nearest neighbour, then repeatedly the token whose
    nearest chosen token is farthest."""
    model = models["eager"]
    sched = Schedule((Stage(0, 0.0, "divprune", keep=10 / 64),), positions="contiguous")
    with himap.pruned(model, sched) as handle:
        model(**batch)
    got = handle.stats.kept_image_indices[0]
    embeds = model(**batch, output_hidden_states=True).hidden_states[0]
    ids = batch["input_ids"]
    for b in range(ids.shape[0]):
        feats = embeds[b, ids[b] == IMAGE_TOKEN_ID]
        n = feats.shape[0]
        dist = [[1 - float(F.cosine_similarity(feats[i], feats[j], dim=0)) for j in range(n)] for i in range(n)]
        chosen = [max(range(n), key=lambda j: (min(dist[i][j] for i in range(n) if i != j), -j))]
        while len(chosen) < 10:
            rest = [j for j in range(n) if j not in chosen]
            chosen.append(max(rest, key=lambda j: (min(dist[s][j] for s in chosen), -j)))
        assert got[b] == sorted(chosen), b


def test_divprune_picks_distinct_tokens_when_features_repeat():
    """Flat background gives identical features (the built-in benchmark's images): once every
    remaining token duplicates a picked one, the next unpicked token is taken, never one twice."""
    from himap.prune.peers import divprune_order

    base = torch.eye(4)  # 4 distinct directions
    feats = torch.cat([base[[0, 0, 0]], base[[1, 2]], base[[0, 3, 3]]])  # tokens 0-2, 5 equal; 6, 7 equal
    order = divprune_order(feats, 6)
    assert order[:4] == [3, 0, 4, 6]  # one token of each direction first (ties: the lower index)
    assert order[4:] == [1, 2] and divprune_order(feats, 8) == [3, 0, 4, 6, 1, 2, 5, 7]


@pytest.mark.parametrize("rule", ["official", "mean"])
@torch.no_grad()
def test_visionzip_matches_reference_and_merges_by_group(models, batch, rule):
    """VisionZip: the patches with the most [CLS] attention (feature layer of the vision encoder,
    heads summed) are dominant; of the others, every step-th is a contextual target and each other
    patch joins the target whose head-mean key is most similar; a target's feature (before the
    projector) becomes target + mean(members) (released code) or the mean of its group."""
    model = models["eager"]
    sched = Schedule((Stage(0, 0.0, "visionzip", keep=12 / 64,
                            options=(("dominant", 8 / 64), ("merge", rule))),), positions="contiguous")
    seen = {}

    def grab(module, args, output):  # the projector's input after himap's pre-hook merged it
        seen["features"] = args[0]

    hook = model.model.multi_modal_projector.register_forward_hook(grab)
    with himap.pruned(model, sched) as handle:
        model(**batch)
    hook.remove()
    got = handle.stats.kept_image_indices[0]
    tower = model.model.vision_tower
    vout = tower(batch["pixel_values"], output_hidden_states=True)
    layer = tower.encoder.layers[0]  # produces hidden state 1 = the feature layer -2 of a 2-layer tower
    x = layer.layer_norm1(vout.hidden_states[0])
    attn = layer.self_attn
    q, k = _heads(attn.q_proj(x), attn.head_dim), _heads(attn.k_proj(x), attn.head_dim)  # [n, H, T, hd]
    cls = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)) * attn.scale, dim=-1)[:, :, 0].sum(1)  # [n, T]
    metric = k.mean(1)  # [n, T, hd]
    feats = vout.hidden_states[1][:, 1:]  # the projector's input: features without [CLS]
    for i in range(feats.shape[0]):
        a, m = cls[i, 1:], metric[i, 1:]
        dominant = sorted(sorted(range(64), key=lambda j: (-float(a[j]), j))[:8])
        remaining = [j for j in range(64) if j not in dominant]
        step = len(remaining) // 4
        targets = [remaining[s] for s in range(0, len(remaining), step)][:4]
        groups = {t: [] for t in targets}
        for o in [j for j in remaining if j not in targets]:
            sims = [float(F.normalize(m[o], dim=0) @ F.normalize(m[t], dim=0)) for t in targets]
            groups[targets[sims.index(max(sims))]].append(o)
        assert got[i] == sorted(dominant + targets), i
        for t, members in groups.items():
            if rule == "official":
                expected = feats[i, t] + (feats[i, members].mean(0) if members else 0)
            else:
                expected = feats[i, [t] + members].mean(0)
            assert_close(seen["features"][i, t], expected, rtol=1e-5, atol=1e-6)
        untouched = [j for j in range(64) if j not in targets]
        assert torch.equal(seen["features"][i, untouched], feats[i, untouched])


def test_visionzip_replay_must_keep_its_own_selection(models, batch):
    model = models["sdpa"]
    with himap.pruned(model, "visionzip") as handle:
        model(**batch)
        kept = handle.stats.kept_image_indices
    other = [[[(i + 1) % 64 for i in kept[0][b]] for b in range(2)]]
    with himap.pruned(model, "visionzip", replay=other):
        with pytest.raises(ValueError, match="replay must keep"):
            model(**batch)
    with himap.pruned(model, "visionzip", replay=kept):
        model(**batch)


# ----------------------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("new_tokens", [0, 3])
def test_peer_measured_flops_match_analytic(models, name, new_tokens):
    """Every part, selection work included (decoder side, or vision side for VisionZip), equals what
    torch.utils.flop_counter measures."""
    from himap.cost.measure import compare

    model = models["sdpa"]
    inputs = tiny_inputs(model.config, n_system=(5,), n_instruction=(7,))
    r = compare(model, inputs, name, new_tokens)
    for part in ("vision", "decoder", "lm_head", "total"):
        assert r["measured"][part] == r["analytic"][part], (part, r)
    assert r["analytic"]["ranking"] > 0


def test_peer_paper_flops_by_hand():
    from himap.cost.flops import get_arch, omega, paper_flops

    a = get_arch("llava-1.5-7b")
    w = lambda n: omega(n, a.hidden, a.intermediate)  # noqa: E731
    assert paper_flops(a, "visionzip-64") == 32 * w(64)
    assert paper_flops(a, "dart-128") == 2 * w(576) + 30 * w(132)
    assert paper_flops(a, "pdrop") == 8 * (w(576) + w(288) + w(144) + w(72))
    assert paper_flops(a, "divprune") == 32 * w(56)


def test_cli_flops_lists_peers(capsys):
    import json

    from himap.cli import main

    assert main(["flops", "--arch", "llava-1.5-7b", "--method", "pdrop,visionzip-64,dart-128,divprune-64",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in out["methods"]}
    assert rows["visionzip-64"]["image_tokens_after_stages"] == [576, 64]
    assert rows["pdrop"]["image_tokens_after_stages"] == [576, 288, 144, 72]
    assert rows["visionzip-64"]["cost"]["vision_ranking"] > 0 == rows["pdrop"]["cost"]["vision_ranking"]
    assert rows["dart-128"]["cost"]["ranking"] == 2 * 8 * 576 * 4096  # 8 pivots x 576 image tokens


# ----------------------------------------------------------------------------- HiMAP at matched FLOPs, sweeps

def test_himap_matched_to_each_peer_costs_what_the_peer_costs():
    """match=PEER@himap: HiMAP's K2, R2 kept, R1 solved to the peer's paper-convention FLOPs."""
    from himap.cost.flops import get_arch, paper_flops
    from himap.evaluation.ablations import ModelShape, expand, resolve

    a = get_arch("llava-1.5-7b")
    shape = ModelShape(576, 32, cost_fn=lambda s: paper_flops(a, s))
    names = expand("match-peers@himap")
    assert len(names) == 12 and "match=visionzip-64@himap" in names
    for name in names:
        s = resolve(name, shape)
        peer = name.split("@")[0][len("match="):]
        assert abs(paper_flops(a, s) / paper_flops(a, peer) - 1) < 0.005, name
        assert s.stages[0].k == 2 and s.stages[1] == PRESETS["himap"].stages[1]
        counts = image_tokens_per_layer(s, 576, 32)
        cheaper = Schedule((Stage(2, (576 - counts[2] + 1) / 576, "phi_sh"), s.stages[1]))
        dearer = Schedule((Stage(2, (576 - counts[2] - 1) / 576, "phi_sh"), s.stages[1]))
        gap = abs(paper_flops(a, s) - paper_flops(a, peer))  # one token more or less is no closer
        assert gap <= abs(paper_flops(a, cheaper) - paper_flops(a, peer))
        assert gap <= abs(paper_flops(a, dearer) - paper_flops(a, peer))


def test_matching_that_cannot_be_reached_is_skipped_with_a_reason():
    """With the built-in model's sizes (10 layers, d=64, 144 image tokens) one full layer and one
    token in the other nine already cost more than VisionZip-64 (16 tokens in every layer)."""
    from himap.cost.flops import Arch, paper_flops
    from himap.evaluation import sweep as S
    from himap.evaluation.ablations import ModelShape, Unreachable, resolve

    a = Arch("builtin-like", hidden=64, intermediate=256, num_layers=10, num_heads=4, num_kv_heads=2, vocab=121,
             image_tokens=144)
    with pytest.raises(Unreachable, match="cannot be as cheap"):
        resolve("match=visionzip-64@himap", ModelShape(144, 10, cost_fn=lambda s: paper_flops(a, s)))
    cfg = S.parse_config({"model": "m", "tasks": ["shapes"], "methods": ["himap", "match=visionzip-64@base",
                                                                         "match=dart-64@base"]})
    skipped = []
    planned = S.plan(cfg, a, skipped)
    assert planned[0][1] == ["himap", "match=dart-64@himap"]
    assert skipped == [("shapes", "match=visionzip-64@himap", pytest.approx(skipped[0][2]))]
    with pytest.raises(ValueError, match="match=visionzip-64@himap"):
        S.plan(cfg, a)


def test_shipped_peers_config_covers_every_budget_and_keeps_shapes_optional():
    import os

    from himap.cost.flops import ARCHS
    from himap.evaluation import sweep as S

    cfg = S.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "sweep_peers.yaml"))
    planned = S.plan(cfg, ARCHS["llava-1.5-7b"])
    assert [spec.name for spec, *_ in planned] == ["scienceqa_img", "aokvqa_mc", "pope"]  # shapes: only on request
    names = set(planned[0][1])
    for family in ("pdrop", "visionzip", "dart", "divprune"):
        for b in (192, 128, 64):
            assert f"{family}-{b}" in names and f"match={family}-{b}@himap" in names
    assert {"vanilla", "fastv", "himap"} <= names
    assert [t for t in cfg.tasks if t.optional][0].name == "shapes" and cfg.threads == 1


def test_peer_groups_in_the_plot_legend():
    from himap.evaluation.sweep import ablation_group

    assert [ablation_group(n) for n in ("himap", "fastv", "pdrop-64", "visionzip", "dart-128", "divprune-64",
                                        "match=dart-64@himap", "uniform@himap")] == [
        "preset", "preset", "pdrop", "visionzip", "dart", "divprune", "matched FLOPs", "uniform"]


def test_peer_schedules_resume_and_older_files_compare_equal(tmp_path):
    """A run's meta file reads back equal (options become lists in JSON); HiMAP's stays as before."""
    from himap.evaluation.runner import check_meta, schedule_dict

    assert set(schedule_dict(PRESETS["himap"])[0]) == {"k", "ratio", "criterion", "seed", "drop_all"}
    meta = {"method": "visionzip-64", "schedule": schedule_dict(PRESETS["visionzip-64"]), "positions": "contiguous"}
    check_meta(str(tmp_path), meta, False)
    (tmp_path / "visionzip-64.jsonl").write_text('{"id": "a", "prediction": "x"}\n')
    check_meta(str(tmp_path), meta, False)  # a resume: same settings
    with pytest.raises(Exception, match="different settings"):
        check_meta(str(tmp_path), {**meta, "schedule": schedule_dict(PRESETS["visionzip-128"])}, False)


def test_generate_cli_runs_peers(shared_dir, tmp_path, capsys):
    import json
    import os

    from himap.cli import main
    from himap.models.testing import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "m", seed=3)
    image = os.path.join(shared_dir, "data", "images", "waterview.jpg")
    for name, first in (("visionzip-64", 7), ("dart-128", 64), ("divprune", 6), ("pdrop", 64)):
        assert main(["generate", "--model", model_dir, "--image", image, "--prompt", "What is it?",
                     "--method", name, "--max-new-tokens", "2", "--json"]) == 0
        stats = json.loads(capsys.readouterr().out)["stats"]
        assert stats["image_tokens_per_layer"][0][0] == first, name
