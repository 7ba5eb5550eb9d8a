"""Score a trained text-to-image model of the shapes set: generate for a fixed prompt set at
several guidance scales and measure adherence and background brightness.

The prompt set is every caption of the grammar (2 sizes x 16 colour/background pairs x 3 shapes =
96), each with ``seeds_per_prompt`` seeds, so every attribute value is equally represented.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.shapes import _PAIRS, SHAPES, SIZES, make_caption
from .adherence import adherence
from .brightness import background_brightness


def all_captions() -> list[str]:
    """Every caption of the shapes grammar, in a fixed order."""
    return [
        make_caption({"size": size, "color": color, "shape": shape, "background": background})
        for size in SIZES
        for color, background in _PAIRS
        for shape in SHAPES
    ]


@torch.no_grad()
def evaluate_model(
    model: Any,
    guidance_scales: Sequence[float] = (1.0, 3.0, 5.0, 7.5),
    *,
    prompts: Sequence[str] | None = None,
    seeds_per_prompt: int = 2,
    num_inference_steps: int = 25,
    guidance_rescale: float = 0.0,
    spacing: str = "trailing",
    batch_size: int = 96,
) -> list[dict[str, float]]:
    """One row per guidance scale: adherence per attribute (``size``, ``color``, ``shape``,
    ``background``), ``all`` (every attribute right), ``attribute`` (their mean), and the background
    brightness error per requested background (``bg_<name>_error`` = mean border luma - target).

    ``model`` is a :class:`ldm_lib.pipeline.LatentDiffusion`. Seeds are ``0 .. n-1`` over the
    prompt list, the same at every scale, so scales are compared on the same starting noise."""
    prompts = list(prompts) if prompts is not None else all_captions()
    items = [(p, s) for s in range(seeds_per_prompt) for p in prompts]
    rows = []
    for scale in guidance_scales:
        images = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images.append(
                model.generate(
                    [p for p, _ in chunk],
                    seeds=[start + i for i in range(len(chunk))],
                    num_inference_steps=num_inference_steps,
                    guidance_scale=scale,
                    guidance_rescale=guidance_rescale,
                    spacing=spacing,
                )
            )
        images = torch.cat(images)
        all_prompts = [p for p, _ in items]
        report = adherence(images, all_prompts)
        row: dict[str, float] = {"guidance_scale": float(scale), **report.as_dict()}
        for name, stats in background_brightness(images, all_prompts).items():
            row[f"bg_{name}_error"] = stats["error"]
        rows.append(row)
    return rows
