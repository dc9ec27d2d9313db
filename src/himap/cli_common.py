"""Flags shared by several commands: the pruning method with per-stage overrides, and model
loading. One source of truth: defaults come from himap.schedule.PRESETS."""

from __future__ import annotations

import argparse

from himap.schedule import CRITERIA, PRESETS, Schedule, get_schedule, with_overrides


def add_method_arguments(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    """--method plus --k / --ratio / --criterion overriding stage 1, 2, ... of the preset."""
    names = ", ".join(PRESETS)
    if multiple:
        parser.add_argument("--methods", default="vanilla,fastv,himap",
                            help=f"comma-separated presets ({names})")
    else:
        parser.add_argument("--method", default="himap", help=f"preset name ({names})")
    parser.add_argument("--k", type=int, nargs="+", metavar="K",
                        help="override the stages' layers K (K1 [K2 ...]); layer K-1 ranks")
    parser.add_argument("--ratio", type=float, nargs="+", metavar="R",
                        help="override the stages' drop ratios R in [0, 1) (R1 [R2 ...])")
    parser.add_argument("--criterion", nargs="+", choices=CRITERIA, metavar="PHI",
                        help=f"override the stages' criteria ({', '.join(CRITERIA)})")


def method_from_args(args: argparse.Namespace, name: str | None = None) -> Schedule:
    """The schedule named by --method (or `name`) with the stage overrides applied."""
    schedule = get_schedule(name or args.method)
    overridden = with_overrides(schedule, args.k, args.ratio, args.criterion)
    if overridden != schedule:
        label = schedule.name + "[" + ",".join(f"K{s.k}R{s.ratio:g}{s.criterion}" for s in overridden.stages) + "]"
        overridden = Schedule(overridden.stages, name=label)
    return overridden


def methods_from_args(args: argparse.Namespace) -> list[Schedule]:
    return [method_from_args(args, n.strip()) for n in args.methods.split(",") if n.strip()]


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = "builtin") -> None:
    parser.add_argument("--model", default=default, required=default is None,
                        help="hub id, local directory, or 'builtin' (the shipped model)")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"),
                        help="attention implementation of the decoder (kept while pruning)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                        help="weights dtype (default: fp32 on CPU, the checkpoint's on GPU)")
