"""Plotting helpers shared by the notebooks: images in [-1, 1] shown as a grid."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch


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
