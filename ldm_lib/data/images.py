r"""Training images: one pipeline from a source (shapes, a Hugging Face dataset, an image folder)
to model-ready tensors.

Every source ends in the same item, ``{"pixel_values": (3, R, R) float32 in [-1, 1], "caption":
str, "index": int}``, made by :class:`ImageTransform`:

1. **RGB.** Any PIL mode is converted; transparent pixels are composited over white
   (``ALPHA_BACKGROUND``), because the colour stored under alpha 0 is arbitrary (often black);
   16-bit greyscale is scaled to 8 bits instead of clipped; EXIF orientation is applied.
2. **Resize** the short side to ``R`` with antialiased bicubic resampling (PIL's resize widens the
   filter when downscaling, so thin lines do not alias). The aspect ratio is kept.
3. **Crop** ``R x R``: centred, or at a random offset (augmentation; not cacheable as latents).
4. **Flip** horizontally with probability 1/2 when ``random_flip`` is on.
5. **Scale** to ``[-1, 1]``: :math:`x = u/127.5 - 1` for 8-bit values :math:`u`, so black is
   exactly -1 and white exactly 1, the range the VAE of Rombach et al. 2022 (arXiv 2112.10752)
   and DDPM (Ho et al. 2020, arXiv 2006.11239) expect.

**Randomness is a pure function of (seed, epoch, index).** Item ``index`` in epoch ``epoch`` draws
its crop offset and flip from :func:`item_generator`, a ``torch.Generator`` seeded from those
three numbers, never from the global RNG. A run is reproducible, a resumed run sees the same
augmentations, and results do not depend on DataLoader worker count or order. The trainer's
sampler yields ``(index, epoch)`` keys and calls :meth:`ImageDataset.set_epoch` before fetching
each item (``ldm_lib.training.sampler.EpochItems``), so an epoch boundary inside a batch and
DataLoader workers are both handled.

**Unreadable images are found by an upfront scan.** :func:`build_dataset` decodes every image it
will use once (``Image.load()``, which catches truncated files that ``Image.verify()`` lets
through) before training starts. With ``on_error="stop"`` the first broken one raises
:class:`UnreadableImageError` naming its path (or row); with ``"skip"`` broken ones are left out,
listed in :attr:`ImageDataset.skipped` and counted in a warning. An upfront scan keeps the
dataset's length, its indices and every DataLoader worker consistent, at the price of decoding
everything twice (measured: 0.75 ms per 64x64 PNG on one core; minutes for a million photos).
An image that breaks after the scan raises at once, whatever ``on_error`` says.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .._checks import check_choice, check_number
from .shapes import MIN_RESOLUTION, shapes_item

if TYPE_CHECKING:  # datasets is slow to import; only the hub source needs it.
    import datasets

SOURCES = ("shapes", "hub", "imagefolder")
CROPS = ("center", "random")
ON_ERROR = ("skip", "stop")
# Suffixes (lower case) that the imagefolder source treats as images.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"
# Colour under transparent pixels. White, as most cut-out product and sprite images are shown.
ALPHA_BACKGROUND = (255, 255, 255)
RESAMPLE = Image.Resampling.BICUBIC
_LIST_AT_MOST = 5  # names quoted in an error or warning before "... and N more"


class UnreadableImageError(ValueError):
    """An image that cannot be decoded (corrupt, truncated, not an image); the message names it,
    and ``label`` holds the name alone (a path, or a dataset row)."""

    def __init__(self, message: str, label: str = "") -> None:
        super().__init__(message)
        self.label = label


def _listing(names: list[str]) -> str:
    """``'a', 'b', ... and 3 more``: a short list for messages."""
    shown = ", ".join(repr(n) for n in names[:_LIST_AT_MOST])
    more = len(names) - _LIST_AT_MOST
    return shown + (f" and {more} more" if more > 0 else "")


# ========================================================================================= Config


@dataclass
class DataConfig:
    """The ``data:`` section of a training config. Every field is checked on construction."""

    source: str = "shapes"  # "shapes" (embedded, procedural), "hub" (Hugging Face datasets), "imagefolder"
    path: str | None = None  # hub: dataset name or save_to_disk folder; imagefolder: the folder
    split: str = "train"  # hub split; shapes and imagefolder have one split, "train"
    image_column: str = "image"  # hub: the column holding images
    caption_column: str = "text"  # hub: the caption column; imagefolder: the caption key in metadata.jsonl
    num_samples: int | None = 20000  # shapes: indices 0..n-1; hub/imagefolder: the first n (None = all)
    shapes_seed: int = 0  # shapes: which images (a different seed is a different set)
    resolution: int = 32  # side R of the square training images, in pixels
    crop: str = "center"  # "center" or "random" (augmentation; random crops cannot be cached)
    random_flip: bool = False  # horizontal flip with probability 1/2
    on_error: str = "skip"  # unreadable image: "skip" it (counted, listed, warned) or "stop"
    cache_latents: bool = False  # encode once with the VAE and train from stored latents

    def __post_init__(self) -> None:
        check_choice("data.source", self.source, SOURCES)
        if self.path is not None:
            if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
                raise ValueError(f"data.path={self.path!r} must be a non-empty string or path, or null")
            self.path = os.fspath(self.path)
        if self.source == "shapes" and self.path is not None:
            raise ValueError(
                f"data.path={self.path!r} is set but data.source='shapes' reads no files; "
                "allowed: data.path=null for shapes, or data.source='hub' or 'imagefolder'"
            )
        if self.source != "shapes" and self.path is None:
            raise ValueError(
                f"data.path=None with data.source={self.source!r}; allowed: a dataset name or folder "
                "(hub), a folder of images with metadata.jsonl (imagefolder)"
            )
        for name in ("split", "image_column", "caption_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"data.{name}={value!r} must be a non-empty string")
        if self.source != "hub" and self.split != "train":
            raise ValueError(
                f"data.split={self.split!r} is not supported with data.source={self.source!r}, which has "
                "one split; allowed: 'train' (for another imagefolder split, point data.path at its folder)"
            )
        if self.num_samples is None and self.source == "shapes":
            raise ValueError("data.num_samples=None with data.source='shapes'; allowed: an integer >= 1")
        if self.num_samples is not None:
            self.num_samples = _plain_int(self.num_samples)
            check_number("data.num_samples", self.num_samples, low=1, integer=True)
        self.shapes_seed = _plain_int(self.shapes_seed)
        check_number("data.shapes_seed", self.shapes_seed, low=0, integer=True)
        self.resolution = _plain_int(self.resolution)
        check_number("data.resolution", self.resolution, low=MIN_RESOLUTION, integer=True)
        check_choice("data.crop", self.crop, CROPS)
        check_choice("data.on_error", self.on_error, ON_ERROR)
        for name in ("random_flip", "cache_latents"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data.{name}={getattr(self, name)!r} must be true or false")
        if self.cache_latents:
            check_cacheable(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a mapping (a parsed YAML ``data:`` section); an unknown key is a ``ValueError``."""
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            check_choice("data option", key, fields)
        return cls(**values)


def _plain_int(value: Any) -> Any:
    """numpy integers as ``int`` (they come from numpy-based configs); anything else unchanged."""
    return int(value) if isinstance(value, np.integer) else value


def check_cacheable(config: DataConfig) -> None:
    """Raise ``ValueError`` unless the pixels of ``config`` can be encoded once and stored.

    A cache holds one fixed image per sample (and its mirror image, for ``random_flip``). A random
    crop gives a different image every epoch, so its latents cannot be precomputed.
    """
    if config.crop != "center":
        raise ValueError(
            f"data.crop={config.crop!r} cannot be combined with cached latents (each epoch crops "
            "differently); allowed: data.crop='center', or data.cache_latents=false"
        )


# ====================================================================================== Transform


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The CPU ``torch.Generator`` of item ``index`` in epoch ``epoch`` of a run seeded ``seed``.

    Seeded through numpy's ``SeedSequence([seed, epoch, index])``, which mixes the three numbers
    into well-separated streams (neighbouring indices or seeds do not give correlated draws).
    """
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def draw_flip(generator: torch.Generator) -> bool:
    """One fair coin from ``generator``: the horizontal-flip decision (shared with the latent cache,
    so cached and uncached training flip the same items)."""
    return bool(torch.rand((), generator=generator) < 0.5)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: alpha composited over ``ALPHA_BACKGROUND``, 16-bit scaled, not clipped."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # PIL's convert clips 16-bit values at 255 (almost everything turns white); scale instead.
        values = np.asarray(image).astype(np.float64)
        image = Image.fromarray(
            np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        )  # 2-D uint8: mode "L"
    elif image.mode == "F":
        raise ValueError("image mode 'F' (32-bit float) has no defined white level; save it as 8 or 16 bit")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


class ImageTransform:
    """PIL image (any mode, any size) to a float32 ``(3, R, R)`` tensor in ``[-1, 1]``.

    Convert to RGB (:func:`to_rgb`), resize the short side to ``R`` (bicubic, antialiased), crop
    ``R x R`` (centred or random), flip horizontally with probability 1/2 if ``random_flip``, and
    scale :math:`x = u/127.5 - 1`. Random choices come from the ``generator`` argument only.
    """

    def __init__(self, resolution: int, crop: str = "center", random_flip: bool = False) -> None:
        check_number("resolution", resolution, low=1, integer=True)
        check_choice("crop", crop, CROPS)
        if not isinstance(random_flip, bool):
            raise ValueError(f"random_flip={random_flip!r} must be True or False")
        self.resolution, self.crop, self.random_flip = resolution, crop, random_flip

    def __repr__(self) -> str:
        flip = self.random_flip
        return f"ImageTransform(resolution={self.resolution}, crop={self.crop!r}, random_flip={flip})"

    def resize(self, image: Image.Image) -> Image.Image:
        """Scale so that the short side is exactly ``R``, keeping the aspect ratio."""
        w, h = image.size
        R = self.resolution
        if min(w, h) == R:
            return image
        scale = R / min(w, h)
        size = (max(R, round(w * scale)), max(R, round(h * scale)))
        return image.resize(size, resample=RESAMPLE)

    def __call__(
        self, image: Image.Image, generator: torch.Generator | None = None, *, flip: bool | None = None
    ) -> torch.Tensor:
        """Transform ``image``. ``flip`` forces the flip decision (``None``: draw it if ``random_flip``).

        Draw order from ``generator``: crop left, crop top (random crop only), then the flip coin.
        """
        needs_rng = self.crop == "random" or (self.random_flip and flip is None)
        if needs_rng and generator is None:
            raise ValueError(
                f"generator=None, but {self!r} draws random numbers; pass a torch.Generator "
                "(e.g. item_generator(seed, epoch, index)) so that the result is reproducible"
            )
        image = self.resize(to_rgb(image))
        w, h = image.size
        R = self.resolution
        if self.crop == "random":
            left = int(torch.randint(0, w - R + 1, (), generator=generator))
            top = int(torch.randint(0, h - R + 1, (), generator=generator))
        else:
            left, top = (w - R) // 2, (h - R) // 2
        image = image.crop((left, top, left + R, top + R))
        if flip is None:
            flip = self.random_flip and draw_flip(generator)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        if flip:  # after the crop, so the flipped item is exactly the mirror image of the unflipped one
            pixels = pixels.flip(-1)
        return (pixels.float() / 127.5 - 1.0).contiguous()


# ======================================================================================== Sources


def open_image(value: Any, label: str) -> Image.Image:
    """Decode ``value`` fully into a PIL image, or raise :class:`UnreadableImageError` naming ``label``.

    ``value`` is a PIL image, a path, raw bytes, or a ``datasets`` image dict (``{"bytes", "path"}``).
    EXIF orientation is applied (phone photos store it in a tag instead of rotating the pixels).
    """
    try:
        if isinstance(value, dict):  # a datasets image: bytes, or a path when the bytes are not stored
            value = value["bytes"] if value.get("bytes") is not None else value.get("path")
        if isinstance(value, Image.Image):
            image = value
            image.load()
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
            image.load()  # decode now: Image.open only reads the header, truncation shows up here
        elif isinstance(value, (str, os.PathLike)):
            with open(value, "rb") as file:  # our own handle, closed even when decoding fails
                image = Image.open(file)
                image.load()
        else:
            raise TypeError(f"no image in a value of type {type(value).__name__}")
        image = ImageOps.exif_transpose(image)
        if image.mode == "F":
            raise ValueError("mode 'F' (32-bit float) has no defined white level")
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        message = f"cannot read image {label}: {type(error).__name__}: {error}"
        raise UnreadableImageError(message, label) from error
    return image


class _ShapesSource:
    """The embedded shapes, rendered at the training resolution (no resize, no blur)."""

    def __init__(self, config: DataConfig) -> None:
        self.count, self.seed, self.resolution = config.num_samples, config.shapes_seed, config.resolution
        self.needs_scan = False

    def __len__(self) -> int:
        return self.count

    def label(self, index: int) -> str:
        return f"shapes[{index}]"

    def load(self, index: int) -> tuple[Image.Image, str]:
        item = shapes_item(index, self.resolution, self.seed)
        return item["image"], item["text"]


class _FolderSource:
    """Images under a folder (recursively; hidden files and folders ignored) with captions in
    ``metadata.jsonl``, one JSON object a line: ``{"file_name": "sub/a.png", "<caption_column>": "..."}``,
    ``file_name`` relative to the folder (the layout of Hugging Face's ``imagefolder``).

    Samples are the files named in ``metadata.jsonl``, sorted by ``file_name``. An image file that
    metadata does not name, or a name without a file, is a ``ValueError``: silently training on a
    different set than the one described is worse than stopping.
    """

    needs_scan = True

    def __init__(self, config: DataConfig) -> None:
        self.root = root = Path(config.path)
        if not root.is_dir():
            raise ValueError(f"data.path={config.path!r} is not a folder (data.source='imagefolder')")
        metadata = root / METADATA_FILE
        if not metadata.is_file():
            raise ValueError(
                f"data.path={config.path!r} has no {METADATA_FILE}; expected one JSON object a line, "
                f'{{"file_name": "a.png", "{config.caption_column}": "a caption"}}'
            )
        captions = self._read_metadata(metadata, config.caption_column)
        on_disk = {
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and p.is_file()
        }
        missing = sorted(name for name in captions if not (root / name).is_file())
        if missing:
            raise ValueError(
                f"{metadata} names {len(missing)} file(s) that do not exist in {root}: {_listing(missing)}"
            )
        uncaptioned = sorted(on_disk - set(captions))
        if uncaptioned:
            raise ValueError(
                f"{len(uncaptioned)} image(s) in {root} have no line in {METADATA_FILE}: "
                f"{_listing(uncaptioned)}; add them to {METADATA_FILE} or move them out of the folder"
            )
        self.files = sorted(captions)[: config.num_samples]
        self.captions = [captions[name] for name in self.files]

    @staticmethod
    def _read_metadata(metadata: Path, caption_key: str) -> dict[str, str]:
        captions: dict[str, str] = {}
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{metadata}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON: {error.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
                raise ValueError(f"{where} has no string 'file_name'; got {line.strip()[:80]!r}")
            if caption_key not in record:
                raise ValueError(
                    f"{where} has no {caption_key!r} (data.caption_column={caption_key!r}); "
                    f"its keys: {sorted(record)}"
                )
            caption = record[caption_key]
            if not isinstance(caption, str):
                raise ValueError(f"{where}: caption {caption_key!r} is {caption!r}; expected a string")
            name = PurePosixPath(record["file_name"])  # "./a.png" -> "a.png"
            if name.is_absolute() or ".." in name.parts:
                raise ValueError(
                    f"{where}: file_name {record['file_name']!r} must be relative, inside the folder"
                )
            if name.as_posix() in captions:
                raise ValueError(f"{where}: file_name {record['file_name']!r} appears twice")
            captions[name.as_posix()] = caption
        if not captions:
            raise ValueError(f"{metadata} lists no images")
        return captions

    def __len__(self) -> int:
        return len(self.files)

    def label(self, index: int) -> str:
        return str(self.root / self.files[index])

    def load(self, index: int) -> tuple[Image.Image, str]:
        return open_image(self.root / self.files[index], self.label(index)), self.captions[index]


class _HubSource:
    """A Hugging Face ``datasets`` table: a saved folder (``save_to_disk``) or a hub name.

    The image column is read undecoded (``datasets.Image(decode=False)``) and decoded here, so a
    broken row raises :class:`UnreadableImageError` naming it instead of an error deep in datasets.
    A caption that is not a string (e.g. ``None``) is a ``ValueError`` whatever ``on_error`` says.
    """

    needs_scan = True

    def __init__(self, config: DataConfig) -> None:
        import datasets  # deferred: importing datasets takes about a second

        self.name = config.path
        table = _load_hub(config)
        for option, column in (
            ("image_column", config.image_column),
            ("caption_column", config.caption_column),
        ):
            if column not in table.column_names:
                raise ValueError(
                    f"data.{option}={column!r} is not a column of {config.path!r} (split {config.split!r}); "
                    f"its columns: {table.column_names}"
                )
        if config.num_samples is not None and config.num_samples < len(table):
            table = table.select(range(config.num_samples))
        table = table.select_columns(list(dict.fromkeys([config.image_column, config.caption_column])))
        if isinstance(table.features[config.image_column], datasets.Image):
            table = table.cast_column(config.image_column, datasets.Image(decode=False))
        self.table: datasets.Dataset = table
        self.image_column, self.caption_column = config.image_column, config.caption_column

    def __len__(self) -> int:
        return len(self.table)

    def label(self, index: int, value: Any = None) -> str:
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        return f"{self.name!r}[row {index}]" + (f" ({path})" if path else "")

    def load(self, index: int) -> tuple[Image.Image, str]:
        row = self.table[index]
        value, caption = row[self.image_column], row[self.caption_column]
        image = open_image(value, self.label(index, value))
        if not isinstance(caption, str):
            raise ValueError(
                f"{self.label(index, value)}: data.caption_column={self.caption_column!r} holds {caption!r}; "
                "expected a string"
            )
        return image, caption


def _load_hub(config: DataConfig) -> datasets.Dataset:
    """``load_from_disk`` for a ``save_to_disk`` folder (the split picked from a ``DatasetDict``),
    ``load_dataset(path, split=split)`` otherwise (a hub name, or a folder of data files)."""
    import datasets

    path, split = config.path, config.split
    saved = os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json")
    )
    try:
        table = datasets.load_from_disk(path) if saved else datasets.load_dataset(path, split=split)
    except Exception as error:  # offline, no such dataset, no such split, unreadable files...
        raise ValueError(f"data.path={path!r} (split {split!r}) could not be loaded: {error}") from error
    if isinstance(table, datasets.DatasetDict):
        if split not in table:
            raise ValueError(f"data.split={split!r} is not a split of {path!r}; its splits: {list(table)}")
        table = table[split]
    if not isinstance(table, datasets.Dataset):
        raise ValueError(f"data.path={path!r} gave a {type(table).__name__}; expected a datasets.Dataset")
    return table


# ======================================================================================== Dataset


class ImageDataset(torch.utils.data.Dataset):
    """Model-ready items ``{"pixel_values", "caption", "index"}`` from a source (see :func:`build_dataset`).

    ``index`` is the sample's index in its source (shapes index, hub row, position of the file in
    sorted order), not its position here: when images were skipped, ``dataset[i]["index"]`` may
    exceed ``i``. Augmentation is seeded by ``(seed, epoch, index)``, so skipping one file changes
    no other sample. ``skipped`` lists the unreadable images that were left out.
    """

    def __init__(self, source: Any, config: DataConfig, seed: int = 0, *, progress: bool = False) -> None:
        check_number("seed", seed, low=0, integer=True)
        self.source, self.config, self.seed, self.epoch = source, config, seed, 0
        self.transform = ImageTransform(config.resolution, config.crop, config.random_flip)
        self.skipped: list[str] = []
        self.indices = list(range(len(source)))
        if source.needs_scan:
            self.indices = self._scan(progress)
        if not self.indices:
            raise ValueError(f"{self.describe()}: no readable images")

    def _scan(self, progress: bool) -> list[int]:
        """Decode every image once; return the indices of the readable ones (see the module doc)."""
        positions = range(len(self.source))
        if progress:
            from tqdm.auto import tqdm

            positions = tqdm(positions, desc="checking images", unit="image")
        kept = []
        for index in positions:
            try:
                self.source.load(index)
            except UnreadableImageError as error:
                if self.config.on_error == "stop":
                    raise UnreadableImageError(f"{error} (data.on_error='stop')", error.label) from error
                self.skipped.append(error.label or self.source.label(index))
                continue
            kept.append(index)
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image(s) of {len(self.source)} "
                f"(data.on_error='skip'): {_listing(self.skipped)}",
                stacklevel=3,
            )
        return kept

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` draws (call before each epoch)."""
        check_number("epoch", epoch, low=0, integer=True)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, position: int, *, flip: bool | None = None) -> dict[str, Any]:
        """Item ``position``; ``flip`` forces the flip (``None``: drawn as in training)."""
        index = self.indices[position]
        image, caption = self.source.load(index)
        generator = item_generator(self.seed, self.epoch, index)
        pixel_values = self.transform(image, generator, flip=flip)
        return {"pixel_values": pixel_values, "caption": caption, "index": index}

    def __getitem__(self, position: int) -> dict[str, Any]:
        if not -len(self) <= position < len(self):
            raise IndexError(f"position {position} is out of range for {len(self)} samples")
        return self.get(position % len(self))

    def describe(self) -> str:
        """One line: source, size, resolution, augmentation, skipped count."""
        c = self.config
        where = f" {c.path!r}" + (f" split={c.split!r}" if c.source == "hub" else "")
        where = f" seed={c.shapes_seed}" if c.source == "shapes" else where
        return (
            f"{c.source}{where}: {len(self)} images ({len(self.skipped)} unreadable skipped), "
            f"{c.resolution}x{c.resolution}, crop={c.crop!r}, random_flip={c.random_flip}, seed={self.seed}"
        )

    def __repr__(self) -> str:
        return f"ImageDataset({self.describe()})"


def build_dataset(config: DataConfig, seed: int = 0, *, progress: bool = False) -> ImageDataset:
    """The training images described by ``config``; ``seed`` drives augmentation (not which images).

    - ``shapes``: indices ``0 .. num_samples-1`` of the embedded set (seed ``shapes_seed``),
      rendered at ``resolution`` directly;
    - ``hub``: ``datasets.load_from_disk(path)`` for a ``save_to_disk`` folder, else
      ``datasets.load_dataset(path, split=split)``; columns ``image_column`` and ``caption_column``;
    - ``imagefolder``: the images named in ``path/metadata.jsonl`` (see ``_FolderSource``).

    Sources that read files are scanned once for unreadable images (``progress`` shows a bar).
    """
    if not isinstance(config, DataConfig):
        raise ValueError(f"config={config!r} must be a DataConfig (DataConfig.from_dict(yaml['data']))")
    sources = {"shapes": _ShapesSource, "imagefolder": _FolderSource, "hub": _HubSource}
    return ImageDataset(sources[config.source](config), config, seed, progress=progress)
