"""lmms-eval model `himap`: any lmms-eval task, with any himap method, without forking lmms-eval.

    pip install -e ".[lmms-eval]" torch==2.13.0      # see docs/lmms-eval.md for a CPU machine
    lmms-eval --model himap --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=himap \\
        --tasks mme,pope --batch_size 8 --log_samples --output_path runs/lmms
    lmms-eval --model himap --model_args pretrained=builtin,method=himap,k=2 8,ratio=0.5 0.75 ...
    accelerate launch --num_processes 8 -m lmms_eval --model himap ...   # one process per GPU

lmms-eval finds the model through the `lmms_eval.models` entry point that pyproject.toml declares
(himap.integrations.lmms_eval_manifest); nothing in lmms-eval is changed. The work is done by
himap.integrations.harness.HarnessModel; this module translates lmms-eval's requests and results:

- generate_until: batched greedy (or sampled, temperature > 0) generation until the request's
  `until` strings or max_new_tokens; the visuals come from the task's doc_to_visual.
- loglikelihood (multiple_choice tasks): lmms-eval's convention, shared by its own llava models,
  is that the first number is a loss (its multiple-choice scoring takes the argmin), so it gets
  -log p(continuation | context) summed over the continuation's tokens, and is_greedy.
- Every result is a GenerationResult whose token_counts (input and output tokens, which
  lmms-eval's efficiency summary reads) carry a "himap" entry with the sample's pruning
  statistics and TFLOPs; with --log_samples they appear in each sample's `token_counts`.
  (lmms-eval 0.7.3 turns any result that is not a string or a GenerationResult into its string,
  which breaks a plain (loss, is_greedy) pair; wrapped in a GenerationResult it passes unchanged.)
- At the end of the run (`clean`, called once on every rank) the ranks' tallies are gathered and
  the mean TFLOPs per example, overall and per task, are handed to lmms-eval's `log_metrics`,
  so the results file holds them under "throughput" (avg_himap_tflops_per_example, ...) next to
  the scores, and the log prints a table of them.
"""

from __future__ import annotations

from dataclasses import dataclass

try:
    from lmms_eval.api.instance import GenerationResult, TokenCounts
    from lmms_eval.api.model import lmms
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError(
        "himap's lmms-eval model needs lmms-eval: pip install -e \".[lmms-eval]\" (or "
        "pip install \"himap[lmms-eval]\") in the same command as torch==<your torch version>, so pip "
        "keeps your torch build; see docs/lmms-eval.md") from err

from himap.integrations.harness import HarnessModel, Request, parse_args, summarize

SUMMARY_PREFIX = "himap_"
"""Keys of this model's entries in lmms-eval's throughput summary (lmms-eval prefixes avg_)."""


@dataclass
class PruningTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts plus the request's pruning statistics and cost."""

    himap: dict | None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.himap is not None:
            out["himap"] = self.himap
        return out


def _is_padding(instance) -> bool:
    """lmms-eval pads ranks with copies of a request so every rank runs as many; those copies are
    marked and must not count as examples."""
    return bool((getattr(instance, "metadata", None) or {}).get("__padding_only__"))


class HimapLmms(lmms):
    """The `himap` model of lmms-eval (a simple model: prompts come from doc_to_text, images from
    doc_to_visual, and the model's own chat template is applied around them)."""

    is_simple = True

    def __init__(self, **kwargs) -> None:
        super().__init__()
        import torch
        from accelerate import Accelerator

        args = parse_args(kwargs)
        accelerator = Accelerator()
        device = args.device
        if accelerator.num_processes > 1:  # accelerate launch: one process per device
            device = str(accelerator.device) if torch.cuda.is_available() else "cpu"
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        self.accelerator = accelerator
        self.core = HarnessModel(args, device=device)
        self.batch_size_per_gpu = args.batch_size

    @property
    def model(self):
        return self.core.model

    @property
    def device(self):
        return self.core.model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def chat_template(self):
        """Read by lmms-eval only under --apply_chat_template, which would wrap the prompt in a
        second template: himap applies the model's own chat template to every request already."""
        raise ValueError("--apply_chat_template: himap applies the model's chat template itself "
                         "(prompt_format=hf or llava-v1); run without it")

    # ------------------------------------------------------------------ requests

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _request(self, instance, **extra) -> Request:
        args = instance.args
        key = None if _is_padding(instance) else (
            instance.task_name, (instance.metadata or {}).get("split"), instance.doc_id)
        if len(args) < 6:  # ("", choice): the unconditional requests of acc_mutual_info
            return Request(context=args[0], key=key, **extra)
        doc_to_visual, doc_id, task, split = args[2], args[3], args[4], args[5]
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        return Request(context=args[0], visuals=list(visuals or []), key=key, **extra)

    def generate_until(self, requests) -> list:
        reqs = [self._request(r, gen_kwargs=r.args[1]) for r in requests]
        answers = self.core.generate(reqs, progress=self.rank == 0)
        return [GenerationResult(text=a.text, token_counts=self._counts(a)) for a in answers]

    def loglikelihood(self, requests) -> list:
        reqs = []
        for r in requests:
            continuation = r.args[1]
            if callable(continuation):  # output_type loglikelihood: doc_to_target
                continuation = continuation(self._doc(r.args[4], r.args[5], r.args[3]))
            reqs.append(self._request(r, continuation=str(continuation)))
        answers = self.core.loglikelihood(reqs, progress=self.rank == 0)
        # a GenerationResult carries the pair through lmms-eval unchanged (see the module docstring)
        return [GenerationResult(text=(a.nll, a.is_greedy), token_counts=self._counts(a)) for a in answers]

    def generate_until_multi_round(self, requests) -> list:
        raise NotImplementedError("himap's lmms-eval model does not run multi-round tasks yet")

    @staticmethod
    def _counts(answer) -> PruningTokenCounts:
        return PruningTokenCounts(input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
                                  himap=answer.stats)

    # ------------------------------------------------------------------ end of the run

    def clean(self):
        """Called by lmms-eval once on every rank after the last request: report the cost summary
        (gathered over ranks) to lmms-eval's metrics log, detach the pruning, free the model."""
        summary = summarize(_gather(self.core.records))
        if summary["examples"]:
            _report(summary, self.core.schedule.name)
        self.core.close()
        super().clean()
        return summary


def _gather(records: list[dict]) -> list[dict]:
    """Every rank's records (all ranks reach `clean` together, so the collective is safe)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    return [r for part in gathered for r in part]


def _report(summary: dict, method: str) -> None:
    """Mean TFLOPs per example into lmms-eval's throughput summary, and a table into its log."""
    from loguru import logger
    from lmms_eval.models.model_utils.gen_metrics import log_metrics

    extra = {f"{SUMMARY_PREFIX}examples": summary["examples"]}
    for name in ("tflops", "tflops_vanilla", "tflops_paper", "visual_tokens"):
        if summary.get(f"{name}_per_example") is not None:
            extra[f"{SUMMARY_PREFIX}{name}_per_example"] = summary[f"{name}_per_example"]
        for task, part in summary["tasks"].items():
            if task and part.get(f"{name}_per_example") is not None:
                extra[f"{SUMMARY_PREFIX}{name}_per_example/{task}"] = part[f"{name}_per_example"]
    extra[f"{SUMMARY_PREFIX}requests"] = summary["requests"]
    seconds, tokens = summary["seconds"], summary["new_tokens"]
    log_metrics(total_elapsed_time=seconds, total_gen_tokens=tokens,
                avg_speed=tokens / seconds if seconds > 0 else 0.0, additional_metrics=extra)
    rows = [f"| {task or '(unconditional)'} | {part['examples']} | {_fmt(part['tflops_per_example'])} | "
            f"{_fmt(part['tflops_vanilla_per_example'])} | {_fmt(part['tflops_paper_per_example'])} |"
            for task, part in summary["tasks"].items()]
    logger.info(f"himap ({method}): mean analytic TFLOPs per example (decoder and LM head; paper: image tokens only)\n"
                "| task | examples | TFLOPs | TFLOPs unpruned | TFLOPs (paper) |\n|---|---|---|---|---|\n"
                + "\n".join(rows))


def _fmt(value) -> str:
    return "unavailable" if value is None else f"{value:.4g}"


def main(argv=None) -> int:
    """`python -m himap.integrations.lmms_eval export-shapes DIR`: the built-in benchmark as the
    local files the example tasks in examples/lmms_eval read (DIR = examples/lmms_eval/data)."""
    import argparse

    from himap.tasks import shapes

    parser = argparse.ArgumentParser(prog="python -m himap.integrations.lmms_eval")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export-shapes", help="write the shapes test items (images + shapes.jsonl) to DIR")
    export.add_argument("dest", help="folder to write (examples/lmms_eval/data for the example tasks)")
    export.add_argument("--split", default="mc,pope", help="splits, comma-separated (default mc,pope)")
    export.add_argument("--limit", type=int, default=None,
                        help="items in total, spread over the splits as `himap eval --limit` does (default: all)")
    args = parser.parse_args(argv)
    path = shapes.export(args.dest, split=args.split, limit=args.limit)
    with open(path, encoding="utf-8") as f:
        n = sum(1 for _ in f)
    print(f"wrote {n} items to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
