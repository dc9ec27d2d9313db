"""A GPT-4-class judge behind an OpenAI-compatible endpoint, for the open-ended benchmarks
(paper section 5 "Open-ended Question Answering": LLaVA-Bench and MM-Vet, graded by GPT-4o).

    judge = Judge(JudgeConfig(base_url="https://api.openai.com/v1", model="gpt-4o"))
    text = judge.complete([{"role": "user", "content": "..."}], temperature=0.0, max_tokens=3)

Requests are POST {base_url}/chat/completions with {"model", "messages", "temperature",
"max_tokens"} and a Bearer key read from the environment variable named by api_key_env (no
header when it is unset, for local servers). Transient failures (connection errors, timeouts,
HTTP 408/409/429/5xx) are retried with exponential backoff, each retry announced on stderr (an
unreachable endpoint costs about a minute before the error); other HTTP errors raise at once.
Every answer is appended to a JSONL cache keyed by the SHA-256 of (model, messages,
temperature, max_tokens), so rerunning a scoring pays only for prompts not graded before.
Standard library only (urllib), so nothing heavy is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from himap.tasks.base import DataError

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class JudgeConfig:
    """Where and how to ask the judge."""

    base_url: str  # OpenAI-compatible API root, e.g. https://api.openai.com/v1
    model: str  # judge model name, e.g. gpt-4o (the paper's judge) or gpt-4-0613 (MM-Vet's)
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key
    cache_path: str | None = None  # JSONL cache of graded prompts; None keeps no cache
    retries: int = 5  # further attempts after a transient failure
    backoff_s: float = 2.0  # first wait; doubles after each failed attempt
    max_backoff_s: float = 60.0  # cap on one wait
    timeout_s: float = 120.0  # per request


class JudgeError(RuntimeError):
    """The judge endpoint refused or kept failing."""


class JudgeNotConfigured(DataError):
    """A judge-scored task was scored without judge settings."""


def cache_key(model: str, messages: list[dict], temperature: float, max_tokens: int) -> str:
    """SHA-256 of the request's content (model, messages, temperature, max_tokens)."""
    blob = json.dumps([model, messages, float(temperature), int(max_tokens)], sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class Judge:
    """Chat-completions client with retries and a persistent answer cache."""

    def __init__(self, config: JudgeConfig, sleep=time.sleep, log=None):
        if not config.base_url or not config.model:
            raise JudgeNotConfigured("a judge needs a base URL and a model name")
        self.config = config
        self.sleep = sleep  # injectable for tests
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.requests = 0  # HTTP requests sent (retries included)
        self.cache_hits = 0
        self._cache: dict[str, str] = {}
        if config.cache_path and os.path.exists(config.cache_path):
            with open(config.cache_path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a line cut by an interrupted run
                        self._cache[row["key"]] = row["response"]

    def complete(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 1024) -> str:
        """The judge's reply text, from the cache when this exact request was made before."""
        key = cache_key(self.config.model, messages, temperature, max_tokens)
        if key in self._cache:
            self.cache_hits += 1
            return self._cache[key]
        text = self._post(messages, temperature, max_tokens)
        self._cache[key] = text
        if self.config.cache_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.config.cache_path)), exist_ok=True)
            with open(self.config.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "model": self.config.model, "response": text},
                                   ensure_ascii=False) + "\n")
        return text

    def _post(self, messages: list[dict], temperature: float, max_tokens: int) -> str:
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        body = json.dumps({"model": self.config.model, "messages": messages,
                           "temperature": temperature, "max_tokens": max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last = ""
        for attempt in range(self.config.retries + 1):
            if attempt:
                wait = min(self.config.backoff_s * 2 ** (attempt - 1), self.config.max_backoff_s)
                self.log(f"judge: {url} failed ({last[:200]}); retry {attempt} of {self.config.retries} "
                         f"in {wait:g} s")
                self.sleep(wait)
            self.requests += 1
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:500]
                if err.code not in RETRY_STATUS:
                    hint = (f" (is ${self.config.api_key_env} set?)" if err.code in (401, 403) else "")
                    raise JudgeError(f"judge endpoint {url} answered HTTP {err.code}{hint}: "
                                     f"{detail}") from err
                last = f"HTTP {err.code}: {detail}"
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as err:
                last = f"{type(err).__name__}: {err}"
                continue
            try:
                return payload["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError) as err:
                raise JudgeError(f"judge endpoint {url} sent no choices[0].message.content: "
                                 f"{json.dumps(payload)[:300]}") from err
        raise JudgeError(f"judge endpoint {url} failed {self.config.retries + 1} times; last: {last}")


def from_kwargs(kw: dict) -> Judge | None:
    """A Judge from score() keyword arguments: `judge` (a Judge) or judge_base_url,
    judge_model, judge_api_key_env, judge_cache. None when neither is given."""
    if kw.get("judge") is not None:
        return kw["judge"]
    if not kw.get("judge_base_url") and not kw.get("judge_model"):
        return None
    if not kw.get("judge_base_url") or not kw.get("judge_model"):
        raise JudgeNotConfigured("give both --judge-base-url and --judge-model")
    return Judge(JudgeConfig(base_url=kw["judge_base_url"], model=kw["judge_model"],
                             api_key_env=kw.get("judge_api_key_env") or "OPENAI_API_KEY",
                             cache_path=kw.get("judge_cache")))


def require(kw: dict, task: str) -> Judge:
    """The judge for a judge-scored task, or JudgeNotConfigured explaining how to give one."""
    judge = from_kwargs(kw)
    if judge is None:
        raise JudgeNotConfigured(
            f"{task} is scored by an LLM judge: pass --judge-base-url URL --judge-model NAME "
            "(key in $OPENAI_API_KEY or --judge-api-key-env), e.g. `himap score --task "
            f"{task} ... --judge-base-url https://api.openai.com/v1 --judge-model gpt-4o`")
    return judge
