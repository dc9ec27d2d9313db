"""Draw which image patches each pruning stage kept, over the image the model saw."""

from __future__ import annotations

import math


TITLE_HEIGHT = 24
"""Pixels of the title strip above each panel."""


def kept_overlay(image, n_image_tokens: int, kept_per_stage: list[list[int]], size: int = 336,
                 titles: list[str] | None = None):
    """A PIL image: the input (centre-cropped square, as CLIP processors do) and one panel per
    stage with the dropped patches darkened. `kept_per_stage[s]` holds indices 0..N-1 in
    row-major patch order (stats.kept_image_indices[s][b]). Each panel gets a title above it:
    `titles` (one per panel, input first), by default "input" and "stage s: N kept"."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    grid = math.isqrt(n_image_tokens)
    if grid * grid != n_image_tokens:
        raise ValueError(f"{n_image_tokens} image tokens do not form a square grid; cannot draw them")
    base = ImageOps.fit(image.convert("RGB"), (size, size))
    panels = [base]
    cell = size / grid
    for kept in kept_per_stage:
        keep = set(kept)
        panel = base.copy()
        shade = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        draw = ImageDraw.Draw(shade)
        for i in range(n_image_tokens):
            if i not in keep:
                r, c = divmod(i, grid)
                draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=(0, 0, 0, 190))
        panels.append(Image.alpha_composite(panel.convert("RGBA"), shade).convert("RGB"))
    if titles is None:
        titles = ["input"] + [f"stage {s + 1}: {len(set(k))} kept" for s, k in enumerate(kept_per_stage)]
    if len(titles) != len(panels):
        raise ValueError(f"{len(titles)} titles for {len(panels)} panels (the input, then one per stage)")
    out = Image.new("RGB", (size * len(panels) + 8 * (len(panels) - 1), size + TITLE_HEIGHT), "white")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=13)
    for i, (p, title) in enumerate(zip(panels, titles)):
        out.paste(p, (i * (size + 8), TITLE_HEIGHT))
        while len(title) > 4 and draw.textlength(title, font=font) > size - 4:
            title = title[:-4] + "..."
        draw.text((i * (size + 8) + 2, 5), title, fill="black", font=font)
    return out
