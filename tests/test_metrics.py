"""Answer parsers (LLaVA's POPE and ScienceQA rules), POPE metrics and CIDEr on hand-built cases."""

import math

import pytest

from himap.evaluation import captions, metrics

# --- POPE yes/no parsing (LLaVA's eval_pope behaviour) ----------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"),
    ("No", "no"),
    ("No.", "no"),
    ("no", "no"),
    ("No, there is no snowboard in the image.", "no"),
    ("There is not a car in the image.", "no"),
    ("Yes, there is a car. No other vehicles are visible.", "yes"),  # only the first sentence
    ("Yes, but it is not red", "no"),  # any 'not' word in the first sentence means no
    ("no, it is a truck", "no"),  # the comma is dropped before splitting
    ("NO", "yes"),  # case-sensitive words
    ("Nope", "yes"),
    ("no\nthere is none", "yes"),  # split on single spaces only: 'no\nthere' is one word
    ("Not at all", "yes"),  # 'Not' is not one of the words
    ("", "yes"),
])
def test_parse_yes_no_follows_llava(text, expected):
    assert metrics.parse_yes_no(text) == expected


def test_binary_metrics_hand_computed():
    preds = ["yes", "yes", "no", "no", "yes", "no"]
    labels = ["yes", "no", "no", "yes", "yes", "no"]
    m = metrics.binary_metrics(preds, labels)
    # TP = 2 (0, 4), FP = 1 (1), TN = 2 (2, 5), FN = 1 (3)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(100 * 4 / 6)
    assert m["precision"] == pytest.approx(100 * 2 / 3)
    assert m["recall"] == pytest.approx(100 * 2 / 3)
    assert m["f1"] == pytest.approx(100 * 2 / 3)
    assert m["yes_ratio"] == pytest.approx(50.0)


def test_binary_metrics_degenerate_and_bad_input():
    m = metrics.binary_metrics(["no", "no"], ["no", "no"])
    assert m["accuracy"] == 100.0 and m["precision"] == 0.0 and m["f1"] == 0.0
    with pytest.raises(ValueError):
        metrics.binary_metrics(["yes"], ["yes", "no"])
    with pytest.raises(ValueError):
        metrics.binary_metrics(["maybe"], ["yes"])


# --- option letters (LLaVA's eval_science_qa behaviour, and the lenient parser) ---------------


@pytest.mark.parametrize("text,n,expected", [
    ("A", 4, "A"),
    ("  C  ", 4, "C"),  # rule 1 strips
    ("  C \n", 4, None),  # '  C . ': stripped 'C .' is not a letter, and it starts with a space
    ("B. wood", 2, "B"),
    ("B\n", 2, "B"),  # becomes 'B. ' which starts with 'B. '
    ("The answer is D.", 4, "D"),
    ("I think the answer is B", 4, None),  # lower-case 'the answer is' is not LLaVA's pattern
    ("So The answer is C", 4, "C"),
    ("The answer is Apple", 4, "A"),  # LLaVA's second pattern has no word boundary
    ("A.", 4, None),  # one letter with a period is neither rule 1 nor rule 2
    ("(A)", 4, None),
    ("A) wool", 4, None),
    (" A. wool", 4, None),  # rule 2 looks at the unstripped text
    ("AB", 4, None),
    ("", 4, None),
    ("E", 4, None),  # a letter beyond the options counts as wrong
    ("C", 2, None),
    ("wool", 2, None),
])
def test_parse_letter_llava(text, n, expected):
    assert metrics.parse_letter_llava(text, n) == expected


@pytest.mark.parametrize("text,n,expected", [
    ("(A)", 4, "A"),
    ("A)", 4, "A"),
    ("B: dog", 4, "B"),
    ("[D] fish", 4, "D"),
    ("Answer: C", 4, "C"),
    ("The correct option is (B).", 4, "B"),
    ("the answer is d", 4, "D"),
    ("A.", 4, "A"),
    ("A cat is sitting on the mat", 4, None),  # an article, not an option
    ("(E)", 4, None),
    ("Nothing here", 4, None),
])
def test_parse_letter_lenient(text, n, expected):
    assert metrics.parse_letter(text, n) == expected


def test_letter_of_and_accuracy():
    assert metrics.letter_of(0) == "A" and metrics.letter_of(4) == "E"
    with pytest.raises(ValueError):
        metrics.letter_of(5)
    assert metrics.accuracy([True, False, True, True]) == 75.0
    assert metrics.accuracy([]) == 0.0
    assert math.isnan(metrics.mean([]))


# --- CIDEr -------------------------------------------------------------------------------------


def _hand_cider() -> float:
    """Two images, one reference each: 'a dog' / 'cats run'; candidates 'a dog' / 'cats eat fish'.
    N = 2 images, so every n-gram seen in one image's references (df = 1) and every unseen one
    (df clipped to 1) weighs log(2) - log(1) = log 2; the weights cancel in the cosines.
    Image 1: unigram and bigram cosines 1, no 3-/4-grams: 10 * (1 + 1 + 0 + 0) / 4 = 5.
    Image 2: unigrams {cats, eat, fish} vs {cats, run}: cos = 1 / (sqrt(3) sqrt(2)); no shared
    bigram;
    length (bigram count) 2 vs 1 gives the penalty exp(-1 / (2 * 6^2)).
    Corpus CIDEr = mean of the two, x 100."""
    img1 = 10 * (1 + 1) / 4
    img2 = 10 * (1 / math.sqrt(6)) * math.exp(-1 / 72) / 4
    return 100 * (img1 + img2) / 2


@pytest.mark.parametrize("backend", ["python", pytest.param("java", marks=pytest.mark.skipif(
    not captions.java_available(), reason="java not installed"))])
def test_cider_hand_computed(backend):
    refs = {"1": ["A dog."], "2": ["Cats, run!"]}
    cands = {"1": "a DOG", "2": "cats eat fish."}
    out = captions.cider(refs, cands, tokenizer=backend)
    assert out["tokenizer"] == backend
    assert out["cider"] == pytest.approx(_hand_cider(), rel=1e-9)
    assert out["per_item"]["1"] == pytest.approx(500.0)


def test_cider_auto_falls_back_without_java(monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    out = captions.cider({"1": ["a dog"], "2": ["cats run"]}, {"1": "a dog", "2": "cats eat fish"})
    assert out["tokenizer"] == "python"
    assert out["cider"] == pytest.approx(_hand_cider(), rel=1e-9)


def test_cider_rejects_bad_input():
    with pytest.raises(ValueError):
        captions.cider({"1": ["a"]}, {"2": "a"}, tokenizer="python")
    with pytest.raises(ValueError):
        captions.cider({}, {}, tokenizer="python")
    with pytest.raises(ValueError):
        captions.tokenize(["a"], backend="perl")


# Java PTBTokenizer (stanford-corenlp 3.4.1, -preserveLines -lowerCase) output for these captions,
# with the COCO punctuation list removed; the pure-Python fallback must give the same.
PTB_CASES = {
    "A man's dog doesn't like the \"big\" cat.": "a man 's dog does n't like the big cat",
    "Two people (a man and a woman) are sitting on a bench, eating.":
        "two people -lrb- a man and a woman -rrb- are sitting on a bench eating",
    "Children can't won't cannot I'm we're they've she'll he'd":
        "children ca n't wo n't can not i 'm we 're they 've she 'll he 'd",
    "A black-and-white photo -- very old; isn't it? yes: no":
        "a black-and-white photo very old is n't it yes no",
    "Mr. Smith's car at St. Louis e.g. today.": "mr. smith 's car at st. louis e.g. today",
    "It's 5:30 p.m. in the U.K. Ok.": "it 's 5:30 p.m. in the u.k. ok",
    "A cat.Dog sat on the mat. Then left.": "a cat.dog sat on the mat then left",
    "a 1,000 piece puzzle costs $20.50!": "a 1,000 piece puzzle costs $ 20.50",
    "A sign that says 'STOP'.": "a sign that says stop",
    "An old-fashioned clock tower at 12:00.": "an old-fashioned clock tower at 12:00",
    "gonna wanna gotta 'tis d'ye": "gon na wan na got ta 't is d'ye",
    "50% off \u201ccurly\u201d it\u2019s": "50 % off curly it 's",
    "Plan B.": "plan b.",
    "Gate A. Now": "gate a now",
    "A. B. C.": "a. b. c.",
    "Mr. Smith and Jr. Dog at the Ave. Then": "mr. smith and jr. dog at the ave. then",
    "A man at no. 5 and no.": "a man at no. 5 and no",
    "": "",
}


def test_python_tokenizer_matches_recorded_java_output():
    for sentence, expected in PTB_CASES.items():
        assert captions.tokenize_python(sentence) == expected, sentence


@pytest.mark.skipif(not captions.java_available(), reason="java not installed")
def test_python_tokenizer_matches_live_java():
    extra = ["A man riding a wave on top of a surfboard.",
             "a kitchen with a stove, a sink and a refrigerator .",
             "The cat is on the couch... sleeping.", "Two dogs play in the snow"]
    # Java reads the batch as one file and its test for a final "x." peeks at the next line;
    # a lower-case filler line between captions keeps each case independent of its neighbour.
    sentences = [line for s in list(PTB_CASES) + extra for line in (s, "and more")]
    assert captions.tokenize_java(sentences) == captions.tokenize(sentences, "python")[0]
    # the peek itself: a capitalized next line makes "b." sentence-final; the fallback follows
    assert captions.tokenize_java(["A b.", "Mr. Smith"])[0] == "a b"
    assert captions.tokenize(["A b.", "Mr. Smith"], "python")[0][0] == "a b"
    assert captions.tokenize(["A b.", "and more"], "python")[0][0] == "a b."


@pytest.mark.skipif(not captions.java_available(), reason="java not installed")
def test_cider_equals_the_coco_pipeline():
    """Our java path equals pycocoevalcap's own PTBTokenizer + Cider run, and the python
    tokenizer gives the same corpus score on these captions."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {"1": ["A man rides a wave on a surfboard.", "Surfer riding a big wave!"],
            "2": ["Two dogs play with a frisbee in the park.", "Dogs playing in the grass."],
            "3": ["A kitchen with a stove, a sink and a fridge.", "The kitchen's counter is clean."]}
    cands = {"1": "A man riding a wave on top of a surfboard.", "2": "Two dogs playing with a frisbee.",
             "3": "A kitchen with a sink."}
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in refs})
    res = tok.tokenize({i: [{"caption": cands[i]}] for i in cands})
    expected, _ = Cider().compute_score(gts, res)
    assert captions.cider(refs, cands, "java")["cider"] == pytest.approx(100 * expected, rel=1e-12)
    assert captions.cider(refs, cands, "python")["cider"] == pytest.approx(100 * expected, rel=1e-12)
