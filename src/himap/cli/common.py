"""What the commands share: the one error path, argument types, methods with per-stage
overrides, and model loading flags.

One source of truth: schedules come from himap.prune.schedule.PRESETS and himap.evaluation.ablations,
overrides from `--k / --ratio / --criterion` parsed here for every command. Bad input raises
(ValueError and its kin) wherever it is found; `error_message` turns it into the one-line message
that himap.cli.main prints with exit code 2, so commands hold no try/except of their own.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from himap.prune.schedule import CRITERIA, PRESETS, Schedule, fit_to_depth, with_overrides

DEBUG_ENV = "HIMAP_DEBUG"
"""Set to 1 to see the Python traceback of an error instead of the one-line message."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or an environment problem (a file, a device, a package, an
    unreachable judge), reported as a message: ValueError (DataError, ImageError, schedule and
    argument checks), OSError (files, model folders, the hub), ImportError (optional packages),
    the evaluation's and the judge's own errors, the engine's unknown-layout error and an
    unsupported model class."""
    from himap.evaluation.judge import JudgeError
    from himap.evaluation.runner import EvalError
    from himap.prune.adapters import UnsupportedModelError
    from himap.prune.engine import LayoutError

    return (ValueError, OSError, ImportError, EvalError, JudgeError, LayoutError, UnsupportedModelError)


def error_message(err: BaseException) -> str | None:
    """The message for a user error, or None for anything else (a bug: let it raise)."""
    if not isinstance(err, user_error_types()):
        return None
    if isinstance(err, ImportError) and not isinstance(err, ModuleNotFoundError) \
            and str(err).startswith("cannot import name"):
        return None  # a broken import inside the package: a bug
    if isinstance(err, KeyError) and err.args:  # KeyError's str() adds quotes
        return str(err.args[0])
    if isinstance(err, ModuleNotFoundError):
        return f"{err} (a package this needs is not installed)"
    return str(err) or type(err).__name__


def run_command(prog: str, main, args) -> int:
    """main(args) with the shared error path: a user error prints "PROG: error: MESSAGE" on
    stderr and returns 2 (HIMAP_DEBUG=1 re-raises it with its traceback); Ctrl-C returns 130."""
    try:
        return int(main(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - classified by error_message, re-raised when a bug
        message = error_message(err)
        if message is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- argument types

def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def text(value: str) -> str:
    """argparse type: text that is not empty or only whitespace (a prompt, a question)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty; give some text")
    return value


def check_output_path(path: str | None, flag: str) -> None:
    """Refuse an output file whose folder does not exist, before any work is done."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name")


def field_help(cls) -> dict[str, str]:
    """{field: its comment} of a config dataclass whose fields are documented by a trailing
    comment (`steps: int = 2600  # optimiser steps`): the flags' help, from the one source."""
    import inspect
    import re

    pattern = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = pattern.match(line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip=(), types: dict | None = None,
                            prefix_help: str = "") -> None:
    """One flag per field of a config dataclass (--field-name), typed by its default's type
    (or `types[name]`), with the field's comment and default as help; booleans get --x/--no-x."""
    import dataclasses

    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{prefix_help}{helps.get(f.name, f.name.replace('_', ' '))} (default {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = (types or {}).get(f.name, type(default))
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def note(message: str) -> None:
    """One line on stderr saying what a slow step is doing (between progress bars)."""
    print(message, file=sys.stderr, flush=True)

METHOD_HELP = (f"comma-separated presets ({', '.join(PRESETS)}), ablation names (uniform@himap, "
               "deep-only@himap, k1=3-r1=0.25@himap, crit=embed_norm@himap, ...) or groups (all@himap)")


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """--k / --ratio / --criterion: override stage 1, 2, ... by position ('-' keeps a value)."""
    parser.add_argument("--k", nargs="+", metavar="K",
                        help="override the stages' layers K (K1 [K2 ...]); layer K-1 ranks; '-' keeps one")
    parser.add_argument("--ratio", nargs="+", metavar="R",
                        help="override the stages' drop ratios R in [0, 1) (R1 [R2 ...]); '-' keeps one")
    parser.add_argument("--criterion", nargs="+", metavar="PHI",
                        help=f"override the stages' criteria ({', '.join(CRITERIA)}); '-' keeps one")


def parse_overrides(values, cast, flag: str):
    """['3', '-'] -> [3, None] ('-' keeps that stage's value); None when the flag is absent."""
    if not values:
        return None
    out = []
    for v in values:
        if v in ("-", "none", "None"):
            out.append(None)
            continue
        try:
            out.append(cast(v))
        except ValueError:
            raise ValueError(f"{flag} expects {cast.__name__} values or '-', got {v!r}") from None
    return out


def overrides_from_args(args: argparse.Namespace) -> dict:
    """{"k": [...] | None, "ratio": ..., "criterion": ...} from parsed flags."""
    return {"k": parse_overrides(getattr(args, "k", None), int, "--k"),
            "ratio": parse_overrides(getattr(args, "ratio", None), float, "--ratio"),
            "criterion": parse_overrides(getattr(args, "criterion", None), str, "--criterion")}


def override_name(name: str, k=None, ratio=None, criterion=None) -> str:
    """A method name recording its overrides, safe as a file name: himap+k=3,8+ratio=-,0.5."""
    parts = [f"{flag}={','.join('-' if v is None else f'{v:g}' if isinstance(v, float) else str(v) for v in vals)}"
             for flag, vals in (("k", k), ("ratio", ratio), ("criterion", criterion)) if vals]
    return "+".join([name] + parts)


def resolve_methods(spec: str, shape=None, overrides: dict | None = None, default: str | None = None,
                    single_override: bool = False) -> list[Schedule]:
    """Schedules for a comma-separated method spec.

    `shape` (himap.evaluation.ablations.ModelShape) is needed by model-dependent ablations (uniform@B);
    with it, a preset deeper than the model is scaled to its depth (himap.prune.schedule.fit_to_depth,
    with a note on stderr) and --k values are checked against the layer count. `default` replaces
    the name 'default' (a task's default method); `overrides` apply to every method that prunes,
    or raise when `single_override` and several methods are listed.
    """
    from himap.evaluation.ablations import expand, resolve

    names = []
    for raw in (m.strip() for m in spec.split(",")):
        if not raw:
            continue
        if default is not None:
            raw = default if raw == "default" else raw.replace("@default", f"@{default}")
        names += [n for n in expand(raw) if n not in names]
    if not names:
        raise ValueError("no method given")
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    if overrides and single_override and len(names) != 1:
        raise ValueError("--k/--ratio/--criterion apply to a single method")
    if shape is not None:
        too_deep = [k for k in overrides.get("k") or [] if k is not None and k >= shape.num_layers]
        if too_deep:
            raise ValueError(f"--k {too_deep[0]}: the model has {shape.num_layers} decoder layers, so K "
                             f"must be at most {shape.num_layers - 1} (layer K-1 ranks, layers K.. are pruned)")
    schedules = []
    for name in names:
        s = dataclasses.replace(resolve(name, shape), name=name)
        if shape is not None:
            fitted = fit_to_depth(s, shape.num_layers)
            if fitted is not s:
                note(f"note: {name}: K={tuple(x.k for x in s.stages)} does not fit this model's "
                     f"{shape.num_layers} decoder layers; scaled to its depth: K={tuple(x.k for x in fitted.stages)}")
                s = fitted
        if overrides and s.stages:
            s = dataclasses.replace(with_overrides(s, **overrides), name=override_name(name, **overrides))
        if shape is not None:
            s.validate_for(shape.num_layers)
            s = s.for_layers(shape.num_layers)  # the layers that run (peers: scaled to the depth)
        schedules.append(s)
    return schedules


def model_shape(arch):
    """himap.evaluation.ablations.ModelShape of a himap.cost.flops.Arch (paper-convention cost for uniform@B)."""
    from himap.cost.flops import paper_flops
    from himap.evaluation.ablations import ModelShape

    return ModelShape(arch.image_tokens, arch.num_layers, cost_fn=lambda s: paper_flops(arch, s))


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """--method (one method) plus the stage overrides."""
    parser.add_argument("--method", default="himap", help="one method: " + METHOD_HELP)
    add_override_arguments(parser)


def method_from_args(args: argparse.Namespace, config=None) -> Schedule:
    """The one schedule named by --method with overrides; `config` (a model config) resolves
    model-dependent ablation names."""
    shape = None
    if config is not None:
        from himap.cost.flops import Arch

        shape = model_shape(Arch.from_config(config))
    return one_method(args.method, shape, overrides_from_args(args))


def one_method(spec: str, shape=None, overrides: dict | None = None, what: str = "--method") -> Schedule:
    """The single schedule `spec` names (with stage overrides); several raise, naming `what`."""
    schedules = resolve_methods(spec, shape, overrides, single_override=True)
    if len(schedules) != 1:
        raise ValueError(f"{what} names {len(schedules)} methods; give one")
    return schedules[0]


def check_model_arguments(args) -> None:
    """--model, --device and --attn checked before anything is computed or written: a model name
    that is neither a folder nor a hub id, a device torch cannot use, an unavailable kernel."""
    from himap.models.loading import check_attn_implementation, check_device, resolve_model_path

    resolve_model_path(args.model)
    check_attn_implementation(args.attn, check_device(args.device))
    set_threads(getattr(args, "threads", None))


def set_threads(threads: int | None) -> None:
    """--threads (or a config's threads): torch's CPU threads for this process (None: torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = "builtin",
                        device: str = "cpu") -> None:
    """--model, --attn (alias --attn-implementation), --device, --dtype, --threads."""
    parser.add_argument("--model", default=default, required=default is None,
                        help="local model folder, hub id (owner/name), or 'builtin' (the shipped model)")
    parser.add_argument("--attn", "--attn-implementation", dest="attn", default="sdpa",
                        choices=("sdpa", "eager", "flash_attention_2"),
                        help="attention implementation of the decoder (kept while pruning)")
    parser.add_argument("--device", default=device,
                        help="cpu, cuda, cuda:1, ..." + (" or auto (cuda when available)" if device == "auto" else ""))
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                        help="weights dtype (default: fp32 on CPU, " + ("bf16 on CUDA)" if device == "auto"
                                                                      else "the checkpoint's on GPU)"))
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's; 1 is often fastest on a small shared CPU)")


PROMPT_FORMAT_HELP = ("prompt format: 'hf' the checkpoint's own chat template (no system prompt); 'llava-v1' "
                      "LLaVA's vicuna_v1 conversation with its system prompt, as the official HiMAP scripts "
                      "build it (docs/official-code.md)")


def add_prompt_format_argument(parser: argparse.ArgumentParser, default: str | None = "hf",
                               default_note: str | None = None) -> None:
    """--prompt-format hf|llava-v1 (himap.models.loading.PROMPT_FORMATS)."""
    from himap.models.loading import PROMPT_FORMATS

    default_text = default_note or f"default: {default}"
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=default,
                        help=f"{PROMPT_FORMAT_HELP}; {default_text}")


def add_no_cache_argument(parser: argparse.ArgumentParser) -> None:
    """--no-cache: generate as the official code (use_cache=False, re-ranking at every token)."""
    parser.add_argument("--no-cache", action="store_true",
                        help="generate as the official HiMAP code: no KV cache, every new token re-runs the "
                             "whole sequence and ranks again (generated tokens join phi_sh's instruction rows)")
