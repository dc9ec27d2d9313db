"""CIDEr for the captioning tasks (paper section 5 "Image Captioning": NoCaps, Flickr30k).

Scores come from pycocoevalcap's CIDEr-D scorer (`pip install himap[captions]`), on captions
tokenized the way the COCO caption evaluation does: Stanford's PTBTokenizer (Java,
`-preserveLines -lowerCase`), then the tokens in PUNCTUATIONS are dropped. When `java` is not
on PATH a pure-Python tokenizer (`tokenize_python`) stands in for it. It reproduces the Java
output on ordinary captions, checked case by case against the jar (tests/test_metrics.py):
lower-casing, clitics ("does n't", "man 's", "ca n't", "can not"), brackets as -lrb-, split
punctuation, sentence-final periods versus initials and known abbreviations ("plan b.",
"mr. smith", "u.s."), including Java's habit of peeking at the next caption to decide whether a
trailing "b." ends a sentence. Rare inputs (an ellipsis glued to a one-letter word, abbreviations
outside its list) can differ, so every result says which tokenizer was used.

Note the COCO tool's quirk kept here: with -lowerCase, brackets come out as "-lrb-", which the
(upper-case) punctuation list does not remove, so they stay as tokens.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

# Tokens the COCO caption evaluation removes after PTB tokenization (exact, case-sensitive).
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                "-", "--", "...", ";"}

# Abbreviations the PTB tokenizer keeps whole with their period inside a line (at its end the
# period splits off: "no." -> "no .").
ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "prof.", "jr.", "sr.", "mt.", "ft.", "ave.",
                 "vs.", "etc.", "inc.", "co.", "corp.", "ltd.", "jan.", "feb.", "aug.", "sept.",
                 "oct.", "nov.", "dec.", "no."}
_LETTER_DOTS = re.compile(r"^(?:[a-z]\.){2,}$")  # u.s. e.g. p.m.: always whole
_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "wanna": "wan na", "gotta": "got ta",
                "'tis": "'t is", "'twas": "'t was"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_UNICODE = {"\u201c": " `` ", "\u201d": " '' ", "\u2018": " ` ", "\u2019": "'", "\u2014": " -- ",
            "\u2013": " -- "}


def java_available() -> bool:
    """True when a `java` executable is on PATH (the COCO PTB tokenizer needs it)."""
    return shutil.which("java") is not None


def _jar() -> str:
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    except ImportError as err:
        raise ImportError("CIDEr needs pycocoevalcap: pip install 'himap[captions]'") from err
    return os.path.join(os.path.dirname(ptb.__file__), ptb.STANFORD_CORENLP_3_4_1_JAR)


def _split_token(tok: str, following: str | None, end_of_line: bool = False) -> list[str]:
    """PTB rules for one whitespace-separated, lower-cased token (quotes, brackets and
    , ; ? ! already split off by tokenize_python); following: the next token in its original
    case (for the line's last token: the next line's first, or None), which decides whether a
    period ends a sentence."""
    next_upper = following is not None and re.match(r"[A-Z][a-z]", following) is not None
    if tok in _SPLIT_WORDS:
        return _SPLIT_WORDS[tok].split()
    head: list[str] = []
    while len(tok) > 1 and tok[0] in "'`" and tok not in _SPLIT_WORDS:  # opening single quote
        head.append("`")
        tok = tok[1:]
    tail: list[str] = []
    while len(tok) > 1:
        if tok[-1] == "'" and not tok.endswith("n't"):  # closing single quote
            tail.insert(0, "'")
            tok = tok[:-1]
        elif tok[-1] == ":":
            tail.insert(0, ":")
            tok = tok[:-1]
        elif tok.endswith(".."):  # "dots.." -> dots . .
            n = len(tok) - len(tok.rstrip("."))
            tail = ["."] * n + tail
            tok = tok[:-n]
        elif tok[-1] == ".":
            base = tok[:-1]
            if _LETTER_DOTS.match(tok):  # u.s. e.g.
                break
            if tok in ABBREVIATIONS and not end_of_line:  # "mr. smith", "no. 5"
                break
            if len(base) == 1 and base.isalpha() and not next_upper:
                break  # an initial ("plan b.", "a. b. c."), unless a capitalized word follows
            tail.insert(0, ".")
            tok = base
        else:
            break
    if tok in _SPLIT_WORDS:
        return head + _SPLIT_WORDS[tok].split() + tail
    m = re.fullmatch(r"(\d[\d.,]*)%", tok)
    if m:
        return head + [m.group(1), "%"] + tail
    if tok.endswith("n't") and len(tok) > 3:
        return head + [tok[:-3], "n't"] + tail
    for clitic in _CLITICS:
        if tok.endswith(clitic) and len(tok) > len(clitic):
            return head + [tok[: -len(clitic)], clitic] + tail
    return head + ([tok] if tok else []) + tail


def tokenize_python(sentence: str, next_line: str | None = None) -> str:
    """One caption tokenized as the COCO evaluation does (PTB rules, lower-case, punctuation
    tokens removed), in pure Python. The Java tokenizer reads all captions as one file and its
    sentence-final test for a trailing "x." looks at the next line, hence `next_line` (the
    caption after this one in the batch). See the module docstring for its limits."""
    text = sentence.replace("\n", " ").replace("\r", " ")
    for ch, rep in _UNICODE.items():
        text = text.replace(ch, rep)
    for ch, rep in _BRACKETS.items():
        text = text.replace(ch, f" {rep} ")
    text = re.sub(r"--+", " -- ", text)
    text = re.sub(r"(?<=\S)\"", " '' ", text)  # closing double quote
    text = text.replace('"', " `` ")  # the rest open
    text = re.sub(r"([;?!])", r" \1 ", text)
    text = re.sub(r",(?!\d)|(?<!\d),", " , ", text)  # keep 1,000
    text = re.sub(r"\$(?=\S)", "$ ", text)
    raw = text.split()
    peek = (next_line or "").split()[:1]  # the next caption's first word, as Java sees it
    tokens: list[str] = []
    for i, tok in enumerate(raw):
        following = (raw[i + 1:i + 2] or peek or [None])[0]
        tokens.extend(_split_token(tok.lower(), following, end_of_line=i + 1 == len(raw)))
    return " ".join(t for t in tokens if t and t not in PUNCTUATIONS)


def tokenize_java(sentences: list[str]) -> list[str]:
    """Captions tokenized by the COCO tool's Stanford PTBTokenizer (needs java), punctuation
    removed, in input order."""
    if not sentences:
        return []
    lines = [s.replace("\n", " ").replace("\r", " ") for s in sentences]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        proc = subprocess.run(["java", "-cp", _jar(), "edu.stanford.nlp.process.PTBTokenizer",
                               "-preserveLines", "-lowerCase", path],
                              capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    out = proc.stdout.decode("utf-8").split("\n")
    if len(out) < len(lines):
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)
            for line in out[: len(lines)]]


def tokenize(sentences: list[str], backend: str = "auto") -> tuple[list[str], str]:
    """(tokenized captions, backend used): backend "java", "python", or "auto" (java when on
    PATH, else python)."""
    if backend == "auto":
        backend = "java" if java_available() else "python"
    if backend == "java":
        return tokenize_java(sentences), "java"
    if backend == "python":
        nxt = sentences[1:] + [None]
        return [tokenize_python(s, n) for s, n in zip(sentences, nxt)], "python"
    raise ValueError(f"unknown tokenizer backend {backend!r}; use auto, java or python")


def cider(references: dict[str, list[str]], candidates: dict[str, str],
          tokenizer: str = "auto") -> dict:
    """CIDEr-D (Vedantam et al. 2015, COCO evaluation code) of candidate captions against their
    references, over the ids of `candidates` (each must have references). Returns
    {"cider": corpus score x 100, "per_item": {id: score x 100}, "tokenizer": backend}.
    The document frequencies come from the references of the scored ids, so a subset is scored
    as its own corpus (as the official per-domain NoCaps numbers are)."""
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError as err:
        raise ImportError("CIDEr needs pycocoevalcap: pip install 'himap[captions]'") from err
    ids = list(candidates)
    if not ids:
        raise ValueError("no candidate captions to score")
    lacking = [i for i in ids if not references.get(i)]
    if lacking:
        raise ValueError(f"{len(lacking)} candidates have no reference captions (e.g. {lacking[:3]})")
    # references and candidates are tokenized in two batches, as the COCO evaluation does
    ref_tokens, used = tokenize([r for i in ids for r in references[i]], tokenizer)
    cand_tokens, _ = tokenize([candidates[i] for i in ids], used)
    res = {i: [cand_tokens[k]] for k, i in enumerate(ids)}
    gts, pos = {}, 0
    for i in ids:
        gts[i] = ref_tokens[pos: pos + len(references[i])]
        pos += len(references[i])
    corpus, per_item = Cider().compute_score(gts, res)
    return {"cider": 100.0 * float(corpus),
            "per_item": {i: 100.0 * float(s) for i, s in zip(ids, per_item)},
            "tokenizer": used}


def score_items(items, predictions: dict[str, str], tokenizer: str = "auto",
                group_key: str | None = None) -> dict:
    """CIDEr of the predictions for task items whose `answer` is the list of reference
    captions: {"cider", "n", "missing", "tokenizer"} and, with group_key, {"groups": {value:
    CIDEr of that subset}} (e.g. NoCaps domains, each scored as its own corpus)."""
    have = [it for it in items if it.id in predictions]
    if not have:
        sample = list(predictions)[:3]
        raise ValueError(f"none of the {len(items)} items has a prediction (prediction ids look "
                         f"like {sample}); wrong task, split or id scheme?")
    refs = {it.id: list(it.answer) for it in have}
    cands = {it.id: predictions[it.id] for it in have}
    result = cider(refs, cands, tokenizer)
    out = {"cider": result["cider"], "n": len(have), "missing": len(items) - len(have),
           "tokenizer": result["tokenizer"]}
    if group_key:
        groups: dict[str, list[str]] = {}
        for it in have:
            groups.setdefault(str(it.meta.get(group_key)), []).append(it.id)
        out["groups"] = {g: cider({i: refs[i] for i in ids}, {i: cands[i] for i in ids},
                                  result["tokenizer"])["cider"]
                         for g, ids in sorted(groups.items())}
    return out
