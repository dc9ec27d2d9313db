"""Train the built-in small LLaVA model on the synthetic benchmark (himap.builtin.train).

    himap train-default --out runs/builtin            # the shipped model's recipe
    himap train-default --steps 300 --out runs/pilot  # a short pilot

Flags mirror himap.builtin.train.TrainConfig and ModelConfig (one source of defaults). Prints a progress
bar, one JSON line per held-out evaluation (also appended to OUT/log.jsonl), keeps OUT/best and
OUT/last as loadable HF checkpoints, and ends with one JSON line summarising the run.
`--install` copies OUT/best into the package (himap/builtin/model) with a model card.
"""

from __future__ import annotations

import dataclasses
import json
import os


def add_arguments(parser) -> None:
    from himap.builtin.synthetic import SyntheticConfig
    from himap.builtin.train import ModelConfig, TrainConfig
    from himap.cli.common import add_dataclass_arguments

    add_dataclass_arguments(parser, TrainConfig, skip=("model", "mix"))
    parser.add_argument("--out", dest="out_dir", default=TrainConfig.out_dir, help="alias of --out-dir")
    parser.add_argument("--mix", default=None,
                        help='kind weights of the training stream as JSON, e.g. \'{"mc": 0.4, "pope": 0.4, '
                             '"word": 0.2}\' (default: the recipe\'s)')
    add_dataclass_arguments(parser, ModelConfig, prefix_help="model size: ")
    parser.add_argument("--max-objects", type=int, default=SyntheticConfig.max_objects,
                        help="objects per image at most (himap.builtin.synthetic.SyntheticConfig)")
    parser.add_argument("--pope-query", default=SyntheticConfig.pope_query, choices=("pair", "attribute"),
                        help="POPE questions name a colour + shape pair or one attribute")
    parser.add_argument("--mc-options", default=SyntheticConfig.mc_options, choices=("fixed", "shuffled"),
                        help="multiple-choice options in canonical order or shuffled")
    parser.add_argument("--install", action="store_true",
                        help="copy OUT/best into the package (himap/builtin/model) with a model card")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args):
    """TrainConfig from parsed arguments."""
    from himap.builtin.train import ModelConfig, TrainConfig

    model = ModelConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)})
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if f.name not in ("model", "mix")}
    cfg = TrainConfig(**values, model=model)
    if args.mix:
        try:
            mix = json.loads(args.mix)
        except json.JSONDecodeError as err:
            raise ValueError(f"--mix is not valid JSON ({err})") from None
        if not isinstance(mix, dict) or not mix:
            raise ValueError("--mix must be a JSON object of kind -> weight")
        cfg.mix = {k: float(v) for k, v in mix.items()}
    return cfg


def main(args) -> int:
    from himap.builtin import synthetic
    from himap.builtin.train import train

    cfg = config_from_args(args)
    bad = [k for k in cfg.mix if k not in synthetic.KINDS]
    if bad:
        raise ValueError(f"unknown kinds in --mix: {bad}; choose from {synthetic.KINDS}")
    import platform
    import sys

    info = {"argv": sys.argv[1:], "machine": f"{platform.machine()} {os.cpu_count()} CPU cores"}
    data_cfg = synthetic.SyntheticConfig(max_objects=args.max_objects, pope_query=args.pope_query,
                                         mc_options=args.mc_options)
    summary = train(cfg, data_cfg, progress=not args.quiet, extra_info=info)
    if args.install:
        from himap.builtin import install

        install(f"{cfg.out_dir}/best")
    last = summary["history"][-1] if summary["history"] else {}
    print(json.dumps({"out_dir": cfg.out_dir, "steps": summary["steps"], "minutes": summary["minutes"],
                      "best_score": summary["best_score"], "last_valid": last.get("valid")}))
    return 0
