"""Plotting helpers shared by the notebooks: images in [-1, 1] shown as a grid."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image


def to_image(x: torch.Tensor) -> np.ndarray:
    """A (C, H, W) tensor in [-1, 1] as an (H, W, C) float array in [0, 1] for ``imshow``."""
    if x.ndim != 3:
        raise ValueError(f"x must be one image (C, H, W), got shape {tuple(x.shape)}")
    x = ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)
    if x.shape[0] == 1:
        return x[0].numpy()
    return x.permute(1, 2, 0).numpy()


def show_images(
    images: torch.Tensor | Sequence[torch.Tensor],
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    size: float = 1.6,
    suptitle: str | None = None,
    cmap: str = "gray",
) -> plt.Figure:
    """Show a batch of images (B, C, H, W) in [-1, 1] as a grid with optional titles."""
    images = list(images)
    n = len(images)
    if n == 0:
        raise ValueError("images is empty; expected at least one image")
    ncols = ncols or min(n, 8)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.3 if suptitle else 0)))
    axes = np.atleast_1d(axes).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < n:
            ax.imshow(to_image(images[i]), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def image_grid(
    images: torch.Tensor,
    captions: Sequence[str] | None = None,
    ncols: int | None = None,
    scale: int = 4,
) -> Image.Image:
    """A PIL grid of images (B, C, H, W) in [-1, 1], each upscaled ``scale`` times (nearest, so the
    pixels stay visible), with an optional caption under each image. Written by the trainer's
    validation and ``python -m ldm_lib.sample``."""
    from PIL import ImageDraw, ImageFont

    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch (B, C, H, W), got shape {tuple(images.shape)}")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    n = len(images)
    ncols = ncols or min(n, 8)
    nrows = -(-n // ncols)
    tiles = [Image.fromarray((to_image(x) * 255).round().astype(np.uint8)) for x in images]
    w, h = tiles[0].width * scale, tiles[0].height * scale
    font = ImageFont.load_default()
    caption_h = 0
    lines: list[list[str]] = []
    if captions is not None:
        chars = max(8, w // 6)  # the default bitmap font is about 6 px per character
        for caption in captions:
            words, rows, row = caption.split(), [], ""
            for word in words:
                if row and len(row) + 1 + len(word) > chars:
                    rows.append(row)
                    row = word
                else:
                    row = f"{row} {word}".strip()
            rows.append(row)
            lines.append(rows)
        caption_h = 12 * max(len(r) for r in lines) + 4
    grid = Image.new("RGB", (ncols * w, nrows * (h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        x, y = (i % ncols) * w, (i // ncols) * (h + caption_h)
        grid.paste(tile.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
        for j, row in enumerate(lines[i] if lines else []):
            draw.text((x + 2, y + h + 2 + 12 * j), row, fill="black", font=font)
    return grid
