"""`himap` command line: one module per command under himap.cli, imported only when run.

Each command module defines `add_arguments(parser)` and `main(args) -> int`; its docstring's
first line is the command's help.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "generate": "Generate an answer for one image and prompt with a pruning method; print statistics.",
    "flops": "Analytic FLOPs of a method (paper convention and full count) and KV-cache bytes.",
    "bench": "Latency and memory benchmark of several methods, interleaved in one process.",
    "analyze": "Information-flow analysis: saliency, attention disruption, Appendix-B filter.",
    "eval": "Evaluate methods on a benchmark task; resumable predictions and a summary table.",
    "score": "Score an existing prediction file (ours or LLaVA's published answers) on a task.",
    "sweep": "Run a grid of schedules over tasks from a YAML config; table and Pareto plot.",
    "demo": "Built-in model and synthetic benchmark: vanilla vs FastV vs HiMAP vs random, offline.",
    "train-default": "Train the built-in small LLaVA model on the synthetic benchmark.",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="himap", description="HiMAP: hierarchical image-token pruning "
                                     "and visual information-flow analysis for multimodal LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the invoked command's module is imported
            _module(name).add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(f"himap.cli.{name.replace('-', '_')}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(_module(args.command).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
