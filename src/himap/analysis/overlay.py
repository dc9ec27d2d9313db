"""Draw which image patches each pruning stage kept, over the image the model saw."""

from __future__ import annotations

import math


def kept_overlay(image, n_image_tokens: int, kept_per_stage: list[list[int]], size: int = 336):
    """A PIL image: the input (centre-cropped square, as CLIP processors do) and one panel per
    stage with the dropped patches darkened. `kept_per_stage[s]` holds indices 0..N-1 in
    row-major patch order (stats.kept_image_indices[s][b])."""
    from PIL import Image, ImageDraw, ImageOps

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
    out = Image.new("RGB", (size * len(panels) + 8 * (len(panels) - 1), size), "white")
    for i, p in enumerate(panels):
        out.paste(p, (i * (size + 8), 0))
    return out
