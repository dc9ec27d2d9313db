"""The judge client against a local chat-completions server: request format, key, retries with
backoff, cache; LLaVA-Bench and MM-Vet grading protocols end to end."""

import json
import os

import pytest
from judge_server import FakeJudgeServer

from himap.evaluation.judge import (
    Judge,
    JudgeConfig,
    JudgeError,
    JudgeNotConfigured,
    cache_key,
)
from himap.tasks import get_task


def ok(text):
    return lambda body: (200, text)


def make_judge(server, tmp_path=None, sleeps=None, **kw):
    cache = str(tmp_path / "cache.jsonl") if tmp_path is not None else None
    cfg = JudgeConfig(base_url=server.url, model="judge-x", cache_path=cache, **kw)
    return Judge(cfg, sleep=(sleeps.append if sleeps is not None else (lambda s: None)))


def test_request_format_and_key(monkeypatch):
    monkeypatch.setenv("HIMAP_TEST_JUDGE_KEY", "sk-test-123")
    with FakeJudgeServer(ok("7 8")) as server:
        judge = make_judge(server, api_key_env="HIMAP_TEST_JUDGE_KEY")
        msgs = [{"role": "user", "content": "grade this"}]
        assert judge.complete(msgs, temperature=0.2, max_tokens=5) == "7 8"
        req = server.requests[0]
        assert req["path"] == "/v1/chat/completions"
        assert req["body"] == {"model": "judge-x", "messages": msgs, "temperature": 0.2, "max_tokens": 5}
        assert req["headers"]["Authorization"] == "Bearer sk-test-123"
        monkeypatch.delenv("HIMAP_TEST_JUDGE_KEY")
        judge.complete([{"role": "user", "content": "another"}])
        assert "Authorization" not in server.requests[1]["headers"]


def test_retries_with_backoff_then_succeeds():
    calls = []

    def flaky(body):
        calls.append(1)
        return (503, "overloaded") if len(calls) <= 2 else (200, "0.5")

    sleeps = []
    with FakeJudgeServer(flaky) as server:
        judge = make_judge(server, sleeps=sleeps, backoff_s=2.0)
        assert judge.complete([{"role": "user", "content": "q"}]) == "0.5"
    assert len(calls) == 3 and judge.requests == 3
    assert sleeps == [2.0, 4.0]


def test_gives_up_after_retries_and_fails_fast_on_auth(capsys):
    with FakeJudgeServer(lambda body: (429, "rate limited")) as server:
        judge = make_judge(server, retries=2)
        with pytest.raises(JudgeError, match="failed 3 times"):
            judge.complete([{"role": "user", "content": "q"}])
        assert len(server.requests) == 3
    # each retry is announced (an unreachable judge is not a silent minute)
    err = capsys.readouterr().err.splitlines()
    detail = json.dumps({"error": {"message": "rate limited"}})
    assert err == [f"judge: {server.url}/chat/completions failed (HTTP 429: {detail}); retry {i} of 2 in {2 ** i:g} s"
                   for i in (1, 2)]
    with FakeJudgeServer(lambda body: (401, "bad key")) as server:
        judge = make_judge(server, api_key_env="HIMAP_TEST_NO_SUCH_KEY")
        with pytest.raises(JudgeError, match=r"HTTP 401 \(is \$HIMAP_TEST_NO_SUCH_KEY set\?\)"):
            judge.complete([{"role": "user", "content": "q"}])
        assert len(server.requests) == 1


def test_cache_means_a_rerun_pays_nothing(tmp_path):
    msgs = [{"role": "user", "content": "grade"}]
    with FakeJudgeServer(ok("9 9")) as server:
        make_judge(server, tmp_path).complete(msgs, 0.0, 3)
        again = make_judge(server, tmp_path)
        assert again.complete(msgs, 0.0, 3) == "9 9"
        assert len(server.requests) == 1 and again.cache_hits == 1 and again.requests == 0
        again.complete(msgs, 0.5, 3)  # another temperature is another request
        assert len(server.requests) == 2
    assert cache_key("a", msgs, 0.0, 3) != cache_key("b", msgs, 0.0, 3)
    with open(tmp_path / "cache.jsonl") as f:
        assert len(f.readlines()) == 2


def test_judge_tasks_need_a_judge(fixtures_dir):
    bench = get_task("llava_bench")
    items = bench.load(os.path.join(fixtures_dir, "llava_bench"), limit=1)
    with pytest.raises(JudgeNotConfigured, match="--judge-base-url"):
        bench.score(items, {"0": "Red."})
    with pytest.raises(JudgeNotConfigured, match="both"):
        bench.score(items, {"0": "Red."}, judge_base_url="http://x")


# --- LLaVA-Bench protocol ------------------------------------------------------------------------


def test_llava_bench_review_protocol_and_relative_scores(fixtures_dir, tmp_path):
    bench = get_task("llava_bench")
    items = bench.load(os.path.join(fixtures_dir, "llava_bench"), limit=6)
    cats = {it.id: it.meta["category"] for it in items}
    assert sorted(set(cats.values())) == ["complex", "conv", "detail"]
    replies = {"conv": "8 6\nAssistant 2 is less precise.", "detail": "10,5\nShort.",
               "complex": "6 9\nBetter reasoning."}

    def reply(body):
        content = body["messages"][1]["content"]
        cid = content.split("[Assistant 2]\n")[1].split("\n")[0].removeprefix("answer-")
        if cid == "3":
            return 200, "Assistant 1: 8, Assistant 2: 7"  # not two numbers: a judge failure
        return 200, replies[cats[cid]]

    preds = {it.id: f"answer-{it.id}" for it in items}
    with FakeJudgeServer(reply) as server:
        out = bench.score(items, preds, judge_base_url=server.url, judge_model="gpt-4o",
                          judge_cache=str(tmp_path / "c.jsonl"), quiet=True)
        body = server.requests[0]["body"]
        assert body["temperature"] == 0.2 and body["max_tokens"] == 1024
        assert body["messages"][0] == {"role": "system", "content": "You are a helpful and precise "
                                       "assistant for checking the quality of the answer."}
        assert body["messages"][1]["content"] == (
            "[Context]\nA red bicycle leaning against a white fence beside a flower bed.\n\n"
            "[Question]\nWhat colour is the bicycle?\n\n"
            "[Assistant 1]\nThe bicycle is red.\n\n[End of Assistant 1]\n\n"
            "[Assistant 2]\nanswer-0\n\n[End of Assistant 2]\n\n"
            "[System]\nWe would like to request your feedback on the performance of two AI assistants "
            "in response to the user question displayed above. The user asks the question on observing "
            "an image. For your reference, the visual content in the image is represented with a few "
            "sentences describing the image. \nPlease rate the helpfulness, relevance, accuracy, level "
            "of details of their responses. Each assistant receives an overall score on a scale of 1 to "
            "10, where a higher score indicates better overall performance.\nPlease first output a "
            "single line containing only two values indicating the scores for Assistant 1 and 2, "
            "respectively. The two scores are separated by a space.\nIn the subsequent line, please "
            "provide a comprehensive explanation of your evaluation, avoiding any potential bias and "
            "ensuring that the order in which the responses were presented does not affect your "
            "judgment.\n\n")
        n_requests = len(server.requests)
        again = bench.score(items, preds, judge_base_url=server.url, judge_model="gpt-4o",
                            judge_cache=str(tmp_path / "c.jsonl"), quiet=True)
        assert len(server.requests) == n_requests  # all cached
    scored = [cats[i] for i in cats if i != "3"]
    pairs = [{"conv": (8, 6), "detail": (10, 5), "complex": (6, 9)}[c] for c in scored]
    expected_all = 100 * (sum(p[1] for p in pairs) / len(pairs)) / (sum(p[0] for p in pairs) / len(pairs))
    assert out["judge_failures"] == 1 and out["n"] == 6
    assert out["judge_score"] == pytest.approx(expected_all)
    assert out["categories"]["conv"] == pytest.approx(75.0)
    assert out["categories"]["detail"] == pytest.approx(50.0)
    assert out["categories"]["complex"] == pytest.approx(150.0)
    assert again == out


def test_parse_review_follows_llava():
    parse = get_task("llava_bench").parse_review
    assert parse("8 7\nok") == (8.0, 7.0)
    assert parse("8,7") == (8.0, 7.0)
    assert parse("8.5 9") == (8.5, 9.0)
    assert parse("8, 7") is None  # ', ' -> two spaces -> three parts (LLaVA's rule)
    assert parse("Scores: 8 7") is None
    assert parse("") is None


# --- MM-Vet protocol ---------------------------------------------------------------------------


def test_mmvet_grader_protocol_and_scores(fixtures_dir, tmp_path):
    mmvet = get_task("mmvet")
    items = mmvet.load(os.path.join(fixtures_dir, "mmvet"), limit=4)
    preds = {items[0].id: "PRED_GOOD", items[1].id: "PRED_HALF", items[2].id: "PRED_RETRY",
             items[3].id: "PRED_BAD"}

    def reply(body):
        msg = body["messages"][0]["content"]
        retry = msg.endswith(mmvet.RETRY_SUFFIX)
        pred = msg.removesuffix(mmvet.RETRY_SUFFIX).split("\n")[-1].split(" | ")[2]
        return 200, {"PRED_GOOD": "1.0", "PRED_HALF": "0.5 partially",
                     "PRED_RETRY": "0.7" if retry else "Correctness:", "PRED_BAD": "n/a"}[pred]

    with FakeJudgeServer(reply) as server:
        out = mmvet.score(items, preds, judge_base_url=server.url, judge_model="gpt-4-0613",
                          judge_cache=str(tmp_path / "c.jsonl"), quiet=True)
        first = server.requests[0]["body"]
        assert first["temperature"] == 0.0 and first["max_tokens"] == 3
        assert len(first["messages"]) == 1 and first["messages"][0]["role"] == "user"
        assert first["messages"][0]["content"] == (
            mmvet.GRADER_PROMPT + "\nWhat number is written on the door? | 12 <OR> twelve | PRED_GOOD | ")
        assert first["messages"][0]["content"].startswith(
            "Compare the ground truth and prediction from AI models, to give a correctness score")
        bad = [r["body"] for r in server.requests
               if " | PRED_BAD | " in r["body"]["messages"][0]["content"]]
        # MM-Vet's retry loop: the plain prompt, then four retries with the suffix at rising temperature
        assert [b["temperature"] for b in bad] == [0.0, 0.0, 0.5, 1.0, 1.5]
        assert [b["messages"][0]["content"].endswith(mmvet.RETRY_SUFFIX) for b in bad] == [False] + [True] * 4
        assert len(server.requests) == 1 + 1 + 2 + 5
    grades = [1.0, 0.5, 0.7, 0.0]
    assert out["judge_score"] == pytest.approx(100 * sum(grades) / 4)
    assert out["judge_retried"] == 2
    caps = {}
    for it, g in zip(items, grades):
        for c in it.meta["capability"]:
            caps.setdefault(c, []).append(g)
    assert out["capabilities"] == pytest.approx({c: 100 * sum(v) / len(v) for c, v in caps.items()})


def test_mmvet_parse_grade():
    parse = get_task("mmvet").parse_grade
    assert parse("0.3") == 0.3 and parse("1.0 totally right") == 1.0 and parse("0") == 0.0
    assert parse("1.5") is None and parse("-0.1") is None and parse("Correctness: 0.4") is None
