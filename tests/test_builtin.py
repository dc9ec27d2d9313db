"""Training pieces of the built-in model (himap.builtin.train) and the shipped checkpoint (himap.builtin)."""

import json
import os

import pytest
import torch

from himap.builtin import synthetic as S
from himap.builtin import train as T
from himap.builtin.offline_processor import build_processor


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_batcher_matches_processor_and_chat_template(processor):
    batcher = T.Batcher(processor, S.SyntheticConfig())
    singles = [S.make_sample(i, k) for i, k in enumerate(("mc", "pope", "caption"))]
    got = batcher(singles, with_answers=False)
    ref = processor(images=[s.image() for s in singles],
                    text=[processor.apply_chat_template(
                        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.prompt}]}],
                        add_generation_prompt=True) for s in singles],
                    return_tensors="pt", padding=True)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(got[key], ref[key]), key
    # a multi-turn conversation equals the chat template's rendering of the same turns
    conv = S.make_conversation(0, 0, {"mc": 1, "pope": 1, "caption": 1}, turns=3)
    messages = []
    for t, s in enumerate(conv):
        content = ([{"type": "image"}] if t == 0 else []) + [{"type": "text", "text": s.prompt}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": s.answer}]
    text = processor.apply_chat_template(messages)
    ref = processor(images=[conv[0].image()], text=[text], return_tensors="pt")
    got = batcher([conv])
    n = got["input_ids"].shape[1]
    assert torch.equal(got["input_ids"][0], ref["input_ids"][0, :n])  # the template adds a final "\n"
    assert processor.tokenizer.decode(ref["input_ids"][0, n:]) == ""


def test_labels_cover_only_answers(processor):
    batcher = T.Batcher(processor, S.SyntheticConfig())
    conv = S.make_conversation(3, 0, {"mc": 1, "word": 1}, turns=2)
    batch = batcher([conv, [S.make_sample(0, "pope")]])
    tok = processor.tokenizer
    for b, turns in enumerate((conv, [S.make_sample(0, "pope")])):
        labelled = batch["labels"][b][batch["labels"][b] != -100].tolist()
        expected = []
        for s in turns:
            expected += tok(" " + s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labelled == expected
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_query_probe_targets(processor):
    """The answer-position probe reads, at the position that predicts each POPE yes/no, the
    value the question names and the image's value of that attribute ("none" when blank)."""
    batcher = T.Batcher(processor, S.SyntheticConfig())
    tok = processor.tokenizer
    convs = [S.make_conversation(i, 0, {"mc": 1, "pope": 2}, turns=3, pope_blank=0.3) for i in range(12)]
    batch = batcher(convs)
    b_idx, t_idx, query, image = T.query_targets(convs, batch["labels"])
    pope = [(b, s) for b, c in enumerate(convs) for s in c if s.kind == "pope"]
    assert len(b_idx) == len(pope) > 0 and any(not s.objects for _, s in pope)
    for (b, s), bi, ti, q, im in zip(pope, b_idx.tolist(), t_idx.tolist(), query.tolist(), image.tolist()):
        assert bi == b
        assert batch["labels"][b, ti] == -100 and int(batch["labels"][b, ti + 1]) == tok.convert_tokens_to_ids(s.answer)
        assert T.QUERY_VALUES[q] == s.meta["query"][0]
        expected = getattr(s.objects[0], s.meta["category"]) if s.objects else "none"
        assert T.QUERY_VALUES[im] == expected
        assert (T.QUERY_VALUES[q] == T.QUERY_VALUES[im]) == (s.answer == "yes")
    hidden = torch.zeros(len(convs), batch["labels"].shape[1], 8)
    head = torch.nn.Linear(8, 2 * len(T.QUERY_VALUES))
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    # zero logits: each of the two cross-entropies is log(number of classes)
    assert T.query_loss(head, hidden, (b_idx, t_idx, query, image)).item() == pytest.approx(2 * torch.log(torch.tensor(float(len(T.QUERY_VALUES)))).item())


def test_schedules_hand_computed():
    cfg = T.TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, copies_start=5, copies_until=0.5)
    assert T.lr_at(0, cfg) == pytest.approx(1e-4)
    assert T.lr_at(9, cfg) == pytest.approx(1e-3)
    assert T.lr_at(55, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way through the cosine
    assert T.lr_at(100, cfg) == pytest.approx(1e-4)
    assert [T.copies_at(s, cfg) for s in (0, 25, 49, 50, 99)] == [5, 3, 1, 1, 1]
    assert T.copies_at(0, T.TrainConfig(copies_start=1)) == 1


def _tiny_cfg(out_dir):
    return T.TrainConfig(out_dir=str(out_dir), steps=3, batch_size=2, eval_every=3, eval_per_kind=2, turns=2,
                         copies_start=3, copies_until=0.5, warmup_steps=1, max_minutes=0, threads=1,
                         model=T.ModelConfig(vision_hidden=16, text_hidden=32, text_intermediate=64,
                                             text_layers=9, text_heads=2, text_kv_heads=1))


def test_tiny_training_is_reproducible_and_loadable(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    a = T.train(_tiny_cfg(tmp_path / "a"), progress=False)
    b = T.train(_tiny_cfg(tmp_path / "b"), progress=False)
    assert a["history"][-1]["loss_ema"] == b["history"][-1]["loss_ema"]  # same seed, same run
    wa = AutoModelForImageTextToText.from_pretrained(tmp_path / "a" / "best")
    wb = AutoModelForImageTextToText.from_pretrained(tmp_path / "b" / "best")
    for (n, p), (_, q) in zip(wa.named_parameters(), wb.named_parameters()):
        assert torch.equal(p, q), n
    pos = wa.model.vision_tower.get_parameter("embeddings.position_embedding.weight")
    assert (pos == 0).all()  # frozen at zero
    assert wa.config.vision_feature_layer == -2 and wa.config.text_config.num_hidden_layers == 9
    proc = AutoProcessor.from_pretrained(tmp_path / "a" / "best")
    assert proc.tokenizer.image_token_id == wa.config.image_token_id
    info = json.loads((tmp_path / "a" / "best" / "training_info.json").read_text())
    assert info["config"]["steps"] == 3 and info["parameters"] == sum(p.numel() for p in wa.parameters())
    log = [json.loads(l) for l in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3] and set(log[0]["valid"]) == {"mc", "pope", "caption"}


def test_stop_at_and_second_stage(tmp_path):
    """stop_at ends a run early on the same schedule; init_from starts a second stage from its weights."""
    import dataclasses

    from transformers import AutoModelForImageTextToText

    full = T.train(_tiny_cfg(tmp_path / "full"), progress=False)
    cfg = dataclasses.replace(_tiny_cfg(tmp_path / "part"), stop_at=2, eval_every=1)
    part = T.train(cfg, progress=False)
    assert [r["step"] for r in part["history"]] == [1, 2] and part["steps"] == 2
    assert part["history"][-1]["lr"] == T.lr_at(1, cfg)  # the 3-step schedule, not a 2-step one
    stage2 = dataclasses.replace(_tiny_cfg(tmp_path / "stage2"), init_from=str(tmp_path / "full" / "last"),
                                 steps=1, eval_every=1, lr=0.0, warmup_steps=1)
    T.train(stage2, progress=False)  # lr 0: the weights must come through unchanged
    a = AutoModelForImageTextToText.from_pretrained(tmp_path / "full" / "last")
    b = AutoModelForImageTextToText.from_pretrained(tmp_path / "stage2" / "last")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    bad = dataclasses.replace(_tiny_cfg(tmp_path / "bad"), init_from=str(tmp_path / "full" / "last"),
                              model=T.ModelConfig(text_layers=9, text_hidden=16, text_intermediate=32,
                                                  vision_hidden=16, text_heads=2, text_kv_heads=1))
    with pytest.raises(ValueError, match="does not match"):
        T.train(bad, progress=False)


def test_bad_probe_layer_rejected(tmp_path):
    import dataclasses

    with pytest.raises(ValueError, match="query_aux_layer"):
        T.train(dataclasses.replace(_tiny_cfg(tmp_path), query_aux_layer=10), progress=False)


def test_too_few_layers_rejected(processor):
    with pytest.raises(ValueError, match=">= 9"):
        T.build_model(T.ModelConfig(text_layers=8), len(processor.tokenizer), 192, 16, 3, 0, 1, 2)


def test_install_writes_card(tmp_path):
    from himap.builtin import install

    T.train(_tiny_cfg(tmp_path / "run"), progress=False)
    dest = install(str(tmp_path / "run" / "best"), dest=str(tmp_path / "pkg"))
    card = open(os.path.join(dest, "README.md")).read()
    assert "LlavaForConditionalGeneration" in card and "3 steps" in card
    with pytest.raises(FileNotFoundError, match="missing"):
        install(str(tmp_path), dest=str(tmp_path / "pkg2"))


# ---- the shipped checkpoint --------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin():
    from himap.models.loading import load_model

    return load_model("builtin")


def test_shipped_files_and_size():
    from himap.builtin import MAX_BYTES, SHIPPED_FILES, model_dir

    d = model_dir()
    sizes = {f: os.path.getsize(os.path.join(d, f)) for f in SHIPPED_FILES + ("README.md",)}
    assert sum(sizes.values()) <= MAX_BYTES
    card = open(os.path.join(d, "README.md")).read()
    assert "minutes" in card and "himap train-default" in card


def test_shipped_model_architecture(builtin):
    model, processor = builtin
    cfg = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert cfg.text_config.num_hidden_layers >= 9
    v = cfg.vision_config
    assert (v.image_size // v.patch_size) ** 2 == 144
    inputs = processor(images=[S.make_sample(0, "mc").image()], text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True)],
        return_tensors="pt")
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == 144


def test_shipped_model_accuracy_on_fixed_subset(builtin):
    """Vanilla greedy accuracy on the first 24 mc and 24 pope test items (12 yes, 12 no), and
    with blank images (the image must matter: the blank-image accuracy falls towards chance)."""
    from himap.evaluation import metrics
    from himap.models.loading import generate_texts

    model, processor = builtin
    torch.set_num_threads(1)
    samples = [S.make_sample(i, k, S.TEST_SEED) for k in ("mc", "pope") for i in range(24)]
    prompts = [s.prompt for s in samples]
    preds = generate_texts(model, processor, [s.image() for s in samples], prompts, max_new_tokens=4)
    blank = generate_texts(model, processor, [s.image(blank=True) for s in samples], prompts, max_new_tokens=4)

    def correct(texts):
        out = []
        for s, t in zip(samples, texts):
            out.append(metrics.parse_letter(t, 4) == s.answer if s.kind == "mc" else metrics.parse_yes_no(t) == s.answer)
        return out

    ok, ok_blank = correct(preds), correct(blank)
    acc, acc_blank = {}, {}
    for kind in ("mc", "pope"):
        idx = [i for i, s in enumerate(samples) if s.kind == kind]
        acc[kind] = metrics.accuracy([ok[i] for i in idx])
        acc_blank[kind] = metrics.accuracy([ok_blank[i] for i in idx])
    # the shipped model answers both kinds from the image (the target: >= 90%) ...
    assert acc["mc"] >= 90.0 and acc["pope"] >= 90.0, (acc, preds)
    # ... and without the image it is back near chance (4 options: 25%; yes/no, balanced: 50%)
    assert acc_blank["mc"] <= 45.0 and acc_blank["pope"] <= 65.0, (acc_blank, blank)
