"""Flags shared by several commands: methods with per-stage overrides, and model loading.

One source of truth: schedules come from himap.prune.schedule.PRESETS and himap.evaluation.ablations, overrides
from `--k / --ratio / --criterion` parsed here for every command.
"""

from __future__ import annotations

import argparse

from himap.prune.schedule import CRITERIA, PRESETS, Schedule, with_overrides

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
    `default` replaces the name 'default' (a task's default method); `overrides` apply to every
    method that prunes, or raise when `single_override` and several methods are listed.
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
    schedules = []
    for name in names:
        s = Schedule(resolve(name, shape).stages, name=name)
        if overrides and s.stages:
            s = Schedule(with_overrides(s, **overrides).stages, name=override_name(name, **overrides))
        if shape is not None:
            s.validate_for(shape.num_layers)
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
    schedules = resolve_methods(args.method, shape, overrides_from_args(args), single_override=True)
    if len(schedules) != 1:
        raise ValueError(f"--method names {len(schedules)} methods; give one")
    return schedules[0]


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = "builtin") -> None:
    parser.add_argument("--model", default=default, required=default is None,
                        help="hub id, local directory, or 'builtin' (the shipped model)")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"),
                        help="attention implementation of the decoder (kept while pruning)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                        help="weights dtype (default: fp32 on CPU, the checkpoint's on GPU)")


PROMPT_FORMAT_HELP = ("prompt format: 'hf' the checkpoint's own chat template (no system prompt); 'llava-v1' "
                      "LLaVA's vicuna_v1 conversation with its system prompt, as the official HiMAP scripts "
                      "build it (docs/official-code.md)")


def add_prompt_format_argument(parser: argparse.ArgumentParser, default: str | None = "hf",
                               default_note: str | None = None) -> None:
    """--prompt-format hf|llava-v1 (himap.models.loading.PROMPT_FORMATS)."""
    from himap.models.loading import PROMPT_FORMATS

    note = default_note or f"default: {default}"
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=default,
                        help=f"{PROMPT_FORMAT_HELP}; {note}")


def add_no_cache_argument(parser: argparse.ArgumentParser) -> None:
    """--no-cache: generate as the official code (use_cache=False, re-ranking at every token)."""
    parser.add_argument("--no-cache", action="store_true",
                        help="generate as the official HiMAP code: no KV cache, every new token re-runs the "
                             "whole sequence and ranks again (generated tokens join phi_sh's instruction rows)")
