"""Generate an answer for one prompt with images (one or several --image) and/or a video (--video
FRAME ...) under a pruning method; print statistics.

    himap generate --model builtin --image shapes.png --prompt "Is there a red object in the image?"
    himap generate --model llava-hf/llava-1.5-7b-hf --image photo.jpg --prompt "Describe the image." \\
        --method himap --k 3 8 --save-kept kept.png
    himap generate --model builtin --image shapes.png --prompt "Is there a circle in the image?" --method fastv --json

Prints the answer, the schedule, the tokens entering each layer, the KV-cache length per layer,
the kept image tokens of each stage and the ranking time; ends with one summary line (or prints
one JSON object with --json). Inputs (images, frames, --save-kept, model, device, method) are
checked before the model loads.
"""

from __future__ import annotations

import json
import time


def add_arguments(parser):
    from himap.cli.common import (
        add_method_arguments,
        add_model_arguments,
        add_no_cache_argument,
        add_prompt_format_argument,
        positive_int,
        text,
    )

    add_model_arguments(parser, default=None)
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="image file; repeat for several images (they come first, in order)")
    parser.add_argument("--video", nargs="+", metavar="FRAME",
                        help="a video as its frame image files, in order (families that take video)")
    parser.add_argument("--prompt", required=True, type=text, help="the question or instruction")
    add_prompt_format_argument(parser)
    add_method_arguments(parser)
    from himap.prune.engine import QUOTAS

    parser.add_argument("--quota", choices=QUOTAS, default="sample",
                        help="share each stage's budget over all visual tokens (sample) or per image / frame")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate at most")
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
    import himap
    from himap.cli.common import check_model_arguments, check_output_path, method_from_args, note
    from himap.models.loading import build_inputs, generate_ids, load_image, load_model, model_config

    if not args.image and not args.video:
        raise ValueError("give --image FILE (repeatable) and/or --video FRAME ...")
    images = [load_image(p) for p in args.image]  # every input is checked before the weights load
    frames = [load_image(p) for p in args.video or []]
    if args.save_kept and (len(images) != 1 or frames):
        raise ValueError("--save-kept draws one image's grid; give a single --image and no --video")
    check_output_path(args.save_kept, "--save-kept")
    check_model_arguments(args)
    schedule = method_from_args(args, model_config(args.model))
    note(f"loading {args.model} ...")
    model, processor = load_model(args.model, args.attn, args.dtype, args.device)
    inputs = build_inputs(processor, [images], [args.prompt], device=model.device,
                          videos=[frames] if frames else None, prompt_format=args.prompt_format)
    start = time.perf_counter()
    with himap.pruned(model, schedule, quota=args.quota) as handle:
        new = generate_ids(model, inputs, args.max_new_tokens, recompute=args.no_cache)
    seconds = time.perf_counter() - start
    answer = processor.tokenizer.decode(new[0], skip_special_tokens=True).strip()
    stats = handle.stats.to_dict()
    if args.save_kept and stats["kept_image_indices"]:
        from himap.analysis.overlay import kept_overlay

        n = stats["image_tokens_per_layer"][0][0]
        kept_overlay(images[0], n, [k[0] for k in stats["kept_image_indices"]],
                     titles=_panel_titles(schedule, stats)).save(args.save_kept)
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
    for line in stats["notes"]:
        print(f"note: {line}")
    if args.save_kept:
        print(f"kept patches drawn to {args.save_kept}" if stats["kept_image_indices"] else "nothing pruned: no overlay")
    image_tokens = stats["image_tokens_per_layer"][0]
    print(f"himap generate: {new.shape[1]} new token(s) in {seconds:.2f} s with {schedule.name}; image tokens "
          f"{' -> '.join(str(n) for n in dict.fromkeys(image_tokens))} over {len(image_tokens)} layers")
    return 0


def _panel_titles(schedule, stats) -> list[str]:
    """Titles of the overlay panels: the input, then each stage's K, R, criterion and kept count."""
    n = stats["image_tokens_per_layer"][0][0]
    return [f"input ({n} image tokens)"] + [
        f"stage {i + 1}: K={s.k}, R={s.ratio:g}, {s.criterion}: {len(kept[0])} kept"
        for i, (s, kept) in enumerate(zip(schedule.stages, stats["kept_image_indices"]))]
