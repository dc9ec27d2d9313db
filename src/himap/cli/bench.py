"""Latency and memory benchmark of several methods, interleaved in one process.

    himap bench --arch llava-tiny-cpu --random-weights --methods vanilla,fastv,himap --reps 5
    himap bench --arch llava-1.5-7b --random-weights --device cuda --dtype bf16 --plot lat.png

Prints a table (medians with min-max, speedups to vanilla and FastV measured round by round,
the analytic FLOPs speedups, the ranking share of prefill, KV-cache size) and ends with one JSON
line holding the whole summary. `--json-out FILE` appends one line per run as it is produced.
"""

from __future__ import annotations

import json

from himap.cli.common import check_output_path, nonnegative_int, positive_int
from himap.cost.bench import BenchConfig
from himap.cost.flops import ARCHS

_DEFAULT = BenchConfig()


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--arch", choices=sorted(ARCHS), help="architecture preset (needs --random-weights)")
    src.add_argument("--model", metavar="PATH", help="model folder, hub id or 'builtin'")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights of the architecture's size (with --model: its config only)")
    parser.add_argument("--methods", default=",".join(_DEFAULT.methods),
                        help="comma-separated presets or ablation names, run round-robin")
    from himap.cli.common import add_override_arguments

    add_override_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="weights dtype (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"),
                        help="decoder attention implementation (kept while pruning)")
    parser.add_argument("--reps", type=positive_int, default=_DEFAULT.reps, help="measured rounds")
    parser.add_argument("--warmup", type=nonnegative_int, default=_DEFAULT.warmup, help="unmeasured rounds first")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, metavar=("SYSTEM", "INSTRUCTION"),
                        default=(_DEFAULT.n_system, _DEFAULT.n_instruction),
                        help="text tokens before (BOS included) and after the image (default: LLaVA-1.5's counts "
                             "in the official llava-v1 format; its hf chat template has 5 before the image)")
    parser.add_argument("--uncached", action="store_true",
                        help="also run every method as the official HiMAP code generates (no KV cache: each new "
                             "token re-runs the whole sequence and ranks again), labelled METHOD/nocache")
    parser.add_argument("--new-tokens", type=positive_int, default=_DEFAULT.new_tokens, help="generated tokens per example")
    parser.add_argument("--batch-size", type=positive_int, default=_DEFAULT.batch_size, help="examples per call")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=_DEFAULT.seed, help="seed of weights, ids and pixels")
    parser.add_argument("--plot", metavar="FILE", help="write latency against analytic FLOPs (PNG/PDF)")
    parser.add_argument("--json-out", metavar="FILE", help="append one JSON line per run and the summary")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _load(args):
    import torch

    from himap.cli.flops import load_arch
    from himap.cost.bench import disable_eos, random_model

    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    if args.arch and not args.random_weights:
        raise ValueError("--arch builds a model from sizes only: add --random-weights")
    if args.random_weights:  # sizes from the preset, or from the model's config alone
        arch = load_arch(args.arch, args.model)
        return random_model(arch, args.device, dtype, args.attn, args.seed), arch.name
    from himap.models.loading import load_model

    model, _ = load_model(args.model, args.attn, dtype, args.device)
    disable_eos(model)  # every method must generate the same number of tokens
    torch.manual_seed(args.seed)
    return model, args.model


def main(args) -> int:
    from himap.cli.common import set_threads
    from himap.cli.flops import resolve_methods
    from himap.cost.bench import format_summary, plot, run_benchmark
    from himap.cost.flops import Arch
    from himap.models.loading import check_attn_implementation, check_device

    set_threads(args.threads)
    config = BenchConfig(methods=tuple(args.methods.split(",")), reps=args.reps, warmup=args.warmup,
                         n_system=args.prompt_tokens[0], n_instruction=args.prompt_tokens[1],
                         new_tokens=args.new_tokens, batch_size=args.batch_size, seed=args.seed,
                         uncached=args.uncached)
    check_attn_implementation(args.attn, check_device(args.device))
    check_output_path(args.plot, "--plot")
    check_output_path(args.json_out, "--json-out")
    model, name = _load(args)
    config.methods = tuple(resolve_methods(args.methods, Arch.from_config(model.config), args, with_vanilla=False))
    summary = run_benchmark(model, config, args.json_out, progress=not args.no_progress, arch_name=name)
    print(format_summary(summary))
    if args.plot:
        plot(summary, args.plot)
        print(f"plot written to {args.plot}")
    print(json.dumps(summary))
    return 0
