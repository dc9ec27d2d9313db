"""The synthetic benchmark generator and its eval task (himap.builtin.synthetic, himap.tasks.shapes)."""

import collections

import numpy as np
import pytest

from himap.builtin import synthetic as S


def test_deterministic_and_seed_dependent():
    a = S.make_sample(5, "mc", seed=3)
    b = S.make_sample(5, "mc", seed=3)
    assert a == b
    assert np.array_equal(np.asarray(a.image()), np.asarray(b.image()))
    others = [S.make_sample(5, "mc", seed=4), S.make_sample(6, "mc", seed=3)]
    assert all(o.objects != a.objects for o in others)
    stream1, stream2 = S.mixed_stream(0, {"mc": 1, "pope": 1}), S.mixed_stream(0, {"mc": 1, "pope": 1})
    assert [next(stream1).id for _ in range(20)] == [next(stream2).id for _ in range(20)]


RICH = S.SyntheticConfig(max_objects=3, pope_query="pair", mc_options="shuffled",
                         colours=("red", "green", "blue", "yellow", "white", "black"))
"""The harder variant (several objects, colour-shape pairs, shuffled options), also supported."""


def test_default_benchmark():
    cfg = S.SyntheticConfig()
    assert (cfg.grid, cfg.min_objects, cfg.max_objects, cfg.mc_options, cfg.pope_query) == (12, 1, 1, "shuffled", "attribute")
    s = S.make_sample(0, "mc")
    assert len(s.objects) == 1


def test_scene_constraints():
    for i in range(100):
        s = S.make_sample(i, "caption", seed=0, config=RICH)
        assert 1 <= len(s.objects) <= 3
        assert len({o.colour for o in s.objects}) == len({o.shape for o in s.objects}) == len(s.objects)
        assert len({o.cell for o in s.objects}) == len(s.objects)
        assert [o.cell for o in s.objects] == sorted(o.cell for o in s.objects)  # reading order
        assert all(0 <= r < RICH.grid and 0 <= c < RICH.grid for r, c in (o.cell for o in s.objects))
    assert {len(S.make_sample(i, "caption", seed=0, config=RICH).objects) for i in range(100)} == {1, 2, 3}


def test_each_object_stays_inside_its_patch():
    """Every non-background pixel lies in a cell listed by informative_tokens (one token per object)."""
    cfg = RICH
    for i in range(30):
        s = S.make_sample(i, "pope", seed=1, config=cfg)
        img = np.asarray(s.image(cfg)).astype(int)
        changed = (img != np.array(cfg.background)).any(-1)  # [H, W]
        cells = changed.reshape(cfg.grid, cfg.patch_size, cfg.grid, cfg.patch_size).any(axis=(1, 3))
        assert sorted(np.flatnonzero(cells).tolist()) == sorted(S.informative_tokens(s, cfg))
        for o in s.objects:  # the object's colour is drawn
            r, c = o.cell
            patch = img[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16]
            assert (patch == np.array(S.COLOURS[o.colour])).all(-1).sum() >= 30
    blank = np.asarray(S.make_sample(0, "mc").image(blank=True))
    assert (blank == np.array(cfg.background)).all()


def test_copies_curriculum():
    conv = S.make_conversation(3, 0, {"word": 1}, turns=2, copies=5)
    assert len(conv[0].objects) == 1 and len(conv[0].copies) == 4
    assert all((c.colour, c.shape) == (conv[0].objects[0].colour, conv[0].objects[0].shape) for c in conv[0].copies)
    assert len(set(S.informative_tokens(conv[0]))) == 5
    assert conv[1].copies == conv[0].copies and conv[1].objects == conv[0].objects  # one image per conversation


def test_training_aids():
    """Blank POPE conversations (all "no"), never-drawn attributes, and flipped twins."""
    convs = [S.make_conversation(i, 0, {"pope": 1}, 3, pope_blank=0.5, pope_unseen=1.0) for i in range(40)]
    blank = [c for c in convs if not c[0].objects]
    assert 5 < len(blank) < 35 and all(s.answer == "no" and s.kind == "pope" for c in blank for s in c)
    never = set(S.UNSEEN_SHAPES) | {"white", "black", "purple", "orange", "gray"}
    for c in convs:
        for s in c:
            if s.objects and s.answer == "no":
                assert s.meta["query"][0] in never  # pope_unseen=1: every negative names a never-drawn value
    for i in range(20):
        a = S.make_conversation(i, 0, {"pope": 1}, 1)
        b = S.make_conversation(i, 0, {"pope": 1}, 1, flip_pope=True)
        assert a[0].objects == b[0].objects and a[0].meta["category"] == b[0].meta["category"]
        assert {a[0].answer, b[0].answer} == {"yes", "no"}
    for i in range(20):  # exact twins: the same kinds, and every POPE answer flipped
        mix = {"pope": 0.6, "mc": 0.4}
        a = S.make_conversation(i, 0, mix, 4, pope_unseen=0.3, twin_draws=True)
        b = S.make_conversation(i, 0, mix, 4, pope_unseen=0.3, flip_pope=True, twin_draws=True)
        assert [s.kind for s in a] == [s.kind for s in b]
        for x, y in zip(a, b):
            assert (x.answer != y.answer) if x.kind == "pope" else (x.prompt, x.answer) == (y.prompt, y.answer)


def _check_mc(mc):
    gold = mc.meta["options"]["ABCD".index(mc.answer)]
    assert gold == mc.meta["target"] and len(set(mc.meta["options"])) == 4
    if mc.meta["category"] == "colour":
        shape = mc.prompt.split("What color is the ")[1].split("?")[0]
        assert [o.colour for o in mc.objects if o.shape == shape] == [gold]
    else:
        colour = mc.prompt.split("What shape is the ")[1].split(" object?")[0]
        assert [o.shape for o in mc.objects if o.colour == colour] == [gold]
    assert mc.prompt.endswith("Options: " + S.options_text(mc.meta["options"]) + ". " + S.MC_SUFFIX)


def test_answers_are_correct_for_the_scene():
    for i in range(60):
        _check_mc(S.make_sample(i, "mc"))
        _check_mc(S.make_sample(i, "mc", config=RICH))
        fixed = S.make_sample(i, "mc", config=S.SyntheticConfig(mc_options="fixed"))
        _check_mc(fixed)
        canonical = ["red", "green", "blue", "yellow"] if fixed.meta["category"] == "colour" else list(S.SHAPES)
        assert fixed.meta["options"] == canonical  # fixed option order
        shuffled = S.make_sample(i, "mc")  # the default: the same four values, the gold letter cycling
        assert sorted(shuffled.meta["options"]) == sorted(canonical) and shuffled.answer == "ABCD"[i % 4]
        pope = S.make_sample(i, "pope")
        (value,) = pope.meta["query"]
        present = value in {o.colour for o in pope.objects} | {o.shape for o in pope.objects}
        assert pope.answer == ("yes" if present else "no")
        what = f"a {value}" if pope.meta["category"] == "shape" else f"a {value} object"
        assert pope.prompt == f"question: Is there {what} in the image? Please just answer yes or no."
        pope = S.make_sample(i, "pope", config=RICH)
        colour, shape = pope.meta["query"]
        present = (colour, shape) in {(o.colour, o.shape) for o in pope.objects}
        assert pope.answer == ("yes" if present else "no")
        if pope.meta["category"] == "adversarial":
            assert colour in {o.colour for o in pope.objects} and shape in {o.shape for o in pope.objects}
        assert pope.prompt == f"question: Is there a {colour} {shape} in the image? Please just answer yes or no."


def test_balanced_answers():
    mc = collections.Counter(S.make_sample(i, "mc", config=RICH).answer for i in range(200))
    pope = collections.Counter(S.make_sample(i, "pope").answer for i in range(200))
    assert mc == {"A": 50, "B": 50, "C": 50, "D": 50}  # shuffled options: gold letter cycles
    assert pope == {"yes": 100, "no": 100}
    fixed = collections.Counter(S.make_sample(i, "mc", config=S.SyntheticConfig(mc_options="fixed")).answer
                                for i in range(200))
    assert set(fixed) == set("ABCD") and max(fixed.values()) <= 70  # fixed options: near uniform
    conv = collections.Counter(s.answer for i in range(300) for s in S.make_conversation(i, 0, {"pope": 1}, 3))
    assert 0.4 < conv["yes"] / 900 < 0.6  # random slots in conversations


def test_caption_text():
    o = [S.ShapeObject("red", "circle", (0, 0), (0, 0)), S.ShapeObject("blue", "square", (0, 3), (0, 0)),
         S.ShapeObject("green", "cross", (5, 1), (0, 0))]
    assert S.caption(o[:1]) == "a red circle."
    assert S.caption(o[:2]) == "a red circle and a blue square."
    assert S.caption(o) == "a red circle, a blue square and a green cross."


def test_vocabulary_covers_the_benchmark():
    from himap.builtin.offline_processor import UNK, build_tokenizer

    tok = build_tokenizer()
    unk = tok.convert_tokens_to_ids(UNK)
    for kind in S.KINDS:
        for i in range(40):
            s = S.make_sample(i, kind, config=RICH if i % 2 else S.SyntheticConfig())
            assert unk not in tok(s.prompt + " " + s.answer, add_special_tokens=False)["input_ids"], s


def test_bad_config_and_kind():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        S.SyntheticConfig(image_size=100)
    with pytest.raises(ValueError, match="fit inside"):
        S.SyntheticConfig(object_size=16, jitter=1)
    with pytest.raises(ValueError, match="colours must be"):
        S.SyntheticConfig(colours=("red", "purple"))
    with pytest.raises(ValueError, match="mc_options"):
        S.SyntheticConfig(mc_options="sorted")
    with pytest.raises(ValueError, match="unknown kind"):
        S.make_sample(0, "count")


# ---- the eval task -----------------------------------------------------------------------------

def test_task_load_renders_images_once(tmp_path):
    from himap.tasks import get_task

    task = get_task("shapes")
    items = task.load(str(tmp_path), limit=6)
    assert [it.meta["split"] for it in items] == ["mc", "mc", "pope", "pope", "caption", "caption"]
    assert items[0].id == "mc-2-0" and items[0].prompt == S.make_sample(0, "mc", S.TEST_SEED).prompt
    assert all(it.image.startswith(str(tmp_path)) for it in items)
    from PIL import Image

    with Image.open(items[2].image) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(S.make_sample(0, "pope").image()))
    mtime = (tmp_path / "mc-2-0.png").stat().st_mtime_ns
    again = task.load(str(tmp_path), split="mc", limit=2)
    assert [it.id for it in again] == ["mc-2-0", "mc-2-1"]
    assert (tmp_path / "mc-2-0.png").stat().st_mtime_ns == mtime  # not rewritten
    assert len(task.load(str(tmp_path), split="pope", limit=3)) == 3


def test_task_default_cache_dir(tmp_path, monkeypatch):
    from himap.tasks import shapes

    monkeypatch.setenv("HIMAP_CACHE", str(tmp_path))
    items = shapes.load(None, split="pope", limit=1)
    assert items[0].image == str(tmp_path / f"shapes-v1-{shapes.config_key()}" / "pope-2-0.png")


def test_cache_is_keyed_by_scene_parameters(monkeypatch):
    """Images rendered under other scene parameters are never reused (stale cache bug)."""
    from himap.builtin import synthetic
    from himap.tasks import shapes

    key = shapes.config_key()
    monkeypatch.setattr(synthetic, "SyntheticConfig", _Other)
    assert shapes.config_key() != key


class _Other:
    def __repr__(self):
        return "SyntheticConfig(max_objects=3)"


def test_task_score_hand_computed(tmp_path):
    from himap.tasks import shapes

    items = shapes.load(str(tmp_path), limit=12)  # 4 mc, 4 pope, 4 caption
    preds = {}
    mc = [it for it in items if it.meta["split"] == "mc"]
    preds.update({mc[0].id: mc[0].answer, mc[1].id: f"({mc[1].answer})", mc[2].id: "E", mc[3].id: "zebra"})
    pope = [it for it in items if it.meta["split"] == "pope"]  # answers yes, no, yes, no
    assert [it.answer for it in pope] == ["yes", "no", "yes", "no"]
    preds.update({pope[0].id: "yes", pope[1].id: "yes", pope[2].id: "Yes", pope[3].id: "no"})
    caps = [it for it in items if it.meta["split"] == "caption"]
    preds[caps[0].id] = caps[0].answer[0]
    preds[caps[1].id] = "nothing here."
    result = shapes.score(items, preds)
    assert result["splits"]["mc"]["accuracy"] == 50.0
    assert result["splits"]["pope"]["accuracy"] == 75.0 and result["splits"]["pope"]["yes_ratio"] == 75.0
    assert result["accuracy"] == pytest.approx(62.5)
    assert result["splits"]["caption"]["n"] == 2 and result["splits"]["caption"]["exact_match"] == 50.0
    assert result["splits"]["caption"]["object_f1"] == 50.0
    assert result["missing"] == 2


def test_object_f1():
    from himap.tasks.shapes import object_f1

    ref = "a red circle, a blue square and a green cross."
    assert object_f1(ref, ref) == 100.0
    assert object_f1("a red circle.", ref) == pytest.approx(100 * 2 * 1 * (1 / 3) / (1 + 1 / 3))
    assert object_f1("a red square.", ref) == 0.0
