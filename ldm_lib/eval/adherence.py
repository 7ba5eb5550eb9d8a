"""Prompt adherence on the shapes set: does a generated image show what its prompt asked for?

This is the score of the course's classifier-free guidance experiments (Ho & Salimans 2022,
"Classifier-Free Diffusion Guidance", arXiv 2207.12598): raising the guidance scale should raise
adherence (at some cost in diversity and, at high scales, saturation; guidance rescale of Lin et
al. 2023, arXiv 2305.08891, tempers the latter). On the shapes set it can be measured exactly,
because every prompt names four attributes and the palette is public:

- ``background``: nearest palette colour (among the backgrounds) to the median border pixel;
- ``color``: nearest palette colour (among the shape colours, the predicted background excluded)
  to the median of the pixels that differ most from the background
  (:func:`ldm_lib.eval.classifier.segment`);
- ``shape`` and ``size``: a small CNN on the shape's coverage map
  (:mod:`ldm_lib.eval.classifier`).

An image where no pixel stands out from the background has no shape: its ``color``, ``shape`` and
``size`` are ``"none"``, wrong for every prompt. Scores are accuracies: the fraction of images
whose predicted attribute equals the prompt's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..data.shapes import ATTRIBUTE_NAMES, BACKGROUNDS, COLORS, PALETTE, parse_caption
from .brightness import _check_prompts, check_images
from .classifier import MIN_SIZE, ShapeClassifier, predict_shape_size, segment

NONE = "none"  # the predicted colour, shape and size of an image without a shape


def nearest_color(rgb: torch.Tensor, names: Sequence[str]) -> str:
    """The palette name among ``names`` closest (Euclidean, RGB in [0, 1]) to ``rgb`` (3,)."""
    palette = torch.tensor([PALETTE[n] for n in names], dtype=torch.float32) / 255.0
    return names[int((palette - rgb.float()).norm(dim=1).argmin())]


def predict_attributes(images: torch.Tensor, model: ShapeClassifier | None = None) -> list[dict[str, str]]:
    """The attributes each image shows: ``[{"size", "color", "shape", "background"}, ...]``.

    ``images``: float ``(B, 3, H, W)`` in ``[-1, 1]``, square, at least 8 px (any resolution; the
    classifier sees a 32x32 resize). ``model``: a :class:`ShapeClassifier` (default: the shipped
    one). Images without a shape get ``"none"`` for size, color and shape.
    """
    check_images(images, square=True, min_size=MIN_SIZE)
    seg = segment(images)
    shapes, sizes = predict_shape_size(images, seg, model)
    predictions = []
    for i in range(images.shape[0]):
        background = nearest_color(seg.background_rgb[i], BACKGROUNDS)
        if bool(seg.has_shape[i]):
            color = nearest_color(seg.shape_rgb[i], [c for c in COLORS if c != background])
        else:
            color = NONE
        predictions.append({"size": sizes[i], "color": color, "shape": shapes[i], "background": background})
    return predictions


@dataclass(frozen=True)
class AdherenceReport:
    """Per-attribute accuracies of a batch against its prompts, and the per-image details.

    ``all``: fraction of images with all four attributes right; ``attribute``: mean of the four
    per-attribute accuracies. ``correct[name][i]`` says whether image ``i`` got ``name`` right.
    """

    size: float
    color: float
    shape: float
    background: float
    all: float
    attribute: float
    n: int
    predictions: list[dict[str, str]] = field(repr=False)
    targets: list[dict[str, str]] = field(repr=False)
    correct: dict[str, list[bool]] = field(repr=False)

    def as_dict(self) -> dict[str, float]:
        """The six accuracies (``size``, ``color``, ``shape``, ``background``, ``all``, ``attribute``)."""
        return {name: getattr(self, name) for name in (*ATTRIBUTE_NAMES, "all", "attribute")}

    def __str__(self) -> str:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in self.as_dict().items())
        return f"adherence over {self.n} images: {scores}"


def adherence(
    images: torch.Tensor, prompts: Sequence[str], model: ShapeClassifier | None = None
) -> AdherenceReport:
    """Score ``images`` (float ``(B, 3, H, W)`` in ``[-1, 1]``) against their ``prompts`` (B captions).

    Prompts must follow the shapes-set grammar, ``"a {size} {color} {shape} on a {background}
    background"``; one that does not raises ``ValueError`` naming it, before any work.
    """
    check_images(images, square=True, min_size=MIN_SIZE)
    prompts = _check_prompts(prompts, images.shape[0])
    targets = [{k: parse_caption(p)[k] for k in ATTRIBUTE_NAMES} for p in prompts]
    predictions = predict_attributes(images, model)
    correct = {
        name: [p[name] == t[name] for p, t in zip(predictions, targets, strict=True)]
        for name in ATTRIBUTE_NAMES
    }
    n = len(prompts)
    accuracy = {name: sum(flags) / n for name, flags in correct.items()}
    every = sum(all(correct[name][i] for name in ATTRIBUTE_NAMES) for i in range(n)) / n
    return AdherenceReport(
        **accuracy,
        all=every,
        attribute=sum(accuracy.values()) / len(accuracy),
        n=n,
        predictions=predictions,
        targets=targets,
        correct=correct,
    )
