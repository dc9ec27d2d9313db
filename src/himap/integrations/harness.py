"""A harness-independent evaluation model: a himap-pruned model answering harness requests.

Harnesses (lmms-eval, himap.integrations.lmms_eval) turn their own request objects into
`Request`s and hand them to a `HarnessModel`, which
- generates (`generate`): batched, left-padded, KV-cached `model.generate` under the pruning
  schedule, stopping at the request's `until` strings, greedy unless a temperature > 0 asks for
  sampling;
- scores continuations (`loglikelihood`): the context is prefilled and pruned exactly as for
  generation (the ranking sees the context only, never the continuation), then the continuation's
  tokens are fed one by one through the same `generate` loop (each forced by a logits processor),
  so a continuation's log-probability is the one greedy decoding would have produced it with
  (is_greedy says whether it would have);
- reports, for every request, the statistics of its prefill (visual tokens entering each decoder
  layer, visual tokens kept at each stage, optionally the kept indices) and its analytic cost in
  TFLOPs (himap.cost.flops.full_cost: every matrix product of the decoder and LM head for this
  example's token counts, paper section 4.2 generalised; the paper's image-token-only count next
  to it), and keeps a tally from which `summarize` computes mean TFLOPs per example by task.

Visual inputs per request: PIL images, image paths, and one video (a video path, whose frames
himap.models.loading.load_video_frames samples, or a list of frames), as far as the model family's
processor takes them (himap.models.loading.build_inputs): a family that reads no video raises a
clear error instead of answering without it.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, fields

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpeg", ".mpg", ".gif")
"""File endings read as videos (everything else given as a path is opened as an image)."""

GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams",
                   "repetition_penalty")
"""Generation settings a request may carry; others are ignored with one warning."""


@dataclass
class HarnessArgs:
    """The model's settings (lmms-eval: `--model_args key=value,...`); defaults are himap eval's."""

    pretrained: str = "builtin"  # hub id, local model folder, or "builtin" (the shipped model)
    method: str = "himap"  # one method: a preset or an ablation name (uniform@himap, ...), as for `himap eval`
    k: list | None = None  # per-stage K overrides ("2 8"; '-' keeps a stage's value)
    ratio: list | None = None  # per-stage drop-ratio overrides ("0.5 0.75")
    criterion: list | None = None  # per-stage criterion overrides ("phi_sh phi_dp")
    attn: str = "sdpa"  # attention implementation kept by every layer: sdpa, eager, flash_attention_2
    prompt_format: str = "hf"  # "hf": the checkpoint's chat template; "llava-v1": LLaVA's vicuna_v1 conversation
    quota: str = "sample"  # a stage's keep budget per sample, or per image / video frame ("image")
    dtype: str | None = None  # fp32, bf16, fp16; default bf16 on CUDA, fp32 on CPU
    device: str | None = None  # cpu, cuda, cuda:N; default cuda when available
    batch_size: int = 1  # requests per model call (left padding)
    max_new_tokens: int = 256  # generation budget when a request's settings give none
    max_frames_num: int = 8  # frames sampled from each video file
    log_kept_indices: bool = False  # also log every stage's kept visual-token indices per sample


def _words(value, cast, name: str):
    """'2 8' / 2 / '2' / '-' -> [2, 8] / [2] / [2] / [None] (himap.cli.common.parse_overrides)."""
    from himap.cli.common import parse_overrides

    if value is None:
        return None
    values = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    return parse_overrides([str(v) for v in values], cast, name)


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def parse_args(raw: dict) -> HarnessArgs:
    """HarnessArgs from a harness's keyword arguments; unknown names and bad values raise."""
    known = {f.name for f in fields(HarnessArgs)}
    unknown = sorted(set(raw) - known - {"max_batch_size"})
    if unknown:
        raise ValueError(f"unknown model argument(s) {unknown}; himap takes {', '.join(sorted(known))}")
    args = {k: v for k, v in raw.items() if k in known and v is not None}
    size = str(args.get("batch_size", 1))
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"batch_size must be a positive integer (no 'auto'), got {size!r}")
    args["batch_size"] = int(size)
    for name, cast in (("k", int), ("ratio", float), ("criterion", str)):
        args[name] = _words(args.get(name), cast, name)
    for name in ("max_new_tokens", "max_frames_num"):
        if name in args:
            args[name] = int(args[name])
            if args[name] < 1:
                raise ValueError(f"{name} must be >= 1, got {args[name]}")
    if "log_kept_indices" in args:
        args["log_kept_indices"] = _flag(args["log_kept_indices"], "log_kept_indices")
    for name in ("pretrained", "method", "attn", "prompt_format", "quota"):
        if name in args:
            args[name] = str(args[name])
    return HarnessArgs(**args)


@dataclass
class Request:
    """One harness request."""

    context: str  # the user text (the model's chat template is applied around it)
    visuals: list = field(default_factory=list)  # PIL images, image or video paths, videos as frame lists
    key: tuple | None = None  # (task, split, doc id): requests with the same key are one example; None: not tallied
    gen_kwargs: dict | None = None  # generation settings (generate)
    continuation: str | None = None  # the text to score (loglikelihood)

    @property
    def task(self) -> str | None:
        return None if self.key is None else str(self.key[0])


@dataclass
class Answer:
    """What a request got back: a text or a (negative) log-likelihood, and its statistics."""

    text: str | None = None  # generate: the continuation, cut before the first `until` string
    nll: float | None = None  # loglikelihood: -log p(continuation | context), summed over its tokens
    is_greedy: bool | None = None  # loglikelihood: greedy decoding would produce the continuation
    input_tokens: int = 0  # prompt tokens (visual tokens included)
    output_tokens: int = 0  # generated or scored tokens
    seconds: float = 0.0  # this request's share of its batch's wall-clock time
    stats: dict = field(default_factory=dict)  # pruning statistics and cost (see sample_stats)


# ----------------------------------------------------------------------------- pure helpers

def generation_settings(gen_kwargs: dict | None, default_max_new_tokens: int) -> tuple[dict, list[str], int]:
    """(model.generate keyword arguments, until strings, max_new_tokens) from a request's settings.

    lmms-eval's convention (its llava_hf model): greedy unless temperature > 0, which samples at
    that temperature (with top_p / top_k when given); `until` is a string or a list of strings.
    """
    gk = dict(gen_kwargs or {})
    ignored = sorted(set(gk) - set(GENERATION_KEYS))
    if ignored:
        warnings.warn(f"himap ignores the generation settings {ignored}", stacklevel=3)
    until = gk.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    if not all(isinstance(u, str) for u in until):
        raise ValueError(f"until must be a string or a list of strings, got {gk.get('until')!r}")
    max_new = int(gk.get("max_new_tokens") or default_max_new_tokens)
    if int(gk.get("num_beams") or 1) != 1:
        raise ValueError(f"num_beams={gk['num_beams']} is not supported: himap decodes greedily or by sampling")
    temperature = float(gk.get("temperature") or 0.0)
    kwargs: dict = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
        for name in ("top_p", "top_k"):
            if gk.get(name) is not None:
                kwargs[name] = gk[name]
    if gk.get("repetition_penalty") is not None:
        kwargs["repetition_penalty"] = float(gk["repetition_penalty"])
    return kwargs, [u for u in until if u], max_new


def cut_at(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any of the `until` strings."""
    cut = min((i for i in (text.find(u) for u in until) if i >= 0), default=len(text))
    return text[:cut]


def plan_batches(lengths: list[int], groups: list, size: int) -> list[list[int]]:
    """Indices in batches of at most `size`: requests of one group only (same settings and
    kind), longest first inside a group (padding stays small, a memory error shows at once)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    by_group: dict = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    out = []
    for members in by_group.values():
        members.sort(key=lambda i: (-lengths[i], i))
        out += [members[j:j + size] for j in range(0, len(members), size)]
    return out


def split_visuals(visuals) -> tuple[list, list]:
    """(images, videos) of one request: a PIL image or image path is an image; a video path (see
    VIDEO_EXTENSIONS) or a list of images (its frames) is a video, read later (`read_video`)."""
    from PIL import Image

    images, videos = [], []
    for v in visuals or []:
        if v is None:
            continue
        if isinstance(v, Image.Image):
            images.append(v)
        elif isinstance(v, (str, os.PathLike)):
            (videos if str(v).lower().endswith(VIDEO_EXTENSIONS) else images).append(v)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(f, Image.Image) for f in v):
            videos.append(list(v))
        else:
            raise ValueError(f"himap cannot read a visual input of type {type(v).__name__} "
                             "(images, image or video paths and lists of frames are supported; audio is not)")
    if len(videos) > 1:
        raise ValueError(f"a request with {len(videos)} videos: himap reads one video per request")
    return images, videos


def read_video(video, max_frames: int) -> list:
    """A video's frames: sampled from its file, or the list given."""
    from himap.models.loading import load_video_frames

    return load_video_frames(video, max_frames) if isinstance(video, (str, os.PathLike)) else list(video)


def continuation_ids(tokenizer, context_text: str, continuation: str) -> list[int]:
    """The continuation's token ids as they follow the context: the tokens of context + continuation
    past the context's own (where the boundary merges, the continuation encoded alone)."""
    if not continuation:
        raise ValueError("loglikelihood needs a non-empty continuation")
    ctx = tokenizer(context_text, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context_text + continuation, add_special_tokens=False)["input_ids"]
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return whole[len(ctx):]
    return tokenizer(continuation, add_special_tokens=False)["input_ids"]


def summarize(records: list[dict]) -> dict:
    """Mean cost per example, overall and by task, from `HarnessModel.records` (all ranks').

    An example is one key (task, split, doc id); its cost is the sum over its requests (a
    multiple-choice question's choices). Returns {"examples", "tflops_per_example", ...,
    "tasks": {task: {...}}}; a mean is None when some request of the group had no cost."""
    def mean_over_examples(rows: list[dict]) -> dict:
        examples: dict = {}
        for r in rows:
            examples.setdefault(tuple(r["key"]), []).append(r)
        out = {"examples": len(examples), "requests": len(rows),
               "new_tokens": sum(r.get("new_tokens", 0) for r in rows),
               "seconds": sum(r.get("seconds", 0.0) for r in rows)}
        for name in ("tflops", "tflops_vanilla", "tflops_paper"):
            if any(r.get(name) is None for r in rows) or not examples:
                out[f"{name}_per_example"] = None
            else:
                out[f"{name}_per_example"] = sum(r[name] for r in rows) / len(examples)
        first = [group[0] for group in examples.values()]
        out["visual_tokens_per_example"] = (sum(r["visual_tokens"] for r in first) / len(first)) if first else None
        return out

    tasks = sorted({str(r["key"][0]) for r in records})
    summary = mean_over_examples(records)
    summary["tasks"] = {t: mean_over_examples([r for r in records if str(r["key"][0]) == t]) for t in tasks}
    return summary


def _has_video(request: Request) -> bool:
    return bool(split_visuals(request.visuals)[1])


def _stop_at(tokenizer, until: list[str], prompt_len: int):
    """A stopping criterion that ends a row once its generated text holds one of `until`
    (transformers' own stop_strings cannot read every tokenizer's vocabulary, e.g. word-level
    ones). It decodes only the last tokens: a string of m characters spans at most m tokens."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    window = max(len(u) for u in until) + 2

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            tail = input_ids[:, max(prompt_len, input_ids.shape[1] - window):]
            texts = tokenizer.batch_decode(tail, skip_special_tokens=True)
            return torch.tensor([any(u in t for u in until) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopAt()])


# ----------------------------------------------------------------------------- the model

class HarnessModel:
    """A model loaded with himap.models.loading and pruned by one schedule for its whole life
    (himap.apply; `close` removes it). `records` collects one row per tallied request."""

    def __init__(self, args: HarnessArgs, device: str | None = None):
        import torch

        import himap
        from himap.cli.common import model_shape, one_method
        from himap.evaluation.runner import model_arch
        from himap.models.loading import check_prompt_format, eos_ids, load_model, stop_ids
        from himap.prune.adapters import visual_token_ids
        from himap.prune.engine import QUOTAS

        check_prompt_format(args.prompt_format)
        if args.quota not in QUOTAS:
            raise ValueError(f"unknown quota {args.quota!r}; choose one of {', '.join(QUOTAS)}")
        self.args = args
        device = device or args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype or ("bf16" if str(device).startswith("cuda") else "fp32")
        self.model, self.processor = load_model(args.pretrained, attn_implementation=args.attn, dtype=dtype,
                                                device=device)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.arch = model_arch(self.model.config, name=args.pretrained)
        overrides = {"k": args.k, "ratio": args.ratio, "criterion": args.criterion}
        self.schedule = one_method(args.method, model_shape(self.arch) if self.arch is not None else None,
                                   overrides, what=f"method={args.method!r}")
        self.visual_token_ids = visual_token_ids(self.model)
        self.handle = himap.apply(self.model, self.schedule, quota=args.quota)  # vanilla too: its statistics are recorded
        self.eos_ids = eos_ids(self.model)
        self.stop_ids = stop_ids(self.model, self.tokenizer)  # where a generated answer ends
        self.records: list[dict] = []
        self._costs: dict = {}

    def close(self) -> None:
        """Detach the pruning hooks (the model is unchanged afterwards)."""
        import himap

        himap.remove(self.model)

    # ------------------------------------------------------------------ requests

    def generate(self, requests: list[Request], progress: bool = False) -> list[Answer]:
        """Answers of generation requests, in the requests' order."""
        settings = [generation_settings(r.gen_kwargs, self.args.max_new_tokens) for r in requests]
        groups = [(repr(sorted(s[0].items())), tuple(s[1]), s[2], _has_video(r)) for s, r in zip(settings, requests)]
        return self._run(requests, groups, lambda batch: self._generate_batch(batch, settings[batch[0][0]]),
                         progress, "himap generate")

    def loglikelihood(self, requests: list[Request], progress: bool = False) -> list[Answer]:
        """-log p(continuation | context) and is_greedy of each request, in the requests' order."""
        return self._run(requests, [_has_video(r) for r in requests], self._loglikelihood_batch, progress,
                         "himap loglikelihood")

    def _run(self, requests, groups, run_batch, progress: bool, desc: str) -> list[Answer]:
        from tqdm.auto import tqdm

        lengths = [len(r.context) + len(r.continuation or "") for r in requests]
        answers: list = [None] * len(requests)
        plan = plan_batches(lengths, groups, self.args.batch_size)
        with tqdm(total=len(requests), desc=desc, disable=not progress, file=sys.stderr) as bar:
            for indices in plan:
                batch = [(i, requests[i]) for i in indices]
                start = time.perf_counter()
                done = run_batch(batch)
                seconds = (time.perf_counter() - start) / len(indices)
                for i, answer in zip(indices, done):
                    answer.seconds = seconds
                    answers[i] = answer
                    self._tally(requests[i], answer)
                bar.update(len(indices))
        return answers

    def _inputs(self, batch: list, prompts: list[str]) -> dict:
        """Model inputs of a batch (its requests all have a video or none: `_has_video` groups)."""
        from himap.models.loading import build_inputs

        media = [split_visuals(r.visuals) for _, r in batch]
        images = [m[0] for m in media]
        videos = [read_video(m[1][0], self.args.max_frames_num) for m in media] if media[0][1] else None
        return build_inputs(self.processor, images, prompts, device=self.model.device, videos=videos,
                            prompt_format=self.args.prompt_format)

    def _generate_batch(self, batch, setting) -> list[Answer]:
        from himap.models.loading import answer_length, generate_ids

        kwargs, until, max_new = setting
        inputs = self._inputs(batch, [r.context for _, r in batch])
        if until:
            kwargs = {**kwargs, "stopping_criteria": _stop_at(self.tokenizer, until, inputs["input_ids"].shape[1])}
        new = generate_ids(self.model, inputs, max_new, **kwargs).cpu()  # [B, n]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        answers = []
        for b, text in enumerate(texts):
            answers.append(Answer(text=cut_at(text, until), output_tokens=answer_length(new[b].tolist(), self.stop_ids)))
        return self._with_stats(answers, inputs)

    def _loglikelihood_batch(self, batch) -> list[Answer]:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        from himap.models.loading import chat_text, in_model_dtype

        targets = []
        for _, r in batch:
            images, videos = split_visuals(r.visuals)
            text = chat_text(self.processor, r.context, n_images=len(images), video=bool(videos),
                             prompt_format=self.args.prompt_format)
            ids = continuation_ids(self.tokenizer, text, r.continuation or "")
            if any(t in self.eos_ids for t in ids[:-1]):
                raise ValueError(f"the continuation {r.continuation!r} holds an end-of-sequence token before "
                                 "its end; generation would stop there, so it cannot be scored this way")
            targets.append(ids)
        inputs = self._inputs(batch, [r.context for _, r in batch])
        steps = max(len(t) for t in targets)
        filler = self.eos_ids[0] if self.eos_ids else (self.tokenizer.pad_token_id or 0)  # ends finished rows
        forced = torch.tensor([t + [filler] * (steps - len(t)) for t in targets], device=self.model.device)
        prompt_len = inputs["input_ids"].shape[1]

        class Forced(LogitsProcessor):
            """Makes step j choose token forced[:, j] (the continuation, teacher-forced)."""

            def __call__(self, input_ids, scores):
                j = input_ids.shape[1] - prompt_len
                out = torch.full_like(scores, -math.inf)
                return out.scatter_(1, forced[:, j:j + 1], 0.0)

        with torch.no_grad():
            out = self.model.generate(**in_model_dtype(self.model, inputs), max_new_tokens=steps, min_new_tokens=0, do_sample=False,
                                      logits_processor=LogitsProcessorList([Forced()]),
                                      output_logits=True, return_dict_in_generate=True)
        logits = torch.stack(out.logits, dim=1).float()  # [B, steps, V]: raw, before any processor
        logp = torch.log_softmax(logits, dim=-1)
        answers = []
        for b, ids in enumerate(targets):
            idx = torch.tensor(ids, device=logits.device)
            lp = logp[b, torch.arange(len(ids), device=logits.device), idx]  # [c]
            greedy = bool((logits[b, :len(ids)].argmax(-1) == idx).all())
            answers.append(Answer(nll=float(-lp.sum()), is_greedy=greedy, output_tokens=len(ids)))
        return self._with_stats(answers, inputs)

    # ------------------------------------------------------------------ statistics

    def _with_stats(self, answers: list[Answer], inputs: dict) -> list[Answer]:
        from himap.prune.tokens import token_sets

        sets = token_sets(inputs["input_ids"].cpu(), self.visual_token_ids, inputs["attention_mask"].cpu())
        counts = sets.counts()
        stats = self.handle.stats
        for b, answer in enumerate(answers):
            answer.input_tokens = int(sets.valid[b].sum())
            answer.stats = self.sample_stats(stats, b, counts["system"][b], counts["image"][b],
                                             counts["instruction"][b], answer.output_tokens)
        return answers

    def sample_stats(self, stats, b: int, n_system: int, n_visual: int, n_instruction: int, new_tokens: int) -> dict:
        """One sample's pruning statistics (from the engine's PruneStats of its batch) and cost."""
        kept = [stage[b] for stage in stats.kept_image_indices] if stats is not None else []
        per_layer = stats.image_tokens_per_layer[b] if stats is not None and stats.image_tokens_per_layer else None
        out = {"method": self.schedule.name, "visual_tokens": n_visual, "visual_tokens_per_layer": per_layer,
               "kept_visual_tokens": [len(k) for k in kept], "system_tokens": n_system,
               "instruction_tokens": n_instruction, "new_tokens": new_tokens,
               **self.cost(n_system, n_visual, n_instruction, new_tokens)}
        if self.args.log_kept_indices:
            out["kept_indices"] = kept
        return out

    def cost(self, n_system: int, n_visual: int, n_instruction: int, new_tokens: int) -> dict:
        """Analytic TFLOPs of one example (himap.cost.flops): `tflops` the full decoder + LM head
        count under the schedule, `tflops_vanilla` the same unpruned, `tflops_paper` the paper's
        image-token-only convention (section 4.2). None when the model has no cost model."""
        key = (n_system, n_visual, n_instruction, new_tokens)
        if key not in self._costs:
            self._costs[key] = self._compute_cost(*key)
        return self._costs[key]

    def _compute_cost(self, n_system, n_visual, n_instruction, new_tokens) -> dict:
        from himap.cost.flops import PromptShape, full_cost, paper_flops

        none = {"tflops": None, "tflops_vanilla": None, "tflops_paper": None}
        if self.arch is None:
            return none
        shape = PromptShape(n_system, n_instruction, new_tokens, n_visual)
        try:
            return {"tflops": full_cost(self.arch, self.schedule, shape).decoder / 1e12,
                    "tflops_vanilla": full_cost(self.arch, "vanilla", shape).decoder / 1e12,
                    "tflops_paper": paper_flops(self.arch, self.schedule, n_visual) / 1e12}
        except ValueError:
            return none

    def _tally(self, request: Request, answer: Answer) -> None:
        if request.key is None:
            return
        s = answer.stats
        self.records.append({"key": list(request.key), "tflops": s.get("tflops"),
                             "tflops_vanilla": s.get("tflops_vanilla"), "tflops_paper": s.get("tflops_paper"),
                             "visual_tokens": s.get("visual_tokens", 0), "new_tokens": answer.output_tokens,
                             "seconds": answer.seconds})
