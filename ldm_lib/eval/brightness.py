r"""Brightness of generated images: the measurement behind offset noise and zero terminal SNR.

With the standard (scaled-linear) schedule, :math:`\bar\alpha_T \approx 0.0047`: the noisy input at
:math:`t = T` still carries :math:`\sqrt{\bar\alpha_T} \approx 0.07` of the image, mostly its
low-frequency content (the mean colour). Training therefore never asks the model to *choose* a
mean brightness at :math:`t = T`; at sampling time it starts from pure noise, whose mean is about
zero, and keeps it. Generated images come out with a mean brightness pulled towards mid-grey:
pure black and pure white backgrounds are hard to reach (Guttenberg 2023, "Diffusion with Offset
Noise", Crosslabs blog; Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
Flawed", arXiv 2305.08891). Offset noise and a zero-terminal-SNR schedule fix it; the shapes set,
with its pure black and white backgrounds, is where the difference can be measured, with the
functions below.

Brightness is the luma of Rec. ITU-R BT.601 on RGB in :math:`[0, 1]`:

.. math:: Y = 0.299\,R + 0.587\,G + 0.114\,B

Images are float tensors ``(B, 3, H, W)`` in ``[-1, 1]`` (the course's convention), mapped to
:math:`[0, 1]` by :math:`(x + 1)/2` and clamped (a decoder may overshoot the range slightly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._checks import check_number

# Rec. ITU-R BT.601 luma weights for R, G, B.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Quantiles of the per-image brightness reported by brightness_stats.
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def check_images(images: torch.Tensor, *, square: bool = False, min_size: int = 1) -> None:
    """Raise ``ValueError`` unless ``images`` is a finite float ``(B, 3, H, W)`` batch, B >= 1.

    ``square`` also requires ``H == W``; ``min_size`` is the smallest allowed side.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(
            f"images must be a torch.Tensor (B, 3, H, W) in [-1, 1], got {type(images).__name__}"
        )
    shape = tuple(images.shape)
    if images.ndim != 4 or shape[1] != 3 or shape[0] < 1:
        raise ValueError(f"images must have shape (B, 3, H, W) with B >= 1, got {shape}")
    if min(shape[2:]) < min_size:
        raise ValueError(f"images must be at least {min_size}x{min_size} pixels, got {shape}")
    if square and shape[2] != shape[3]:
        raise ValueError(f"images must be square (H == W), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contains NaN or infinite values")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` images as float32 ``[0, 1]`` on the CPU: :math:`(x + 1)/2`, clamped."""
    return ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def border_mask(height: int, width: int, border: int | None = None) -> torch.Tensor:
    """Boolean ``(height, width)`` mask of the ``border`` outermost pixel rows and columns.

    Default ``border``: ``max(1, round(min(height, width) / 32))`` (1 px at 32, 2 px at 64). In the
    shapes set every shape keeps a margin of 7% of the side from the border, so these pixels are
    background, also after the slight blur of a generator.
    """
    if border is None:
        border = max(1, round(min(height, width) / 32))
    check_number("border", border, low=1, high=min(height, width) / 2, integer=True)
    mask = torch.ones(height, width, dtype=torch.bool)
    mask[border:-border, border:-border] = False
    return mask


def luma(images: torch.Tensor) -> torch.Tensor:
    r"""Per-pixel luma ``(B, H, W)`` in ``[0, 1]``: :math:`Y = 0.299R + 0.587G + 0.114B` (BT.601)."""
    check_images(images)
    weights = torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (to_unit(images) * weights).sum(dim=1)


def brightness(images: torch.Tensor) -> torch.Tensor:
    r"""Mean luma of each image, ``(B,)`` in ``[0, 1]``: :math:`\frac{1}{HW}\sum_{ij} Y_{ij}`.

    All-black images give 0, all-white images 1, the shapes set's gray (128) 0.502.
    """
    return luma(images).mean(dim=(1, 2))


def border_brightness(images: torch.Tensor, border: int | None = None) -> torch.Tensor:
    """Mean luma of the border pixels of each image, ``(B,)``: the background's brightness.

    See :func:`border_mask` for the default ``border`` width.
    """
    y = luma(images)
    mask = border_mask(y.shape[1], y.shape[2], border)
    return y[:, mask].mean(dim=1)


def brightness_stats(images: torch.Tensor, dark: float = 0.05, bright: float = 0.95) -> dict[str, float]:
    """Summary of a batch's brightness, as plain floats.

    - ``mean``, ``std``, ``min``, ``max``, ``q05`` ... ``q95``: of the per-image mean luma
      (:func:`brightness`); a model that cannot leave mid-grey has a narrow spread here;
    - ``near_black`` / ``near_white``: fraction of *all pixels* with luma below ``dark`` / above
      ``bright``; these are what offset noise and zero terminal SNR raise on the shapes set.

    ``std`` is the population standard deviation (0 for one image).
    """
    check_number("dark", dark, low=0.0, high=1.0)
    check_number("bright", bright, low=0.0, high=1.0)
    y = luma(images)
    per_image = y.mean(dim=(1, 2))
    stats = {
        "mean": per_image.mean().item(),
        "std": per_image.std(correction=0).item(),
        "min": per_image.min().item(),
        "max": per_image.max().item(),
    }
    values = torch.quantile(per_image.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    stats.update({f"q{round(q * 100):02d}": v.item() for q, v in zip(QUANTILES, values, strict=True)})
    stats["near_black"] = (y < dark).float().mean().item()
    stats["near_white"] = (y > bright).float().mean().item()
    return stats


def background_brightness(
    images: torch.Tensor, prompts: Sequence[str], border: int | None = None
) -> dict[str, dict[str, float]]:
    """Brightness of the background (border pixels) grouped by the prompt's ``background``.

    For each background named in ``prompts`` (``black``, ``white``, ``gray``): ``target`` (the
    palette colour's luma: 0, 1, 0.502), ``mean`` and ``std`` of :func:`border_brightness` over
    the images asking for it, ``error`` = ``mean - target`` (negative: too dark), ``abs_error`` =
    mean absolute difference to the target, and ``n``. A model trained without offset noise shows
    a positive error on black and a negative one on white.
    """
    from ..data.shapes import PALETTE, parse_caption  # deferred: keeps this module standalone

    check_images(images)
    prompts = _check_prompts(prompts, images.shape[0])
    backgrounds = [parse_caption(p)["background"] for p in prompts]
    values = border_brightness(images, border)
    result: dict[str, dict[str, float]] = {}
    for name in sorted(set(backgrounds)):
        target = sum(w * c / 255 for w, c in zip(LUMA_WEIGHTS, PALETTE[name], strict=True))
        group = values[torch.tensor([b == name for b in backgrounds])]
        result[name] = {
            "target": target,
            "mean": group.mean().item(),
            "std": group.std(correction=0).item(),
            "error": group.mean().item() - target,
            "abs_error": (group - target).abs().mean().item(),
            "n": float(group.numel()),
        }
    return result


def _check_prompts(prompts: Sequence[str], batch: int) -> list[str]:
    """``prompts`` as a list of ``batch`` strings, or ``ValueError``."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of {batch} captions, got {type(prompts).__name__}")
    if len(prompts) != batch:
        raise ValueError(f"prompts has {len(prompts)} entries but images has {batch}; they must match")
    return list(prompts)
