"""The embedded dataset: coloured shapes with captions, generated on the fly.

Every notebook, test and tiny model of the course trains on this set, because it needs no
download and makes every concept measurable:

- **Prompt adherence can be scored exactly.** Each image is one flat-coloured shape on a flat
  background, drawn with hard edges from a public ``PALETTE``; every caption follows one grammar,
  ``"a {size} {color} {shape} on a {background} background"``. An evaluator can parse a prompt
  with :func:`parse_caption` and check a generated image pixel by pixel against the palette.
- **Brightness extremes exist.** Backgrounds include pure black and pure white. A model trained
  with the standard noise schedule struggles to reach them (its mean brightness is pulled to
  grey); offset noise and zero terminal SNR fix that (Lin et al. 2023, arXiv 2305.08891), and this
  set is where the difference is visible.

Sample ``i`` of seed ``s`` is a pure function of ``(i, s)``: its random draws come from
``numpy.random.default_rng([s, i])``, so indices are independent, any subset can be generated in
any order, and the set has no fixed length. Images can be rendered at any resolution from the
same attributes (the geometry is stored as fractions of the image side).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .._checks import check_choice, check_number

if TYPE_CHECKING:  # datasets is slow to import; only shapes_dataset needs it.
    import datasets

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SIZES = ("small", "large")
COLORS = ("red", "green", "blue", "yellow", "white", "black")
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("black", "white", "gray")

# Radius (fraction of the image side) drawn uniformly per size. The ranges are disjoint, so for a
# given shape every "large" one has at least 2.25x the area of every "small" one.
RADIUS_RANGE: dict[str, tuple[float, float]] = {"small": (0.14, 0.20), "large": (0.30, 0.38)}
# Gap kept between the shape's bounding box and the image border. It exceeds half a pixel at the
# smallest resolution (1/16 at 8 px), so the corner pixels are always background.
MARGIN = 0.07
# Below 8 px a shape is a handful of pixels; even at 8, a small triangle (inradius 0.07, about
# half a pixel) can miss every pixel centre (about 1 sample in 5000). Train at 32 or more.
MIN_RESOLUTION = 8

CAPTION_TEMPLATE = "a {size} {color} {shape} on a {background} background"
ATTRIBUTE_NAMES = ("size", "color", "shape", "background")
GEOMETRY_NAMES = ("center_x", "center_y", "radius")

# An invisible shape (white on white) would teach nothing, so those pairs are left out.
_PAIRS = tuple((c, b) for c in COLORS for b in BACKGROUNDS if c != b)


def _check_int(option: str, value: Any, low: int) -> int:
    """An ``int`` (numpy integers accepted, as samplers pass them) that is at least ``low``."""
    if isinstance(value, np.integer):
        value = int(value)
    check_number(option, value, low=low, integer=True)
    return value


def _check_names(attributes: dict[str, Any]) -> None:
    """Check the four named attributes, and that shape and background colours differ."""
    allowed = {"size": SIZES, "color": COLORS, "shape": SHAPES, "background": BACKGROUNDS}
    for name in ATTRIBUTE_NAMES:
        if name not in attributes:
            raise ValueError(f"attributes has no {name!r}; expected keys {ATTRIBUTE_NAMES}")
        check_choice(name, attributes[name], allowed[name])
    if attributes["color"] == attributes["background"]:
        raise ValueError(
            f"color={attributes['color']!r} equals background={attributes['background']!r}; "
            "a shape must differ in colour from its background"
        )


def make_caption(attributes: dict[str, Any]) -> str:
    """The caption of ``attributes``: ``"a {size} {color} {shape} on a {background} background"``."""
    _check_names(attributes)
    return CAPTION_TEMPLATE.format(**{name: attributes[name] for name in ATTRIBUTE_NAMES})


def parse_caption(caption: str) -> dict[str, str]:
    """The four named attributes of a caption written by :func:`make_caption` (the inverse).

    Raises ``ValueError`` naming the caption and the grammar when it does not match.
    """
    grammar = (
        f"the grammar {CAPTION_TEMPLATE!r} with size in {SIZES}, color in {COLORS}, "
        f"shape in {SHAPES}, background in {BACKGROUNDS}"
    )
    words = caption.split(" ") if isinstance(caption, str) else []
    # "a", size, color, shape, "on", "a", background, "background"
    if len(words) != 8 or words[0] != "a" or words[4:6] != ["on", "a"] or words[7] != "background":
        raise ValueError(f"caption {caption!r} does not match {grammar}")
    attributes = dict(zip(ATTRIBUTE_NAMES, (words[1], words[2], words[3], words[6]), strict=True))
    try:
        _check_names(attributes)
    except ValueError as error:
        raise ValueError(f"caption {caption!r} does not match {grammar}: {error}") from None
    return attributes


def sample_attributes(index: int, seed: int = 0) -> dict[str, Any]:
    """The attributes of sample ``index`` under ``seed``: names and geometry.

    Keys: ``size``, ``color``, ``shape``, ``background`` (names), and ``center_x``, ``center_y``,
    ``radius`` (fractions of the image side; ``y`` grows downwards, as in image rows). The
    (color, background) pair is uniform over the pairs with different colours; the centre is
    jittered so that the whole shape, plus ``MARGIN``, lies inside the image.
    """
    index = _check_int("index", index, low=0)
    seed = _check_int("seed", seed, low=0)
    # A generator per (seed, index): independent streams, no dependence on generation order.
    rng = np.random.default_rng([seed, index])
    size = SIZES[rng.integers(len(SIZES))]
    color, background = _PAIRS[rng.integers(len(_PAIRS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    radius = float(rng.uniform(*RADIUS_RANGE[size]))
    # Circle, square and triangle all fit in the box centre +- radius.
    low, high = radius + MARGIN, 1.0 - radius - MARGIN
    center_x, center_y = (float(v) for v in rng.uniform(low, high, size=2))
    return {
        "size": size,
        "color": color,
        "shape": shape,
        "background": background,
        "center_x": center_x,
        "center_y": center_y,
        "radius": radius,
    }


def shape_mask(attributes: dict[str, Any], resolution: int = 32) -> np.ndarray:
    """Boolean ``(resolution, resolution)`` mask of the pixels whose centre lies in the shape.

    - circle: the disc of the given radius;
    - square: axis-aligned, half-side = radius;
    - triangle: upward equilateral, inscribed in the circle (apex at ``center_y - radius``,
      base at ``center_y + radius / 2``, half-width ``radius * sqrt(3) / 2``).
    """
    resolution = _check_int("resolution", resolution, low=MIN_RESOLUTION)
    check_choice("shape", attributes.get("shape"), SHAPES)
    for name in GEOMETRY_NAMES:
        check_number(name, attributes.get(name), low=0.0, high=1.0)
    # Pixel centres as fractions of the side; sparse (1, W) and (H, 1) grids broadcast to (H, W).
    centres = (np.arange(resolution) + 0.5) / resolution
    x, y = np.meshgrid(centres, centres, sparse=True)
    dx, dy = x - attributes["center_x"], y - attributes["center_y"]
    r = attributes["radius"]
    shape = attributes["shape"]
    if shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif shape == "square":
        mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    else:  # triangle: below the two slanted sides (slope sqrt(3)) and above the base
        mask = (np.sqrt(3.0) * np.abs(dx) <= dy + r) & (dy <= r / 2)
    return np.broadcast_to(mask, (resolution, resolution))


def render(attributes: dict[str, Any], resolution: int = 32) -> np.ndarray:
    """Draw ``attributes`` as a ``(resolution, resolution, 3)`` uint8 RGB array.

    Hard edges, no anti-aliasing: every pixel is exactly ``PALETTE[color]`` or
    ``PALETTE[background]``, so generated images can be scored against the palette.
    """
    _check_names(attributes)
    mask = shape_mask(attributes, resolution)
    image = np.empty((resolution, resolution, 3), dtype=np.uint8)
    image[...] = PALETTE[attributes["background"]]
    image[mask] = PALETTE[attributes["color"]]
    return image


def shapes_item(index: int, resolution: int = 32, seed: int = 0) -> dict[str, Any]:
    """Sample ``index``: ``{"image": PIL RGB image, "text": caption, "attributes": dict}``."""
    attributes = sample_attributes(index, seed)
    return {
        "image": Image.fromarray(render(attributes, resolution), mode="RGB"),
        "text": make_caption(attributes),
        "attributes": attributes,
    }


def shapes_dataset(num_samples: int, resolution: int = 32, seed: int = 0) -> datasets.Dataset:
    """Samples ``0 .. num_samples-1`` as a Hugging Face ``datasets.Dataset``.

    Columns ``image`` (``datasets.Image``), ``text`` and ``attributes`` (a struct), the same
    ``image`` + ``text`` layout as a hub or ``imagefolder`` dataset, so one pipeline takes all.
    Built in memory with ``Dataset.from_dict``: offline, and nothing is written to the cache.
    """
    import datasets  # deferred: importing datasets takes about a second

    num_samples = _check_int("num_samples", num_samples, low=0)
    resolution = _check_int("resolution", resolution, low=MIN_RESOLUTION)
    items = [shapes_item(i, resolution, seed) for i in range(num_samples)]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "attributes": {
                **{name: datasets.Value("string") for name in ATTRIBUTE_NAMES},
                **{name: datasets.Value("float64") for name in GEOMETRY_NAMES},
            },
        }
    )
    columns = {key: [item[key] for item in items] for key in ("image", "text", "attributes")}
    return datasets.Dataset.from_dict(columns, features=features)


def shapes_tensors(
    num_samples: int, resolution: int = 32, seed: int = 0, start: int = 0
) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """Samples ``start .. start+num_samples-1`` as model-ready tensors, without ``datasets``.

    Returns ``(images, captions, attributes)``: ``images`` is float32 ``(B, 3, H, W)`` in
    ``[-1, 1]`` (``x / 127.5 - 1``, so black is exactly -1 and white exactly 1).
    """
    num_samples = _check_int("num_samples", num_samples, low=0)
    resolution = _check_int("resolution", resolution, low=MIN_RESOLUTION)
    start = _check_int("start", start, low=0)
    attributes = [sample_attributes(i, seed) for i in range(start, start + num_samples)]
    pixels = np.zeros((num_samples, resolution, resolution, 3), dtype=np.uint8)
    for row, attrs in zip(pixels, attributes, strict=True):
        row[...] = render(attrs, resolution)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images.contiguous(), [make_caption(a) for a in attributes], attributes
