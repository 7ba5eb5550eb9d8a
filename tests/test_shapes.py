"""Tests of the embedded shapes dataset (ldm_lib.data.shapes)."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch

from ldm_lib.data.shapes import (
    BACKGROUNDS,
    COLORS,
    PALETTE,
    SHAPES,
    SIZES,
    make_caption,
    parse_caption,
    render,
    sample_attributes,
    shape_mask,
    shapes_dataset,
    shapes_item,
    shapes_tensors,
)

N = 1500  # enough samples for all 96 (size, color, background, shape) combinations
CAPTION = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) "
    rf"on a ({'|'.join(BACKGROUNDS)}) background"
)


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return [sample_attributes(i) for i in range(N)]


# Analytic area / radius**2: disc, square of half-side r, equilateral triangle inscribed in r.
AREA_FACTOR = {"circle": math.pi, "square": 4.0, "triangle": 3 * math.sqrt(3) / 4}
ATTRIBUTE_KEYS = {"size", "color", "shape", "background", "center_x", "center_y", "radius"}


def test_palette_is_rgb_uint8() -> None:
    assert set(COLORS) | set(BACKGROUNDS) <= set(PALETTE)
    assert PALETTE["gray"] == (128, 128, 128)
    assert PALETTE["black"] == (0, 0, 0) and PALETTE["white"] == (255, 255, 255)
    assert len(set(PALETTE.values())) == len(PALETTE)
    for rgb in PALETTE.values():
        assert len(rgb) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in rgb)


def test_deterministic_by_index_and_seed() -> None:
    for index in (0, 7, 12345):
        a, b = shapes_item(index, seed=3), shapes_item(index, seed=3)
        assert a["text"] == b["text"] and a["attributes"] == b["attributes"]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    # Independent of generation order: index 5 alone equals index 5 inside a batch.
    _, captions, attributes = shapes_tensors(8, seed=3)
    assert attributes[5] == sample_attributes(5, seed=3)
    assert captions[5] == shapes_item(5, seed=3)["text"]


def test_different_seeds_and_indices_differ() -> None:
    by_seed = [sample_attributes(i, seed=0) for i in range(20)]
    other_seed = [sample_attributes(i, seed=1) for i in range(20)]
    assert all(a != b for a, b in zip(by_seed, other_seed, strict=True))
    images0, _, _ = shapes_tensors(20, seed=0)
    images1, _, _ = shapes_tensors(20, seed=1)
    assert not torch.equal(images0, images1)
    assert len({(a["center_x"], a["radius"]) for a in by_seed}) == 20


def test_captions_follow_grammar_and_round_trip(samples: list[dict]) -> None:
    for attributes in samples:
        caption = make_caption(attributes)
        match = CAPTION.fullmatch(caption)
        assert match is not None, caption
        parsed = parse_caption(caption)
        assert parsed == {k: attributes[k] for k in ("size", "color", "shape", "background")}
        assert make_caption(parsed) == caption
        assert match.groups() == tuple(parsed.values())


def test_shape_and_background_never_share_a_colour(samples: list[dict]) -> None:
    assert all(a["color"] != a["background"] for a in samples)


def test_all_combinations_appear(samples: list[dict]) -> None:
    seen = {(a["size"], a["color"], a["shape"], a["background"]) for a in samples}
    combos = itertools.product(SIZES, COLORS, SHAPES, BACKGROUNDS)
    valid = {combo for combo in combos if combo[1] != combo[3]}
    assert seen == valid  # 2 * 16 * 3 = 96 combinations, nothing else


def test_pairs_are_roughly_uniform(samples: list[dict]) -> None:
    counts: dict[tuple[str, str], int] = {}
    for a in samples:
        counts[a["color"], a["background"]] = counts.get((a["color"], a["background"]), 0) + 1
    assert len(counts) == 16
    expected = N / 16
    assert all(abs(c - expected) < 0.35 * expected for c in counts.values()), counts


def test_geometry_keeps_shape_inside(samples: list[dict]) -> None:
    for a in samples:
        r = a["radius"]
        assert (0.14 <= r <= 0.20) if a["size"] == "small" else (0.30 <= r <= 0.38)
        for c in (a["center_x"], a["center_y"]):
            assert r < c < 1 - r
    # The centre is jittered, not fixed.
    assert np.std([a["center_x"] for a in samples]) > 0.03


@pytest.mark.parametrize("resolution", [32, 64, 256])
def test_pixels_match_attributes(samples: list[dict], resolution: int) -> None:
    for a in samples[: 200 if resolution < 256 else 30]:
        image = render(a, resolution)
        assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
        fg, bg = np.array(PALETTE[a["color"]]), np.array(PALETTE[a["background"]])
        is_fg = (image == fg).all(-1)
        # Hard edges: every pixel is exactly the shape colour or the background colour.
        assert (is_fg | (image == bg).all(-1)).all()
        row, col = int(a["center_y"] * resolution), int(a["center_x"] * resolution)
        assert (image[row, col] == fg).all(), a
        for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
            assert (corner == bg).all()
        assert np.array_equal(is_fg, shape_mask(a, resolution))
        if resolution >= 64:  # pixel count close to the analytic area
            area = AREA_FACTOR[a["shape"]] * (a["radius"] * resolution) ** 2
            assert is_fg.sum() == pytest.approx(area, rel=0.15)


def test_large_shapes_are_larger_than_small_ones(samples: list[dict]) -> None:
    for shape in SHAPES:
        counts = {size: [] for size in SIZES}
        for a in samples[:400]:
            if a["shape"] == shape:
                counts[a["size"]].append(int(shape_mask(a, 32).sum()))
        assert min(counts["large"]) > 1.5 * max(counts["small"]), (shape, counts)


def test_shapes_are_distinguishable() -> None:
    base = {"size": "large", "color": "red", "background": "black"}
    geometry = {"center_x": 0.5, "center_y": 0.5, "radius": 0.35}
    masks = {s: shape_mask({**base, **geometry, "shape": s}, 64) for s in SHAPES}
    assert masks["square"].sum() > masks["circle"].sum() > masks["triangle"].sum()
    triangle = masks["triangle"]
    rows = triangle.sum(axis=1)
    filled = rows[rows > 0]
    assert filled[0] < filled[-1]  # points up: narrow at the top, wide at the base


def test_item_fields() -> None:
    item = shapes_item(4, resolution=40)
    assert item["image"].mode == "RGB" and item["image"].size == (40, 40)
    assert item["text"] == make_caption(item["attributes"])
    assert set(item["attributes"]) == ATTRIBUTE_KEYS
    assert np.array_equal(np.asarray(item["image"]), render(item["attributes"], 40))


def test_dataset_matches_items() -> None:
    ds = shapes_dataset(6, resolution=16, seed=2)
    assert len(ds) == 6
    assert set(ds.column_names) == {"image", "text", "attributes"}
    assert type(ds.features["image"]).__name__ == "Image"
    for i in range(6):
        row, item = ds[i], shapes_item(i, resolution=16, seed=2)
        assert row["text"] == item["text"]
        assert row["attributes"] == item["attributes"]
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(item["image"]))
    assert len(shapes_dataset(0)) == 0


def test_tensors_agree_with_render() -> None:
    images, captions, attributes = shapes_tensors(5, resolution=24, seed=1, start=10)
    assert images.shape == (5, 3, 24, 24) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert len(captions) == len(attributes) == 5
    for k, (caption, a) in enumerate(zip(captions, attributes, strict=True)):
        assert a == sample_attributes(10 + k, seed=1)
        assert caption == make_caption(a)
        pixels = ((images[k].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        assert np.array_equal(pixels, render(a, 24))
    # Black and white backgrounds map exactly to the ends of [-1, 1].
    white = {**attributes[0], "color": "red", "background": "white"}
    black = {**attributes[0], "color": "red", "background": "black"}
    for a, value in ((white, 1.0), (black, -1.0)):
        x = torch.from_numpy(render(a, 24)).float() / 127.5 - 1.0
        assert x[0, 0].tolist() == [value] * 3
    assert shapes_tensors(0)[0].shape == (0, 3, 32, 32)


@pytest.mark.parametrize(
    ("call", "option"),
    [
        (lambda: render(sample_attributes(0), 4), "resolution"),
        (lambda: shapes_tensors(2, resolution=7), "resolution"),
        (lambda: shapes_dataset(2, resolution=0), "resolution"),
        (lambda: shapes_tensors(-1), "num_samples"),
        (lambda: shapes_dataset(-1), "num_samples"),
        (lambda: sample_attributes(-1), "index"),
        (lambda: sample_attributes(0, seed=-2), "seed"),
        (lambda: make_caption({**sample_attributes(0), "color": "purple"}), "color"),
        (lambda: make_caption({**sample_attributes(0), "size": "huge"}), "size"),
        (lambda: render({**sample_attributes(0), "shape": "hexagon"}, 32), "shape"),
        (lambda: render({**sample_attributes(0), "background": "pink"}, 32), "background"),
        (lambda: make_caption({"color": "red", "background": "red"}), "size"),
        (
            lambda: make_caption(
                {"size": "small", "color": "white", "shape": "circle", "background": "white"}
            ),
            "background",
        ),
    ],
)
def test_bad_input_raises_with_option_name(call, option: str) -> None:
    with pytest.raises(ValueError, match=option):
        call()


def test_bad_input_message_says_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"'purple'.*'red'.*'yellow'"):
        make_caption({**sample_attributes(0), "color": "purple"})
    with pytest.raises(ValueError, match=r"resolution=4.*\[8"):
        render(sample_attributes(0), 4)


@pytest.mark.parametrize(
    "caption",
    [
        "a big red circle on a black background",
        "a small red circle on black background",
        "a small red circle on a black background.",
        "A small red circle on a black background",
        "a small white circle on a white background",
        "",
    ],
)
def test_parse_caption_rejects_other_text(caption: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_caption(caption)
    assert repr(caption) in str(error.value)
    assert "a {size} {color} {shape} on a {background} background" in str(error.value)
