"""Generate an answer for one prompt with images (one or several --image) and/or a video (--video
FRAME ...) under a pruning method; print statistics."""

from __future__ import annotations

import json
import sys


def add_arguments(parser):
    from himap.cli.common import (
        add_method_arguments,
        add_model_arguments,
        add_no_cache_argument,
        add_prompt_format_argument,
    )

    add_model_arguments(parser, default=None)
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="image file; repeat for several images (they come first, in order)")
    parser.add_argument("--video", nargs="+", metavar="FRAME",
                        help="a video as its frame image files, in order (families that take video)")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    add_prompt_format_argument(parser)
    add_method_arguments(parser)
    from himap.prune.engine import QUOTAS

    parser.add_argument("--quota", choices=QUOTAS, default="sample",
                        help="share each stage's budget over all visual tokens (sample) or per image / frame")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    add_no_cache_argument(parser)
    parser.add_argument("--save-kept", metavar="PNG", help="draw the kept image patches of each stage")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _runs(values: list[int]) -> str:
    """[576, 576, 288, 288] -> '576 x2, 288 x2' (a compact per-layer listing)."""
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        out.append(f"{values[i]} x{j - i + 1}" if j > i else str(values[i]))
        i = j + 1
    return ", ".join(out)


def main(args) -> int:
    from PIL import Image

    import himap
    from himap.cli.common import method_from_args
    from himap.models.loading import build_inputs, generate_ids, load_model

    if not args.image and not args.video:
        raise SystemExit("himap generate: give --image FILE (repeatable) and/or --video FRAME ...")
    model, processor = load_model(args.model, args.attn, args.dtype, args.device)
    schedule = method_from_args(args, model.config)
    images = [Image.open(p).convert("RGB") for p in args.image]
    try:
        inputs = build_inputs(processor, [images], [args.prompt], device=model.device,
                              videos=[args.video] if args.video else None, prompt_format=args.prompt_format)
        with himap.pruned(model, schedule, quota=args.quota) as handle:
            new = generate_ids(model, inputs, args.max_new_tokens, recompute=args.no_cache)
    except ValueError as e:
        print(f"himap generate: {e}", file=sys.stderr)
        return 2
    answer = processor.tokenizer.decode(new[0], skip_special_tokens=True).strip()
    stats = handle.stats.to_dict()
    if args.save_kept and stats["kept_image_indices"]:
        from himap.analysis.overlay import kept_overlay

        if len(images) != 1 or args.video:
            raise SystemExit("himap generate: --save-kept draws one image's grid; give a single --image")
        n = stats["image_tokens_per_layer"][0][0]
        kept_overlay(images[0], n, [k[0] for k in stats["kept_image_indices"]]).save(args.save_kept)
    if args.json:
        print(json.dumps({"answer": answer, "method": schedule.name, "stats": stats}))
        return 0
    print(answer)
    print(f"\nmethod: {schedule.name}  stages: " + (", ".join(
        f"(K={s.k}, R={s.ratio:g}, {s.criterion})" for s in schedule.stages) or "none"))
    if args.no_cache:
        print("no KV cache: every token re-ran the whole sequence; the statistics are the last step's")
    print(f"tokens entering each layer: {_runs(stats['tokens_per_layer'][0])}")
    print(f"image tokens per layer:     {_runs(stats['image_tokens_per_layer'][0])}")
    print(f"KV cache length per layer:  {_runs(stats['kv_cache_lengths'])}")
    for i, kept in enumerate(stats["kept_image_indices"]):
        print(f"stage {i + 1} kept image tokens ({len(kept[0])}): {kept[0][:24]}{' ...' if len(kept[0]) > 24 else ''}")
    print(f"ranking time: {stats['ranking_seconds'] * 1000:.2f} ms")
    for note in stats["notes"]:
        print(f"note: {note}")
    if args.save_kept:
        print(f"kept patches drawn to {args.save_kept}" if stats["kept_image_indices"] else "nothing pruned: no overlay")
    return 0
