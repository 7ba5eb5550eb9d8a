r"""Segmentation of a shapes-set image, and the small CNN that names its shape and size.

Colours need no learning: the palette is public, so :mod:`ldm_lib.eval.adherence` names them by
nearest palette colour. What this module provides is everything that needs the geometry:

1. :func:`segment`: the background colour (median of the border pixels, which the shapes set keeps
   free of the shape), the foreground (pixels farther than ``threshold`` from that colour, in RGB
   in [0, 1]) and the shape colour (mean of the foreground pixels that differ most from the
   background, so the blurred rim does not count).
2. :func:`soft_mask`: a colour-free coverage map, the projection of each pixel on the segment from
   background colour :math:`b` to shape colour :math:`c`,

   .. math:: a_{ij} = \operatorname{clip}\Big(\frac{(x_{ij} - b)\cdot(c - b)}{\lVert c - b\rVert^2},
             0, 1\Big),

   1 inside the shape, 0 on the background, fractional on a blurred rim, resized to 32x32.
3. :class:`ShapeClassifier`: three conv layers and two heads (shape: 3 classes, size: 2) on that
   map. It is trained by ``scripts/train_eval_classifier.py`` on renders of the shapes set degraded
   the way a generator degrades them (blur, warp, colour shifts, noise), and its weights ship with
   the library (``shape_classifier.safetensors``, 160 KB, loaded once, on first use).

Working on the coverage map rather than on RGB makes the classifier independent of the colours,
which a generator may get wrong without the shape being wrong.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_number
from .brightness import border_mask, check_images, to_unit

WEIGHTS_PATH = Path(__file__).with_name("shape_classifier.safetensors")
INPUT_SIZE = 32  # the classifier's input side; other resolutions are resized to it
MIN_SIZE = 8  # as ldm_lib.data.shapes.MIN_RESOLUTION
# Foreground: RGB distance (in [0, 1]^3) from the background above this. Palette colours are at
# least 0.87 apart (gray to anything), so a pixel half-way between two of them is still in.
THRESHOLD = 0.3
# A shape needs at least this fraction of the pixels (a small shape covers 2% or more); below it
# the image counts as background only. Isolated noisy pixels must not make a shape.
MIN_FRACTION = 0.004
# The shape colour is the mean of the foreground pixels at least this fraction of the way (relative
# to the farthest ones) from the background: the core of the shape, not its blurred rim.
CORE_FRACTION = 0.6

SHAPE_CLASSES = ("circle", "square", "triangle")
SIZE_CLASSES = ("small", "large")


@dataclass
class Segmentation:
    """What :func:`segment` finds in each image of a batch (all on the CPU, RGB in [0, 1])."""

    background_rgb: torch.Tensor  # (B, 3) median colour of the border pixels
    shape_rgb: torch.Tensor  # (B, 3) mean colour of the foreground core; NaN where no shape
    foreground: torch.Tensor  # (B, H, W) bool, pixels farther than the threshold from the background
    has_shape: torch.Tensor  # (B,) bool, at least MIN_FRACTION of the pixels are foreground


def segment(images: torch.Tensor, threshold: float = THRESHOLD) -> Segmentation:
    """Background colour, foreground pixels and shape colour of each image (see module docstring)."""
    check_images(images, min_size=MIN_SIZE)
    check_number("threshold", threshold, low=0.0, high=3**0.5, low_open=True)
    x = to_unit(images)  # (B, 3, H, W)
    b, _, h, w = x.shape
    border = border_mask(h, w)
    # Median per channel: robust to a shape or a blurred rim that touches the border.
    background = x[:, :, border].median(dim=-1).values  # (B, 3)
    # Sum of squares rather than .norm(dim=1): the latter is ~10x slower over the channel axis on CPU.
    distance = ((x - background[:, :, None, None]) ** 2).sum(dim=1).sqrt()  # (B, H, W)
    foreground = distance > threshold
    has_shape = foreground.flatten(1).sum(dim=1) >= max(1, round(MIN_FRACTION * h * w))
    # Core of the shape: pixels at least CORE_FRACTION of the way to the farthest ones. "Farthest"
    # is the maximum of the 3x3-averaged distance, so that one noisy pixel cannot set it.
    far = F.avg_pool2d(distance[:, None], 3, stride=1, padding=1).flatten(1).amax(dim=1)  # (B,)
    core = (foreground & (distance >= CORE_FRACTION * far[:, None, None])).flatten(1)  # (B, HW)
    pixels = x.flatten(2).transpose(1, 2)  # (B, HW, 3)
    # Mean colour of the core: the rim is excluded, and pixel noise averages out.
    weights = core.float()
    shape_rgb = (weights[:, :, None] * pixels).sum(dim=1) / weights.sum(dim=1, keepdim=True)
    shape_rgb[~has_shape] = torch.nan
    return Segmentation(background, shape_rgb, foreground, has_shape)


def soft_mask(images: torch.Tensor, seg: Segmentation | None = None, size: int = INPUT_SIZE) -> torch.Tensor:
    r"""Coverage map ``(B, 1, size, size)`` in [0, 1] (the classifier's input; see module docstring).

    Images without a shape give an all-zero map. The map is computed at the images' resolution,
    then resized (bilinear, antialiased) to ``size``.
    """
    if seg is None:
        seg = segment(images)
    x = to_unit(images)
    bg = seg.background_rgb[:, :, None, None]
    direction = torch.nan_to_num(seg.shape_rgb)[:, :, None, None] - bg
    length2 = (direction**2).sum(dim=1, keepdim=True).clamp_min(1e-6)
    alpha = (((x - bg) * direction).sum(dim=1, keepdim=True) / length2).clamp(0.0, 1.0)
    alpha[~seg.has_shape] = 0.0
    if alpha.shape[-2:] != (size, size):
        alpha = F.interpolate(alpha, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return alpha


class ShapeClassifier(nn.Module):
    """Three 3x3 conv + ReLU + 2x2 max-pool stages (32 -> 4 px), a hidden layer, two heads.

    ``forward(mask)`` takes ``(B, 1, 32, 32)`` coverage maps and returns ``(shape_logits (B, 3),
    size_logits (B, 2))``, classes in the order of ``SHAPE_CLASSES`` and ``SIZE_CLASSES``. Flattening
    (no global pooling) keeps the absolute extent of the shape, which is what ``size`` is.
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32), hidden: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 1
        for c in channels:
            layers += [nn.Conv2d(previous, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            previous = c
        self.features = nn.Sequential(*layers)
        side = INPUT_SIZE // 2 ** len(channels)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(previous * side * side, hidden), nn.ReLU())
        self.shape_head = nn.Linear(hidden, len(SHAPE_CLASSES))
        self.size_head = nn.Linear(hidden, len(SIZE_CLASSES))
        self.config = {"channels": list(channels), "hidden": hidden}

    def forward(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(self.features(mask))
        return self.shape_head(h), self.size_head(h)


def save_classifier(model: ShapeClassifier, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``model``'s weights (float32) and its config to a safetensors file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(model.config), **(metadata or {})})


@functools.lru_cache(maxsize=4)
def load_classifier(path: str | Path = WEIGHTS_PATH) -> ShapeClassifier:
    """The trained classifier from a safetensors file, in eval mode; cached, loaded on first use."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path={str(path)!r} is not a file; train one with scripts/train_eval_classifier.py")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads((f.metadata() or {}).get("config", "{}"))
    model = ShapeClassifier(tuple(config.get("channels", (8, 16, 32))), config.get("hidden", 64))
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval().requires_grad_(False)


def classifier_metadata(path: str | Path = WEIGHTS_PATH) -> dict[str, str]:
    """The metadata stored with the weights (training seeds, held-out accuracies, ...)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def predict_shape_size(
    images: torch.Tensor, seg: Segmentation | None = None, model: ShapeClassifier | None = None
) -> tuple[list[str], list[str]]:
    """Shape and size names of each image; ``"none"`` for both where no shape was found."""
    if seg is None:
        seg = segment(images)
    model = load_classifier() if model is None else model
    with torch.no_grad():
        shape_logits, size_logits = model(soft_mask(images, seg))
    shapes = [SHAPE_CLASSES[i] for i in shape_logits.argmax(dim=1).tolist()]
    sizes = [SIZE_CLASSES[i] for i in size_logits.argmax(dim=1).tolist()]
    present = seg.has_shape.tolist()
    return (
        [s if p else "none" for s, p in zip(shapes, present, strict=True)],
        [s if p else "none" for s, p in zip(sizes, present, strict=True)],
    )
