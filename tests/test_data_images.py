"""Tests of the training image pipeline (ldm_lib.data.images): config checks, the transform, the
three sources, and unreadable images. Everything is written to tmp_path; nothing downloads."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_lib.data.images import (
    DataConfig,
    ImageTransform,
    UnreadableImageError,
    build_dataset,
    check_cacheable,
    draw_flip,
    item_generator,
)
from ldm_lib.data.shapes import shapes_dataset, shapes_tensors

R = 16
RED = (255, 0, 0)


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def solid(mode: str, size: tuple[int, int], color) -> Image.Image:
    return Image.new(mode, size, color)


# The first half of a PNG of noise: a valid header, so only decoding shows it is broken.
_NOISE_PNG = png_bytes(
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
)
TRUNCATED_PNG = _NOISE_PNG[: len(_NOISE_PNG) // 2]


def write_folder(root: Path, caption_key: str = "text") -> dict[str, str]:
    """An image folder with several modes, sizes and formats, a subfolder, and two broken files.
    Returns {file_name: caption}."""
    (root / "sub").mkdir(parents=True)
    solid("RGB", (40, 24), RED).save(root / "a_red.png")
    solid("RGB", (30, 30), (0, 0, 255)).save(root / "b_blue.jpg", quality=95)
    solid("L", (20, 50), 255).save(root / "c_white_l.png")
    solid("RGB", (17, 17), (0, 255, 0)).convert("P").save(root / "sub" / "d_palette.png")
    solid("RGBA", (24, 24), (0, 0, 0, 0)).save(root / "e_transparent.png")
    (root / "bad.png").write_bytes(b"these bytes are not an image")
    (root / "trunc.png").write_bytes(TRUNCATED_PNG)
    captions = {
        "a_red.png": "red",
        "b_blue.jpg": "blue",
        "c_white_l.png": "white",
        "sub/d_palette.png": "green",
        "e_transparent.png": "transparent",
        "bad.png": "broken",
        "trunc.png": "truncated",
    }
    lines = [json.dumps({"file_name": name, caption_key: text}) for name, text in captions.items()]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return captions


# ========================================================================================= Config


def test_config_defaults_match_the_documented_yaml() -> None:
    expected = dict(
        source="shapes",
        path=None,
        split="train",
        image_column="image",
        caption_column="text",
        num_samples=20000,
        shapes_seed=0,
        resolution=32,
        crop="center",
        random_flip=False,
        on_error="skip",
        cache_latents=False,
    )
    assert vars(DataConfig()) == expected
    assert DataConfig.from_dict(expected) == DataConfig()


def test_config_source_message() -> None:
    message = "data.source='foo' is not supported; expected one of 'shapes', 'hub', 'imagefolder'"
    with pytest.raises(ValueError, match=re.escape(message)):
        DataConfig(source="foo")


@pytest.mark.parametrize(
    "fields, pattern",
    [
        (dict(source="hub"), r"data\.path=None with data\.source='hub'"),
        (dict(source="imagefolder"), r"data\.path=None with data\.source='imagefolder'"),
        (dict(path="x"), r"data\.path='x' is set but data\.source='shapes'"),
        (dict(source="hub", path=""), r"data\.path='' must be a non-empty"),
        (dict(resolution=7), r"data\.resolution=7 is out of range"),
        (dict(resolution=32.0), r"data\.resolution=32\.0 must be an integer"),
        (dict(resolution=True), r"data\.resolution=True must be an integer"),
        (dict(num_samples=0), r"data\.num_samples=0 is out of range"),
        (dict(num_samples=None), r"data\.num_samples=None with data\.source='shapes'"),
        (dict(shapes_seed=-1), r"data\.shapes_seed=-1 is out of range"),
        (dict(crop="middle"), r"data\.crop='middle' is not supported; expected one of 'center', 'random'"),
        (
            dict(on_error="ignore"),
            r"data\.on_error='ignore' is not supported; expected one of 'skip', 'stop'",
        ),
        (dict(random_flip="yes"), r"data\.random_flip='yes' must be true or false"),
        (dict(cache_latents=1), r"data\.cache_latents=1 must be true or false"),
        (dict(split="test"), r"data\.split='test' is not supported with data\.source='shapes'"),
        (dict(source="hub", path="x", image_column=""), r"data\.image_column='' must be a non-empty"),
        (dict(source="hub", path="x", caption_column=None), r"data\.caption_column=None must be a non-empty"),
        (dict(crop="random", cache_latents=True), r"data\.crop='random' cannot be combined with cached"),
    ],
)
def test_config_rejects_bad_values(fields: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        DataConfig(**fields)


def test_config_accepts_valid_variants() -> None:
    config = DataConfig(source="hub", path=Path("some/folder"), num_samples=None, split="validation")
    assert config.path == "some/folder" and config.num_samples is None
    assert DataConfig(num_samples=np.int64(5)).num_samples == 5
    check_cacheable(DataConfig(random_flip=True))  # flips are cacheable (both orientations stored)
    with pytest.raises(ValueError, match=r"data\.crop='random'"):
        check_cacheable(DataConfig(crop="random"))
    with pytest.raises(ValueError, match=r"data option='resolutoin' is not supported; expected one of"):
        DataConfig.from_dict({"resolutoin": 32})


# ====================================================================================== Transform


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK", "1", "LA"])
def test_black_and_white_map_to_minus_one_and_one(mode: str) -> None:
    transform = ImageTransform(R)
    for value, expected in ((0, -1.0), (255, 1.0)):
        image = Image.new("RGB", (3 * R, 2 * R), (value,) * 3).convert(mode)  # any size, any mode
        pixels = transform(image)
        assert pixels.shape == (3, R, R) and pixels.dtype == torch.float32
        assert torch.equal(pixels, torch.full((3, R, R), expected)), (mode, value)


def test_values_are_u_over_127_5_minus_one() -> None:
    values = np.arange(R * R * 3, dtype=np.uint8).reshape(R, R, 3)
    pixels = ImageTransform(R)(Image.fromarray(values))  # R x R: no resize, no crop
    expected = torch.from_numpy(values.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(pixels, expected, atol=1e-7)


def test_transparency_is_composited_over_white() -> None:
    transform = ImageTransform(R)
    clear = Image.new("RGBA", (R, R), (0, 0, 0, 0))  # black where nothing is visible
    assert torch.equal(transform(clear), torch.ones(3, R, R))
    half = Image.new("RGBA", (R, R), (255, 0, 0, 128))  # red at 50% over white: (255, 127, 127)
    px = transform(half)[:, 0, 0] * 127.5 + 127.5
    assert torch.allclose(px, torch.tensor([255.0, 127.0, 127.0]), atol=1.0)
    palette = Image.new("P", (R, R), 0)
    palette.info["transparency"] = 0  # palette entry 0 (black) is transparent
    assert torch.equal(transform(palette), torch.ones(3, R, R))


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    values = np.zeros((R, R), dtype=np.uint16)
    values[1], values[2] = 32896, 65535  # 128 * 257: mid grey; the 16-bit maximum
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    pixels = ImageTransform(R)(image)
    # PIL's own convert("RGB") would clip 32896 to 255, white.
    expected = torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]).expand(3, 3)
    assert torch.allclose(pixels[:, :3, 0], expected, atol=1e-6)


def test_center_crop_takes_the_middle() -> None:
    thirds = np.zeros((R, 3 * R, 3), dtype=np.uint8)  # height R: no resize, only the crop
    thirds[:, :R], thirds[:, R : 2 * R], thirds[:, 2 * R :] = RED, (0, 255, 0), (0, 0, 255)
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, R, R)
    assert torch.equal(ImageTransform(R)(Image.fromarray(thirds)), green)
    assert torch.equal(ImageTransform(R)(Image.fromarray(thirds.transpose(1, 0, 2).copy())), green)


def test_resize_short_side_then_centre() -> None:
    # 64 x 32, black left half, white right half -> resized to 32 x 16 -> columns 8..23 kept.
    image = np.zeros((32, 64, 3), dtype=np.uint8)
    image[:, 32:] = 255
    pixels = ImageTransform(R)(Image.fromarray(image))
    assert pixels.shape == (3, R, R)
    assert torch.allclose(pixels[:, :, :6], torch.tensor(-1.0), atol=0.02)
    assert torch.allclose(pixels[:, :, -6:], torch.tensor(1.0), atol=0.02)
    assert ImageTransform(R).resize(Image.new("RGB", (50, 20))).size == (40, 16)
    assert ImageTransform(R).resize(Image.new("RGB", (8, 9))).size == (16, 18)  # upscaling too


def test_random_crop_is_reproducible_and_covers_the_range() -> None:
    ramp = np.tile(np.arange(3 * R, dtype=np.uint8)[None, :, None] * 5, (R, 1, 3))  # value = 5 * column
    image = Image.fromarray(ramp)
    transform = ImageTransform(R, crop="random")
    lefts = []
    for seed in range(60):
        a = transform(image, torch.Generator().manual_seed(seed))
        b = transform(image, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)
        left = round((float(a[0, 0, 0]) + 1) * 127.5 / 5)
        assert torch.allclose(a[0, 0], (torch.arange(left, left + R) * 5.0) / 127.5 - 1)  # a real window
        lefts.append(left)
    assert min(lefts) >= 0 and max(lefts) <= 2 * R
    assert len(set(lefts)) > 15  # uniform over 33 offsets, not a constant


def test_flip_is_a_fair_reproducible_coin() -> None:
    asymmetric = np.zeros((R, R, 3), dtype=np.uint8)
    asymmetric[:, : R // 4] = 255
    image = Image.fromarray(asymmetric)
    plain = ImageTransform(R)(image)
    transform = ImageTransform(R, random_flip=True)
    flips = 0
    for seed in range(200):
        out = transform(image, torch.Generator().manual_seed(seed))
        assert torch.equal(out, transform(image, torch.Generator().manual_seed(seed)))
        flipped = torch.equal(out, plain.flip(-1))
        assert flipped or torch.equal(out, plain)
        assert flipped == draw_flip(torch.Generator().manual_seed(seed))  # the documented coin
        flips += flipped
    assert 70 < flips < 130
    assert torch.equal(transform(image, flip=True), plain.flip(-1))  # forced: no generator needed


def test_random_transform_needs_a_generator() -> None:
    with pytest.raises(ValueError, match="generator=None"):
        ImageTransform(R, random_flip=True)(Image.new("RGB", (R, R)))
    with pytest.raises(ValueError, match="generator=None"):
        ImageTransform(R, crop="random")(Image.new("RGB", (R, R)))
    with pytest.raises(ValueError, match="crop='left' is not supported"):
        ImageTransform(R, crop="left")


def test_item_generator_depends_on_seed_epoch_and_index() -> None:
    def draw(*key: int) -> float:
        return float(torch.rand((), generator=item_generator(*key)))

    assert draw(0, 0, 5) == draw(0, 0, 5)
    assert len({draw(0, 0, 5), draw(1, 0, 5), draw(0, 1, 5), draw(0, 0, 6)}) == 4


# ========================================================================================= Shapes


def test_shapes_source_equals_the_shapes_tensors() -> None:
    dataset = build_dataset(DataConfig(num_samples=12, resolution=R, shapes_seed=3))
    images, captions, _ = shapes_tensors(12, R, seed=3)
    assert len(dataset) == 12
    for i in range(12):
        item = dataset[i]
        assert torch.equal(item["pixel_values"], images[i])  # rendered at R directly: exact
        assert item["caption"] == captions[i] and item["index"] == i
    assert dataset.skipped == []
    assert "shapes" in repr(dataset) and "12 images" in repr(dataset) and "0 unreadable" in repr(dataset)
    with pytest.raises(IndexError):
        dataset[12]


def test_shapes_flips_are_deterministic_per_seed_and_epoch() -> None:
    config = DataConfig(num_samples=24, resolution=R, random_flip=True)
    images, _, _ = shapes_tensors(24, R)
    a, b, other = build_dataset(config, seed=5), build_dataset(config, seed=5), build_dataset(config, seed=6)

    def choices(dataset) -> list[bool]:
        out = []
        for i in range(len(dataset)):
            x = dataset[i]["pixel_values"]
            assert torch.equal(x, images[i]) or torch.equal(x, images[i].flip(-1))
            out.append(not torch.equal(x, images[i]))
        return out

    first = choices(a)
    assert first == choices(b)  # a rebuilt (resumed) run sees the same flips
    assert first != choices(other)
    a.set_epoch(1)
    assert choices(a) != first  # a new epoch, new coins
    assert 0 < sum(first) < 24


# =================================================================================== Image folder


def test_imagefolder_skips_unreadable_images_and_reports_them(tmp_path: Path) -> None:
    captions = write_folder(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\) of 7") as record:
        dataset = build_dataset(DataConfig(source="imagefolder", path=str(tmp_path), resolution=R))
    assert str(tmp_path / "bad.png") in str(record[0].message)
    assert dataset.skipped == [str(tmp_path / "bad.png"), str(tmp_path / "trunc.png")]
    assert len(dataset) == 5 and "2 unreadable skipped" in dataset.describe()
    by_caption = {dataset[i]["caption"]: dataset[i] for i in range(len(dataset))}
    assert set(by_caption) == set(captions.values()) - {"broken", "truncated"}
    # Indices are positions in the sorted file list; the broken ones (2: bad.png, 6: trunc.png) are gone.
    assert [dataset[i]["index"] for i in range(5)] == [0, 1, 3, 4, 5]
    assert torch.equal(
        by_caption["red"]["pixel_values"], torch.tensor([1.0, -1, -1])[:, None, None].expand(3, R, R)
    )
    assert torch.equal(by_caption["white"]["pixel_values"], torch.ones(3, R, R))
    assert torch.equal(by_caption["transparent"]["pixel_values"], torch.ones(3, R, R))
    green = by_caption["green"]["pixel_values"]
    assert torch.allclose(green, torch.tensor([-1.0, 1, -1])[:, None, None], atol=0.01)
    blue = by_caption["blue"]["pixel_values"]  # JPEG: close, not exact
    assert torch.allclose(blue, torch.tensor([-1.0, -1, 1])[:, None, None], atol=0.05)


def test_imagefolder_stop_raises_naming_the_file(tmp_path: Path) -> None:
    write_folder(tmp_path)
    config = DataConfig(source="imagefolder", path=str(tmp_path), resolution=R, on_error="stop")
    with pytest.raises(UnreadableImageError, match=re.escape(str(tmp_path / "bad.png"))) as info:
        build_dataset(config)
    assert isinstance(info.value, ValueError) and "data.on_error='stop'" in str(info.value)
    (tmp_path / "bad.png").unlink()
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    (tmp_path / "metadata.jsonl").write_text("\n".join(line for line in lines if "bad.png" not in line))
    with pytest.raises(UnreadableImageError, match=r"trunc\.png.*(truncated|OSError)"):
        build_dataset(config)  # truncation is only seen when decoding; the scan decodes


def test_imagefolder_caption_column_and_cap(tmp_path: Path) -> None:
    write_folder(tmp_path, caption_key="caption")
    config = DataConfig(
        source="imagefolder", path=str(tmp_path), resolution=R, caption_column="caption", num_samples=3
    )
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) of 3"):
        dataset = build_dataset(config)  # the first 3 sorted files: a_red.png, b_blue.jpg, bad.png
    assert [dataset[i]["caption"] for i in range(len(dataset))] == ["red", "blue"]
    with pytest.raises(ValueError, match=r"line 1 has no 'text' \(data\.caption_column='text'\); its keys"):
        build_dataset(DataConfig(source="imagefolder", path=str(tmp_path), resolution=R))


def test_imagefolder_metadata_problems_are_clear_errors(tmp_path: Path) -> None:
    def config() -> DataConfig:
        return DataConfig(source="imagefolder", path=str(tmp_path), resolution=R)

    with pytest.raises(ValueError, match=r"is not a folder"):
        build_dataset(DataConfig(source="imagefolder", path=str(tmp_path / "nowhere")))
    tmp_path.mkdir(exist_ok=True)
    solid("RGB", (R, R), RED).save(tmp_path / "a.png")
    solid("RGB", (R, R), RED).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"has no metadata\.jsonl; expected one JSON object a line"):
        build_dataset(config())
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"1 image\(s\) in .* have no line in metadata\.jsonl: 'b\.png'"):
        build_dataset(config())
    meta.write_text("\n".join(json.dumps({"file_name": n, "text": "x"}) for n in ("a.png", "b.png", "c.png")))
    with pytest.raises(ValueError, match=r"names 1 file\(s\) that do not exist .*'c\.png'"):
        build_dataset(config())
    meta.write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 2 is not valid JSON"):
        build_dataset(config())
    meta.write_text("\n".join(json.dumps({"file_name": n, "text": "x"}) for n in ("a.png", "./a.png")))
    with pytest.raises(ValueError, match=r"line 2: file_name './a.png' appears twice"):
        build_dataset(config())
    meta.write_text("\n".join(json.dumps({"file_name": n, "text": "x"}) for n in ("a.png", "../b.png")))
    with pytest.raises(ValueError, match=r"must be relative, inside the folder"):
        build_dataset(config())
    meta.write_text("\n".join(json.dumps({"file_name": n, "text": 3}) for n in ("a.png", "b.png")))
    with pytest.raises(ValueError, match=r"caption 'text' is 3; expected a string"):
        build_dataset(config())
    (tmp_path / ".hidden").mkdir()
    solid("RGB", (R, R), RED).save(tmp_path / ".hidden" / "x.png")  # ignored, like editor backups
    meta.write_text("\n".join(json.dumps({"file_name": n, "text": n}) for n in ("b.png", "a.png")))
    dataset = build_dataset(config())
    assert [dataset[i]["caption"] for i in range(2)] == ["a.png", "b.png"]  # sorted by file name


# ===================================================================================== Hub (local)


def save_hub(tmp_path: Path) -> Path:
    """A DatasetDict saved with save_to_disk: train with two broken rows, test with one row."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "n": datasets.Value("int32")}
    )
    train = datasets.Dataset.from_dict(
        {
            "image": [
                solid("RGB", (2 * R, R), RED),
                {"bytes": png_bytes(solid("L", (R, 3 * R), 0)), "path": None},
                {"bytes": b"garbage", "path": None},
                {"bytes": png_bytes(solid("RGB", (R, R), (0, 0, 255)), "JPEG"), "path": "photo.jpg"},
                {"bytes": TRUNCATED_PNG, "path": "cut.png"},
            ],
            "caption": ["red", "black", "broken", "blue", "truncated"],
            "n": [0, 1, 2, 3, 4],
        },
        features=features,
    )
    test = datasets.Dataset.from_dict(
        {"image": [solid("RGB", (R, R), (255, 255, 255))], "caption": ["white"], "n": [0]}, features=features
    )
    path = tmp_path / "hub"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(path))
    return path


def test_hub_folder_loads_by_path_with_skip_and_split(tmp_path: Path) -> None:
    path = str(save_hub(tmp_path))
    config = DataConfig(source="hub", path=path, caption_column="caption", resolution=R)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\) of 5.*row 2"):
        dataset = build_dataset(config)
    assert dataset.skipped == [f"{path!r}[row 2]", f"{path!r}[row 4] (cut.png)"]
    assert [dataset[i]["index"] for i in range(3)] == [0, 1, 3]
    assert [dataset[i]["caption"] for i in range(3)] == ["red", "black", "blue"]
    assert torch.equal(dataset[0]["pixel_values"], torch.tensor([1.0, -1, -1])[:, None, None].expand(3, R, R))
    assert torch.equal(dataset[1]["pixel_values"], -torch.ones(3, R, R))
    test = build_dataset(
        DataConfig(source="hub", path=path, split="test", caption_column="caption", resolution=R)
    )
    assert len(test) == 1 and test[0]["caption"] == "white"
    capped = build_dataset(
        DataConfig(source="hub", path=path, caption_column="caption", resolution=R, num_samples=2)
    )
    assert len(capped) == 2 and capped.skipped == []


def test_hub_errors_name_rows_columns_and_splits(tmp_path: Path) -> None:
    path = str(save_hub(tmp_path))
    stop = DataConfig(source="hub", path=path, caption_column="caption", resolution=R, on_error="stop")
    with pytest.raises(UnreadableImageError, match=r"cannot read image .*\[row 2\]"):
        build_dataset(stop)
    with pytest.raises(
        ValueError,
        match=r"data\.caption_column='text' is not a column .* its columns: \['image', 'caption', 'n'\]",
    ):
        build_dataset(DataConfig(source="hub", path=path, resolution=R))
    with pytest.raises(
        ValueError, match=r"data\.split='validation' is not a split .* its splits: \['train', 'test'\]"
    ):
        build_dataset(DataConfig(source="hub", path=path, split="validation", caption_column="caption"))


def test_hub_shapes_dataset_matches_the_shapes_source(tmp_path: Path) -> None:
    shapes_dataset(6, resolution=R, seed=2).save_to_disk(str(tmp_path / "shapes"))  # a plain Dataset
    hub = build_dataset(DataConfig(source="hub", path=str(tmp_path / "shapes"), resolution=R))
    direct = build_dataset(DataConfig(num_samples=6, resolution=R, shapes_seed=2))
    assert len(hub) == 6
    for i in range(6):
        assert torch.equal(hub[i]["pixel_values"], direct[i]["pixel_values"])
        assert hub[i]["caption"] == direct[i]["caption"]
    assert "hub" in hub.describe() and "6 images" in hub.describe()


def test_dataloader_workers_do_not_change_the_items(tmp_path: Path) -> None:
    write_folder(tmp_path)
    config = DataConfig(
        source="imagefolder", path=str(tmp_path), resolution=R, crop="random", random_flip=True
    )
    with pytest.warns(UserWarning, match="skipped 2"):
        dataset = build_dataset(config, seed=1)

    def batches(workers: int) -> list[dict]:
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers)
        return list(loader)

    dataset.set_epoch(2)
    serial, parallel = batches(0), batches(2)
    assert len(serial) == 3
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
        assert torch.equal(a["index"], b["index"])
