"""Task loaders on small files in the published formats (tests/fixtures, and built here) and on
the real question files when HIMAP_SHARED provides them; prompt snapshots (appendix E), and
scoring with hand-built predictions."""

import json
import os

import pytest

from himap.tasks import TASKS, DataError, get_task
from himap.tasks.base import check_images, limit_per_group, missing_images

IMAGE_TASKS = ["scienceqa_img", "aokvqa_mc", "pope", "nocaps", "flickr30k", "llava_bench", "mmvet"]


def data(shared_dir, name):
    """A benchmark's real files (HIMAP_SHARED/data/<name>)."""
    return os.path.join(shared_dir, "data", name)


def fix(fixtures_dir, name):
    """A benchmark's fixture files (tests/fixtures/<name>), in the published format."""
    return os.path.join(fixtures_dir, name)


def test_registry_lists_all_tasks_with_the_contract():
    assert set(TASKS) == set(IMAGE_TASKS) | {"shapes"}
    for name in IMAGE_TASKS:
        task = get_task(name)
        assert task.NAME == name
        for attr in ("VERSION", "METRIC", "DEFAULT_METHOD", "MAX_NEW_TOKENS", "DATA_HELP"):
            assert getattr(task, attr), (name, attr)
        assert callable(task.load) and callable(task.build_prompt) and callable(task.score)
    assert get_task("ScienceQA-img").NAME == "scienceqa_img"
    with pytest.raises(KeyError):
        get_task("vqav2")


def test_default_methods_follow_table_3():
    for name in ("scienceqa_img", "aokvqa_mc", "pope"):
        assert get_task(name).DEFAULT_METHOD == "himap"
    for name in ("nocaps", "flickr30k", "llava_bench", "mmvet"):
        assert get_task(name).DEFAULT_METHOD == "himap-caption"


# --- POPE --------------------------------------------------------------------------------------


def test_pope_fixture_files(fixtures_dir):
    pope = get_task("pope")
    root = fix(fixtures_dir, "pope")
    items = pope.load(root)
    counts = {s: sum(it.meta["split"] == s for it in items) for s in pope.SPLITS}
    assert counts == {"random": 6, "popular": 5, "adversarial": 5}
    assert [it.id for it in items[:2]] == ["10000001", "10000002"] and items[-1].id == "5"
    assert_llava_ids_agree(items, os.path.join(root, "llava_pope_test.jsonl"))
    first = pope.load(root, split="random", limit=1)[0]
    assert first.answer == "yes"
    assert first.prompt == "question: Is there a kite in the image? Please just answer yes or no."
    assert first.image == os.path.join(root, "val2014", "COCO_val2014_000000900001.jpg")


def assert_llava_ids_agree(items, llava_file, step=1):
    """Item ids and questions agree with LLaVA's question file, so its answer files score as-is."""
    with open(llava_file) as f:
        llava = {str(r["question_id"]): r for r in map(json.loads, f)}
    assert len(llava) == len(items)
    for it in items[::step]:
        row = llava[it.id]
        assert row["category"] == it.meta["split"]
        assert row["text"].split("\n")[0] == it.meta["question"]
        assert row["image"] == os.path.basename(it.image)


def test_pope_real_files(shared_dir):
    pope = get_task("pope")
    items = pope.load(data(shared_dir, "pope"))
    counts = {s: sum(it.meta["split"] == s for it in items) for s in pope.SPLITS}
    assert counts == {"random": 2910, "popular": 3000, "adversarial": 3000}
    assert len({it.id for it in items}) == 8910
    assert_llava_ids_agree(items, os.path.join(data(shared_dir, "pope"), "llava_pope_test.jsonl"), step=97)
    first = pope.load(data(shared_dir, "pope"), split="random", limit=1)[0]
    assert first.id == "10000001" and first.answer == "yes"
    assert first.prompt == "question: Is there a snowboard in the image? Please just answer yes or no."
    assert first.image.endswith(os.path.join("val2014", "COCO_val2014_000000310196.jpg"))


def test_pope_limit_spreads_over_splits(fixtures_dir):
    root = fix(fixtures_dir, "pope")
    items = get_task("pope").load(root, limit=10)
    assert len(items) == 10
    assert [it.meta["split"] for it in items] == ["random"] * 4 + ["popular"] * 4 + ["adversarial"] * 2
    assert len(get_task("pope").load(root, split="popular,adversarial", limit=3)) == 3
    with pytest.raises(DataError, match="unknown split"):
        get_task("pope").load(root, split="hard")


def test_pope_score_hand_built(fixtures_dir):
    pope = get_task("pope")
    items = pope.load(fix(fixtures_dir, "pope"), split="random,adversarial", limit=8)
    # random: first 4 labels yes, no, yes, no; adversarial likewise
    assert [it.answer for it in items] == ["yes", "no", "yes", "no"] * 2
    texts = ["Yes, there is.", "No.", "There is not a person.", "no",  # random: 3 of 4
             "Yes", "Yes", "Yes", "Yes"]  # adversarial: 2 of 4, all yes
    preds = {it.id: t for it, t in zip(items, texts)}
    out = pope.score(items, preds)
    assert out["splits"]["random"]["accuracy"] == 75.0
    assert out["splits"]["random"]["precision"] == 100.0 and out["splits"]["random"]["recall"] == 50.0
    assert out["splits"]["adversarial"]["accuracy"] == 50.0
    assert out["splits"]["adversarial"]["yes_ratio"] == 100.0
    assert out["accuracy"] == pytest.approx(62.5)
    assert out["pooled_accuracy"] == pytest.approx(62.5)
    assert out["f1"] == pytest.approx((100 * 2 / 3 + 100 * 2 / 3) / 2)
    assert out["n"] == 8 and out["missing"] == 0
    # a missing prediction is reported, not scored as wrong
    del preds[items[0].id]
    assert pope.score(items, preds)["missing"] == 1
    with pytest.raises(DataError, match="none of the"):
        pope.score(items, {"nope": "yes"})


# --- ScienceQA ---------------------------------------------------------------------------------


def test_scienceqa_fixture_file_and_prompt(fixtures_dir):
    sqa = get_task("scienceqa_img")
    root = fix(fixtures_dir, "scienceqa")
    items = sqa.load(root)
    assert [it.id for it in items] == ["2", "3", "5", "6", "7"]  # the questions with an image
    by_id = {it.id: it for it in items}
    it = by_id["2"]
    assert it.prompt == ("Which shape is drawn in the picture?\nA. circle\nB. square\n"
                         "Answer with the option's letter from the given choices directly.")
    assert it.answer == "A" and it.meta["options"] == ["circle", "square"]
    assert it.image == os.path.join(root, "images", "test", "2", "image.png")
    ctx = by_id["3"]
    assert ctx.prompt.startswith("Context: The picture shows a glass of water")
    assert ctx.meta["question"].endswith("What will happen to the water over a week?")
    assert ctx.meta["n_options"] == 3 and ctx.answer == "B"
    assert [by_id[i].meta["n_options"] for i in ("5", "6")] == [4, 5]


def test_scienceqa_real_file_and_prompt_snapshot(shared_dir):
    sqa = get_task("scienceqa_img")
    items = sqa.load(data(shared_dir, "scienceqa"))
    assert len(items) == 2017
    by_id = {it.id: it for it in items}
    it = by_id["16436"]
    assert it.prompt == ("Which material is this hat made of?\nA. wool\nB. wood\n"
                         "Answer with the option's letter from the given choices directly.")
    assert it.answer == "A" and it.meta["options"] == ["wool", "wood"]
    assert it.image.endswith(os.path.join("images", "test", "16436", "image.png"))
    ctx = by_id["5"]
    assert ctx.prompt.startswith("Context: People can use the engineering-design process")
    assert ctx.meta["n_options"] == 3 and ctx.answer == "B"
    assert all(i.answer in "ABCDE"[: i.meta["n_options"]] for i in items)


def test_scienceqa_score_llava_rule(fixtures_dir):
    sqa = get_task("scienceqa_img")
    items = sqa.load(fix(fixtures_dir, "scienceqa"), limit=5)
    golds = [it.answer for it in items]
    wrong = {"A": "B", "B": "A", "C": "A", "D": "A", "E": "A"}
    texts = [golds[0],  # right
             f"{golds[1]}. because",  # right: letter + '. '
             f"The answer is {golds[2]}.",  # right
             f"({golds[3]})",  # unparsable by LLaVA's rule, right when lenient
             wrong[golds[4]]]  # wrong
    out = sqa.score(items, {it.id: t for it, t in zip(items, texts)})
    assert out["accuracy"] == pytest.approx(60.0)
    assert out["accuracy_lenient"] == pytest.approx(80.0)
    assert out["unparsed"] == 1 and out["n"] == 5


# --- LLaVA-Bench and MM-Vet (loading; judge scoring is in test_judge.py) ----------------------


def test_llava_bench_fixture_files(fixtures_dir):
    items = get_task("llava_bench").load(fix(fixtures_dir, "llava_bench"))
    assert [it.id for it in items] == [str(i) for i in range(7)]
    cats = [it.meta["category"] for it in items]
    assert (cats.count("conv"), cats.count("detail"), cats.count("complex")) == (3, 2, 2)
    first = items[0]
    assert first.prompt == "What colour is the bicycle?" and first.answer == "The bicycle is red."
    assert first.meta["caption"] == "A red bicycle leaning against a white fence beside a flower bed."
    assert first.image == os.path.join(fix(fixtures_dir, "llava_bench"), "images", "001.jpg")


def test_llava_bench_real_files(shared_dir):
    items = get_task("llava_bench").load(data(shared_dir, "llava_bench"))
    assert len(items) == 60
    cats = [it.meta["category"] for it in items]
    assert (cats.count("conv"), cats.count("detail"), cats.count("complex")) == (17, 15, 28)
    first = items[0]
    assert first.id == "0" and first.prompt == "What is the name of this famous sight in the photo?"
    assert first.answer == "The famous sight in the photo is Diamond Head."
    assert first.meta["caption"] == "An aerial view of Diamond Head in the Hawaiian Islands."


def test_mmvet_fixture_files_and_images(fixtures_dir):
    mmvet = get_task("mmvet")
    items = mmvet.load(fix(fixtures_dir, "mmvet"))
    assert [it.id for it in items] == [f"v1_{i}" for i in range(6)]
    assert items[1].prompt == "What is the sum of the two numbers on the board?" and items[1].answer == "9"
    assert items[1].meta["capability"] == ["ocr", "math"]
    assert mmvet.canonical_id(0) == "v1_0" and mmvet.canonical_id("v1_7") == "v1_7"
    # two image files ship with the fixture (three questions use them): the rest are missing
    missing = missing_images(items)
    assert [it.id for it in missing] == ["v1_1", "v1_3", "v1_4"]
    with pytest.raises(DataError, match="3 of 6 items have no image file"):
        check_images(items)
    check_images([it for it in items if it not in missing])  # no error


def test_mmvet_real_files_and_images(shared_dir):
    mmvet = get_task("mmvet")
    items = mmvet.load(data(shared_dir, "mmvet"))
    assert len(items) == 218 and items[0].id == "v1_0"
    assert items[0].prompt == "What is x in the equation?" and items[0].answer == "-1<AND>-5"
    assert items[0].meta["capability"] == ["ocr", "math"]
    # 8 image files ship with the shared data (9 questions use them): the rest are missing
    shipped = set(os.listdir(os.path.join(data(shared_dir, "mmvet"), "images")))
    assert len(shipped) == 8
    missing = missing_images(items)
    assert len(missing) == 209
    assert all(os.path.basename(it.image) not in shipped for it in missing)
    with pytest.raises(DataError, match="209 of 218 items have no image file"):
        check_images(items)
    present = [it for it in items if it not in missing]
    check_images(present)  # no error
    assert {os.path.basename(it.image) for it in present} == shipped


def test_missing_files_explain_where_to_get_them(tmp_path, fixtures_dir):
    with pytest.raises(DataError, match="coco_pope_random.json"):
        get_task("pope").load(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        get_task("mmvet").load(str(tmp_path / "nowhere"))
    # questions load without any image; the image folder can be given explicitly
    items = get_task("pope").load(fix(fixtures_dir, "pope"), split="random", limit=2,
                                  image_dir=str(tmp_path))
    assert items[0].image == os.path.join(str(tmp_path), "COCO_val2014_000000900001.jpg")
    assert len(missing_images(items)) == 2


# --- A-OKVQA (published format, built here) -----------------------------------------------------


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path.parent)


AOKVQA_ROWS = [
    {"split": "val", "image_id": 461751, "question_id": "22jbM6gDxdaMaunuzgrsBB",
     "question": "What is in the motorcyclist's mouth?",
     "choices": ["toothpick", "food", "popsicle stick", "cigarette"],
     "correct_choice_idx": 3, "direct_answers": ["cigarette"] * 10, "difficult_direct_answer": False,
     "rationales": ["He's smoking."]},
    {"split": "val", "image_id": 81922, "question_id": "2ksJkt7hZRbTsvAbdxdmxG",
     "question": "Which number birthday is probably being celebrated?",
     "choices": ["one", "ten", "nine", "thirty"],
     "correct_choice_idx": 3, "direct_answers": ["thirty"] * 10, "difficult_direct_answer": False,
     "rationales": ["The cake says 30."]},
]


def test_aokvqa_load_prompt_and_score(tmp_path):
    aok = get_task("aokvqa_mc")
    root = _write(tmp_path / "aokvqa_v1p0_val.json", AOKVQA_ROWS)
    items = aok.load(root)
    assert [it.id for it in items] == ["22jbM6gDxdaMaunuzgrsBB", "2ksJkt7hZRbTsvAbdxdmxG"]
    assert items[0].prompt == (
        "Analyse the image and choose the best answer for the following question: What is in the "
        "motorcyclist's mouth? Options: (A) toothpick (B) food (C) popsicle stick (D) cigarette. "
        "Output the letter of the correct answer.")
    assert items[0].answer == "D"
    assert items[0].image == os.path.join(root, "val2017", "000000461751.jpg")
    out = aok.score(items, {items[0].id: "(D) cigarette", items[1].id: "B"})
    assert out["accuracy"] == 50.0 and out["accuracy_llava_rule"] == 0.0
    # the test split hides the answers: it loads, but cannot be scored
    hidden = [{k: v for k, v in r.items() if k not in ("correct_choice_idx", "direct_answers")}
              for r in AOKVQA_ROWS]
    _write(tmp_path / "aokvqa_v1p0_test.json", hidden)
    test_items = aok.load(root, split="test")
    assert test_items[0].answer is None
    with pytest.raises(DataError, match="cannot be scored"):
        aok.score(test_items, {test_items[0].id: "A"})


# --- captions (published formats, built here) ----------------------------------------------------


def test_nocaps_coco_format_and_cider(tmp_path):
    nocaps = get_task("nocaps")
    ann = {"images": [{"id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain"},
                      {"id": 1, "file_name": "00223d5c0e3d4b1e.jpg", "domain": "in-domain"},
                      {"id": 2, "file_name": "0043a4d3c6f2b2a1.jpg", "domain": "out-domain"},
                      {"id": 3, "file_name": "0067f2f2b4c4a6b3.jpg", "domain": "out-domain"}],
           "annotations": [{"image_id": 0, "id": 0, "caption": "A dog runs on the grass."},
                           {"image_id": 0, "id": 1, "caption": "A brown dog running outside."},
                           {"image_id": 1, "id": 2, "caption": "Two cats sleep on a sofa."},
                           {"image_id": 2, "id": 3, "caption": "A red fire truck on a street."},
                           {"image_id": 3, "id": 4, "caption": "A jellyfish in blue water."}]}
    root = _write(tmp_path / "nocaps_val_4500_captions.json", ann)
    items = nocaps.load(root)
    assert len(items) == 4 and items[0].id == "0"
    assert items[0].prompt == "Provide a one-sentence caption for the provided image."
    assert items[0].answer == ["A dog runs on the grass.", "A brown dog running outside."]
    assert items[0].image == os.path.join(root, "images", "0013ea2087020901.jpg")
    perfect = {"0": "A dog runs on the grass.", "1": "Two cats sleep on a sofa.",
               "2": "A red fire truck on a street.", "3": "A jellyfish in blue water."}
    out = nocaps.score(items, perfect, tokenizer="python")
    assert out["tokenizer"] == "python" and out["n"] == 4
    assert set(out["groups"]) == {"in-domain", "out-domain"}
    worse = dict(perfect, **{"0": "A cat.", "2": "Some water."})
    assert nocaps.score(items, worse, tokenizer="python")["cider"] < out["cider"]
    bad = dict(ann, annotations=ann["annotations"][:2])
    _write(tmp_path / "bad" / "nocaps_val_4500_captions.json", bad)
    with pytest.raises(DataError, match="no reference caption"):
        nocaps.load(str(tmp_path / "bad"))


def test_flickr30k_karpathy_format(tmp_path):
    flickr = get_task("flickr30k")

    def img(name, split, sents):
        return {"filename": name, "split": split, "imgid": 0,
                "sentences": [{"raw": s, "tokens": s.lower().split()} for s in sents]}

    ds = {"dataset": "flickr30k", "images": [
        img("1000092795.jpg", "train", ["Two young guys with shaggy hair look at their hands."]),
        img("1007129816.jpg", "test", ["The man with pierced ears is wearing glasses.",
                                       "A man with glasses is wearing a beer can crocheted hat."]),
        img("1009434119.jpg", "test", ["A black and white dog is running in a grassy garden."])]}
    root = _write(tmp_path / "dataset_flickr30k.json", ds)
    items = flickr.load(root)
    assert [it.id for it in items] == ["1007129816", "1009434119"]
    assert items[0].prompt == "Provide a one-sentence caption for the provided image."
    assert items[0].image == os.path.join(root, "flickr30k-images", "1007129816.jpg")
    assert len(flickr.load(root, split="train")) == 1
    with pytest.raises(DataError, match="no images in split"):
        flickr.load(root, split="val")
    preds = {"1007129816": "A man with glasses wears a crocheted hat.",
             "1009434119": "A black and white dog runs in a garden."}
    out = flickr.score(items, preds, tokenizer="python")
    assert out["cider"] > 0 and out["missing"] == 0


def test_limit_per_group_is_even():
    groups = [list(range(5)), list(range(10, 15)), list(range(20, 22))]
    assert limit_per_group(groups, 7) == [0, 1, 2, 10, 11, 12, 20]
    assert limit_per_group(groups, None) == groups[0] + groups[1] + groups[2]
    with pytest.raises(ValueError):
        limit_per_group(groups, -1)


def test_a_task_without_its_data_folder_fails_clearly(tmp_path):
    from himap.cli import main
    from himap.tasks import require_data

    for name in TASKS:
        task = get_task(name)
        if name == "shapes":
            require_data(task, None)  # generated: no folder needed
            continue
        with pytest.raises(DataError, match=f"task '{task.NAME}' needs its data folder"):
            require_data(task, None)
    assert main(["eval", "--model", "builtin", "--task", "mmvet", "--out", str(tmp_path)]) == 2


def test_a_wrong_himap_shared_is_explained(tmp_path, fixtures_dir):
    from conftest import shared_problem

    assert "is not a folder" in shared_problem(str(tmp_path / "nowhere"))
    data = tmp_path / "shared" / "data"
    for sub in ("pope", "scienceqa", "llava_bench", "mmvet"):
        (data / sub).mkdir(parents=True)
    message = shared_problem(str(data))  # the data folder itself instead of its parent
    assert "lacks data/pope/coco_pope_random.json" in message
    assert f"set HIMAP_SHARED={str(tmp_path / 'shared')!r}" in message
    # a folder laid out like the real one passes
    import shutil

    good = tmp_path / "good"
    shutil.copytree(fixtures_dir, good / "data")
    assert shared_problem(str(good)) is None
