"""Tests of ldm_lib.eval: prompt adherence on the shapes set, and brightness statistics."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ldm_lib.data.shapes import BACKGROUNDS, COLORS, PALETTE, SHAPES, make_caption, shape_mask, shapes_tensors
from ldm_lib.eval import (
    AdherenceReport,
    ShapeClassifier,
    adherence,
    background_brightness,
    border_brightness,
    brightness,
    brightness_stats,
    classifier_metadata,
    load_classifier,
    luma,
    predict_attributes,
    segment,
    soft_mask,
)
from ldm_lib.eval.classifier import save_classifier

ATTRIBUTES = ("size", "color", "shape", "background")
SEED = 17  # the classifier was trained on seeds 1000+ and held out on 999: these renders are new


@pytest.fixture(scope="module")
def renders32():
    return shapes_tensors(300, 32, seed=SEED)


@pytest.fixture(scope="module")
def renders64():
    return shapes_tensors(120, 64, seed=SEED + 1)


def degrade(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Blur (3x3 box), washed-out colours (towards grey), a colour cast and pixel noise."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    x = 0.85 * x + torch.tensor([0.05, -0.05, 0.0]).view(1, 3, 1, 1)
    x = x + 0.1 * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


def swap(attributes: dict, name: str) -> dict:
    """The same attributes with ``name`` changed to another value that still gives a valid caption."""
    a = dict(attributes)
    if name == "size":
        a["size"] = "large" if a["size"] == "small" else "small"
    elif name == "shape":
        a["shape"] = SHAPES[(SHAPES.index(a["shape"]) + 1) % len(SHAPES)]
    elif name == "color":
        a["color"] = next(c for c in COLORS if c not in (a["color"], a["background"]))
    else:
        a["background"] = next(b for b in BACKGROUNDS if b not in (a["background"], a["color"]))
    return a


def flat(rgb: tuple[int, int, int], n: int = 4, side: int = 32) -> torch.Tensor:
    """``n`` images of one palette colour, in [-1, 1]."""
    return (torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1).view(1, 3, 1, 1).expand(n, 3, side, side)


# --- adherence -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["renders32", "renders64"])
def test_renders_adhere_to_their_captions(which: str, request: pytest.FixtureRequest) -> None:
    images, captions, attributes = request.getfixturevalue(which)
    report = adherence(images, captions)
    assert isinstance(report, AdherenceReport) and report.n == len(captions)
    for name in ATTRIBUTES:
        assert getattr(report, name) >= 0.98, (which, name, report)
    assert report.all >= 0.98
    assert report.attribute == pytest.approx(sum(getattr(report, n) for n in ATTRIBUTES) / 4)
    assert report.targets == [{k: a[k] for k in ATTRIBUTES} for a in attributes]
    assert set(report.as_dict()) == {*ATTRIBUTES, "all", "attribute"}


def test_predict_attributes_names_the_rendered_attributes(renders32) -> None:
    images, _, attributes = renders32
    predictions = predict_attributes(images[:60])
    assert all(set(p) == set(ATTRIBUTES) for p in predictions)
    right = sum(p == {k: a[k] for k in ATTRIBUTES} for p, a in zip(predictions, attributes, strict=False))
    assert right >= 59


@pytest.mark.parametrize("name", ATTRIBUTES)
def test_wrong_prompts_score_zero_on_the_swapped_attribute(name: str, renders32) -> None:
    images, _, attributes = renders32
    prompts = [make_caption(swap(a, name)) for a in attributes]
    report = adherence(images, prompts)
    assert getattr(report, name) <= 0.02, report
    for other in ATTRIBUTES:
        if other != name:
            assert getattr(report, other) >= 0.98, (other, report)
    assert report.all <= 0.02
    # Per-image flags agree with the accuracies.
    assert sum(report.correct[name]) / report.n == getattr(report, name)


@pytest.mark.parametrize("which", ["renders32", "renders64"])
def test_degraded_renders_still_score_high(which: str, request: pytest.FixtureRequest) -> None:
    images, captions, _ = request.getfixturevalue(which)
    noisy = degrade(images, seed=3)
    assert (noisy - images).abs().mean() > 0.05  # really degraded
    report = adherence(noisy, captions)
    for name in ATTRIBUTES:
        assert getattr(report, name) >= 0.95, (which, name, report)


def test_off_palette_colours_map_to_the_nearest_palette_colour(renders32) -> None:
    images, captions, attributes = renders32
    # Darken everything by 25%: white shapes become light grey on e.g. black, still "white".
    report = adherence(images * 0.75 - 0.1, captions)
    assert report.color >= 0.95 and report.background >= 0.95


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_pure_background_has_no_shape(background: str) -> None:
    g = torch.Generator().manual_seed(0)
    images = (flat(PALETTE[background]) + 0.03 * torch.randn(4, 3, 32, 32, generator=g)).clamp(-1, 1)
    for p in predict_attributes(images):
        assert p == {"size": "none", "color": "none", "shape": "none", "background": background}
    colour = next(c for c in COLORS if c != background)
    report = adherence(images, [f"a small {colour} circle on a {background} background"] * 4)
    assert report.background == 1.0
    assert report.color == report.shape == report.size == report.all == 0.0
    assert report.attribute == 0.25


def test_segmentation_recovers_the_rendered_mask(renders32) -> None:
    images, _, attributes = renders32
    seg = segment(images[:50])
    masks = torch.stack([torch.from_numpy(shape_mask(a, 32).copy()) for a in attributes[:50]])
    assert torch.equal(seg.foreground, masks)
    assert bool(seg.has_shape.all())
    # On a clean render, the coverage map is exactly the mask (1 inside, 0 outside).
    assert torch.equal(soft_mask(images[:50], seg)[:, 0], masks.float())
    expected = torch.tensor([PALETTE[a["color"]] for a in attributes[:50]]) / 255
    assert torch.allclose(seg.shape_rgb, expected, atol=1e-6)


# --- the classifier and its weights ----------------------------------------------------------


def test_shipped_classifier_is_cached_and_reports_its_accuracy() -> None:
    model = load_classifier()
    assert load_classifier() is model  # loaded once
    assert not model.training
    held_out = json.loads(classifier_metadata()["held_out_accuracy"])
    assert held_out["clean_32"]["both"] >= 0.99 and held_out["augmented_32"]["both"] >= 0.97


def test_classifier_round_trip_and_model_argument(tmp_path, renders32) -> None:
    torch.manual_seed(0)
    untrained = ShapeClassifier()
    path = tmp_path / "c.safetensors"
    save_classifier(untrained, path, {"note": "test"})
    loaded = load_classifier(path)
    mask = torch.rand(5, 1, 32, 32)
    for a, b in zip(untrained(mask), loaded(mask), strict=True):
        assert torch.equal(a, b)
    assert classifier_metadata(path)["note"] == "test"
    # The model argument is used: an untrained classifier does much worse on shape than the shipped one.
    images, captions, _ = renders32
    assert adherence(images, captions, model=loaded).shape < 0.9
    with pytest.raises(ValueError, match="is not a file"):
        load_classifier(tmp_path / "missing.safetensors")


# --- brightness ------------------------------------------------------------------------------


def test_brightness_of_flat_images() -> None:
    assert torch.equal(brightness(flat(PALETTE["black"])), torch.zeros(4))
    assert torch.allclose(brightness(flat(PALETTE["white"])), torch.ones(4))
    assert brightness(flat(PALETTE["gray"], 1)).item() == pytest.approx(128 / 255, abs=1e-6)
    # Rec. 601 weights: pure red, green, blue.
    for name, weight in (("red", 0.299), ("green", 0.587), ("blue", 0.114)):
        assert brightness(flat(PALETTE[name], 1)).item() == pytest.approx(weight, abs=1e-6)
    # Values beyond [-1, 1] (a decoder's overshoot) are clamped.
    assert brightness(torch.full((1, 3, 8, 8), 1.5)).item() == pytest.approx(1.0)
    assert luma(flat(PALETTE["white"], 2, 16)).shape == (2, 16, 16)


def test_brightness_stats() -> None:
    half = torch.full((1, 3, 10, 10), -1.0)
    half[..., 5:] = 1.0  # half black, half white
    images = torch.cat([flat(PALETTE["black"], 1, 10), half, flat(PALETTE["white"], 1, 10)])
    stats = brightness_stats(images)
    assert stats["mean"] == pytest.approx(0.5) and stats["q50"] == pytest.approx(0.5)
    assert stats["min"] == 0.0 and stats["max"] == pytest.approx(1.0)
    assert stats["std"] == pytest.approx((2 / 3) ** 0.5 / 2)
    assert stats["near_black"] == pytest.approx(0.5) and stats["near_white"] == pytest.approx(0.5)
    assert stats["q05"] <= stats["q25"] <= stats["q50"] <= stats["q75"] <= stats["q95"]
    gray = brightness_stats(flat(PALETTE["gray"]))
    assert gray["near_black"] == gray["near_white"] == 0.0 and gray["std"] == 0.0


def test_background_brightness_matches_the_prompt_on_renders(renders32) -> None:
    images, captions, attributes = renders32
    result = background_brightness(images, captions)
    assert set(result) == set(BACKGROUNDS)
    assert result["black"]["target"] == 0.0 and result["white"]["target"] == pytest.approx(1.0)
    for stats in result.values():
        assert abs(stats["error"]) < 1e-6 and stats["abs_error"] < 1e-6 and stats["n"] > 50
    assert sum(s["n"] for s in result.values()) == len(captions)
    # A model that cannot leave mid-grey: pixels pulled halfway to 0 (grey) in [-1, 1].
    washed = background_brightness(images * 0.5, captions)
    assert washed["black"]["error"] == pytest.approx(0.25, abs=1e-6)
    assert washed["white"]["error"] == pytest.approx(-0.25, abs=1e-6)
    assert abs(washed["gray"]["error"]) < 0.01
    lumas = {"black": 0.0, "white": 1.0, "gray": 128 / 255}
    expected = torch.tensor([lumas[a["background"]] for a in attributes[:8]])
    assert torch.allclose(border_brightness(images[:8]), expected, atol=1e-6)


# --- bad input -------------------------------------------------------------------------------


def test_bad_prompts_raise(renders32) -> None:
    images, captions, _ = renders32
    bad = list(captions[:4])
    bad[2] = "a small purple circle on a black background"
    with pytest.raises(ValueError, match="purple circle"):
        adherence(images[:4], bad)
    with pytest.raises(ValueError, match="a red square"):
        adherence(images[:1], ["a red square"])
    with pytest.raises(ValueError, match="equals background"):
        adherence(images[:1], ["a small white circle on a white background"])
    with pytest.raises(ValueError, match="3 entries but images has 4"):
        adherence(images[:4], captions[:3])
    with pytest.raises(ValueError, match="list of 1 captions"):
        adherence(images[:1], captions[0])
    with pytest.raises(ValueError, match="purple"):
        background_brightness(images[:1], ["a small purple circle on a black background"])


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(3, 32, 32), r"\(B, 3, H, W\)"),
        (torch.zeros(2, 1, 32, 32), r"\(B, 3, H, W\)"),
        (torch.zeros(0, 3, 32, 32), "B >= 1"),
        (torch.zeros(2, 3, 32, 16), "square"),
        (torch.zeros(2, 3, 4, 4), "at least 8x8"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "float"),
        (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
        (torch.zeros(2, 3, 32, 32).numpy(), "torch.Tensor"),
    ],
)
def test_bad_images_raise(images, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        predict_attributes(images)


def test_bad_brightness_arguments_raise() -> None:
    with pytest.raises(ValueError, match="dark"):
        brightness_stats(flat(PALETTE["gray"]), dark=1.5)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        brightness(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="border"):
        border_brightness(flat(PALETTE["gray"], 1, 8), border=5)
