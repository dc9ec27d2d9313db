"""`himap` command line: one module per command under himap.cli, imported only when run.

Each command module defines `add_arguments(parser)` and `main(args) -> int`; its docstring is the
command's `--help` text (first line: the summary, then examples). Bad input raises wherever it
is found; `main` below reports it once for every command (himap.cli.common.run_command): one
line "himap COMMAND: error: ..." on stderr and exit code 2.
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
    from himap import __version__

    parser = argparse.ArgumentParser(prog="himap", description="HiMAP: hierarchical image-token pruning "
                                     "and visual information-flow analysis for multimodal LLMs.",
                                     epilog="himap COMMAND --help shows a command's flags and examples. "
                                     "Errors print one line and exit with code 2; HIMAP_DEBUG=1 shows "
                                     "the traceback.")
    parser.add_argument("--version", action="version", version=f"himap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if name == command:  # only the invoked command's module is imported
            module = _module(name)
            p = sub.add_parser(name, help=help_text, description=_description(module, help_text),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            module.add_arguments(p)
        else:
            sub.add_parser(name, help=help_text, description=help_text)
    return parser


def _module(name: str):
    return importlib.import_module(f"himap.cli.{name.replace('-', '_')}")


def _description(module, help_text: str) -> str:
    """The command's summary followed by its module docstring's body (the examples)."""
    doc = (module.__doc__ or "").strip()
    body = doc.split("\n", 1)[1].strip("\n") if "\n" in doc else ""
    return f"{help_text}\n\n{body}" if body else help_text


def main(argv: list[str] | None = None) -> int:
    from himap.cli.common import run_command

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return run_command(f"himap {args.command}", _module(args.command).main, args)


if __name__ == "__main__":
    sys.exit(main())
