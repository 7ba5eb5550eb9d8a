r"""Latent caching: encode the training images once with the frozen VAE, train the UNet from storage.

In latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", arXiv 2112.10752) the autoencoder is trained first and frozen; the diffusion model only
ever sees its latents. Encoding the same images again every epoch is wasted work (for the course
models, more than the UNet step itself), so :func:`cache_latents` encodes each image once and
stores the **posterior**, not one sample of it:

.. math::  q(z\mid x) = \mathcal N\big(\mu(x), \operatorname{diag}\sigma^2(x)\big),\qquad
           z = \mu + \sigma\odot\varepsilon,\ \varepsilon\sim\mathcal N(0, I),

(Kingma & Welling 2014, arXiv 1312.6114), so training can still draw a fresh :math:`z` per step,
as LDM does, or use :math:`\mu`. Both are stored **unscaled**; :func:`scaled_latents` applies the
VAE's scaling, :math:`z' = s\,(z - m)`, when a batch is drawn.

**What the file holds** (one safetensors file, written to a temporary name and renamed into place,
so an interrupted run never leaves a half-written cache): ``latent_mean`` and ``latent_std``
``(N, C, h, w)`` float32, ``index`` ``(N,)`` (each sample's index in its source), the captions as
UTF-8 bytes plus offsets (tensors, so any number of captions fits; safetensors' text header is
limited), and text metadata ``vae_identity``, ``data_identity``, ``count``, ``resolution``.

**Flips.** With ``random_flip`` the mirror image of every sample is encoded too (``flip_latent_mean``,
``flip_latent_std``), which doubles the file. :class:`LatentCache` then returns, for item ``index``
in epoch ``epoch``, the mirrored latents exactly when the image pipeline would have flipped that
item (the same coin, :func:`~ldm_lib.data.images.draw_flip` on
:func:`~ldm_lib.data.images.item_generator`), so cached and uncached runs of one seed see the same
data. (Flipping the latent grid instead would be wrong: the encoder is not mirror-equivariant.)
A random crop cannot be cached at all (:func:`check_cacheable`).

**Stale caches are refused.** :func:`load_latent_cache` compares the identities recorded in the file
with those of the current VAE (:func:`vae_identity`: its config and every weight, bit for bit) and
data config (:func:`data_identity`), and raises :class:`StaleCacheError` naming both on any
difference, instead of training quietly on latents of another VAE or another image set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .._checks import check_number
from .images import (
    ALPHA_BACKGROUND,
    RESAMPLE,
    DataConfig,
    ImageDataset,
    check_cacheable,
    draw_flip,
    item_generator,
)

__all__ = [
    "LatentCache",
    "StaleCacheError",
    "cache_latents",
    "check_cacheable",
    "data_identity",
    "load_latent_cache",
    "scaled_latents",
    "vae_identity",
]

FORMAT = "ldm_lib.latent_cache"
FORMAT_VERSION = "1"
# Bump when ImageTransform starts making different pixels from the same config: old caches go stale.
PIPELINE_VERSION = 1
# Config fields that decide the pixels (on_error and cache_latents do not change a kept image).
PIXEL_FIELDS = (
    "source",
    "path",
    "split",
    "image_column",
    "caption_column",
    "num_samples",
    "shapes_seed",
    "resolution",
    "crop",
    "random_flip",
)
# Runtime choices of the VAE that do not change what it computes.
_VAE_RUNTIME_FIELDS = ("attention_backend",)


class StaleCacheError(ValueError):
    """A latent cache made by another VAE or from other data than the current run's."""


# ===================================================================================== Identities


def _sha256_json(value: Any) -> hashlib._Hash:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8"))


def vae_identity(vae: nn.Module) -> str:
    """SHA-256 of a VAE's config and weights: any changed bit of any tensor gives another identity.

    Hashed: ``dataclasses.asdict(vae.config)`` as sorted JSON (without ``attention_backend``, which
    changes how attention is computed, not what), then for every state-dict entry in name order
    its name, dtype, shape and raw bytes. Casting the VAE to another dtype changes the identity,
    as it changes the latents. Costs one pass over the weights (about a second for SD's 84M).
    """
    config = getattr(vae, "config", None)
    if not dataclasses.is_dataclass(config):
        raise ValueError(
            f"vae={type(vae).__name__} has no dataclass .config; expected an ldm_lib AutoencoderKL"
        )
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _VAE_RUNTIME_FIELDS}
    digest = _sha256_json({"class": type(vae).__name__, "config": fields})
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode("utf-8"))
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _folder_fingerprint(folder: str) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` of every non-hidden file under ``folder``: cheap (no file
    is read), and any added, removed, rewritten or touched file changes it."""
    entries = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            stat = os.stat(full)
            entries.append(
                (os.path.relpath(full, folder).replace(os.sep, "/"), stat.st_size, stat.st_mtime_ns)
            )
    return entries


def data_identity(config: DataConfig, seed: int | None = None) -> str:
    """SHA-256 of what decides the cached pixels: the config's ``PIXEL_FIELDS``, the image
    pipeline's version, and for a local folder (imagefolder, or a hub ``save_to_disk`` folder)
    every file's name, size and modification time, so editing the images makes the cache stale.

    A hub dataset loaded by name is identified by name and split only: a new version of it on the
    hub is not detected. ``seed`` is accepted so callers can pass the run's seed, and deliberately
    not hashed: with the centre crop that caching requires, no stored pixel depends on it (flips
    are stored both ways and chosen by seed at load time).
    """
    if not isinstance(config, DataConfig):
        raise ValueError(f"config={config!r} must be a DataConfig")
    fields = {name: getattr(config, name) for name in PIXEL_FIELDS}
    content = None
    if config.path is not None and os.path.isdir(config.path):
        fields["path"] = os.path.abspath(config.path)
        content = _folder_fingerprint(config.path)
    pipeline = {"version": PIPELINE_VERSION, "resample": RESAMPLE.name, "alpha_background": ALPHA_BACKGROUND}
    return _sha256_json({"fields": fields, "pipeline": pipeline, "content": content}).hexdigest()


_data_identity_of = data_identity  # cache_latents' argument of the same name hides the function


# ========================================================================================== Cache


def scaled_latents(
    mean: torch.Tensor,
    std: torch.Tensor,
    scaling_factor: float,
    shift_factor: float = 0.0,
    *,
    generator: torch.Generator | None = None,
    sample: bool = True,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Diffusion-space latents from a cached posterior: :math:`z' = s\,(z - m)` with
    :math:`z = \mu + \sigma\odot\varepsilon` (``sample=True``) or :math:`z = \mu`.

    Draws :math:`\varepsilon` exactly as ``DiagonalGaussian.sample`` does, so with the same
    generator state the result equals ``vae.encode_latents(x, generator)``. ``eps`` given (the
    trainer draws it with the rest of a step's noise) is used instead of a fresh draw.
    """
    if sample:
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + std * eps
    else:
        z = mean
    return (z - shift_factor) * scaling_factor


class LatentCache(torch.utils.data.Dataset):
    """Cached posteriors as a dataset: items ``{"latent_mean", "latent_std" (C, h, w), "caption",
    "index"}``, unscaled (see :func:`scaled_latents`).

    When flips were cached (``flipped``), item ``index`` of epoch ``epoch`` is the mirrored one
    exactly when ``draw_flip(item_generator(seed, epoch, index))`` says so, the choice the image
    pipeline makes for the same seed; call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str],
        path: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        check_number("seed", seed, low=0, integer=True)
        self.latent_mean, self.latent_std = tensors["latent_mean"], tensors["latent_std"]
        self.flip_latent_mean = tensors.get("flip_latent_mean")
        self.flip_latent_std = tensors.get("flip_latent_std")
        self.indices = tensors["index"]
        self.captions = _decode_captions(tensors["caption_bytes"], tensors["caption_offsets"])
        self.metadata, self.path, self.seed, self.epoch = dict(metadata), path, seed, 0

    @property
    def flipped(self) -> bool:
        """Whether mirror images were encoded too (``random_flip`` was on)."""
        return self.flip_latent_mean is not None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flip choices ``__getitem__`` makes."""
        check_number("epoch", epoch, low=0, integer=True)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, position: int, *, flip: bool | None = None) -> dict[str, Any]:
        """Item ``position``; ``flip`` forces the mirrored (``True``) or original latents."""
        index = int(self.indices[position])
        if flip is None:
            flip = self.flipped and draw_flip(item_generator(self.seed, self.epoch, index))
        if flip and not self.flipped:
            raise ValueError(f"flip=True, but {self.path} holds no flipped latents (random_flip was off)")
        mean, std = (
            (self.flip_latent_mean, self.flip_latent_std) if flip else (self.latent_mean, self.latent_std)
        )
        return {
            "latent_mean": mean[position],
            "latent_std": std[position],
            "caption": self.captions[position],
            "index": index,
        }

    def __getitem__(self, position: int) -> dict[str, Any]:
        if not -len(self) <= position < len(self):
            raise IndexError(f"position {position} is out of range for {len(self)} cached samples")
        return self.get(position % len(self))

    def describe(self) -> str:
        shape = tuple(self.latent_mean.shape[1:])
        return (
            f"{len(self)} cached posteriors {shape} of {self.metadata.get('resolution')}px images"
            f"{' (and their mirror images)' if self.flipped else ''} from {self.path}, seed={self.seed}"
        )

    def __repr__(self) -> str:
        return f"LatentCache({self.describe()})"


def _encode_captions(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions as one uint8 tensor of UTF-8 bytes and ``N+1`` int64 offsets."""
    encoded = [c.encode("utf-8") for c in captions]
    lengths = torch.tensor([0] + [len(e) for e in encoded], dtype=torch.int64)
    data = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8) if any(encoded) else None
    return (data if data is not None else torch.zeros(0, dtype=torch.uint8)), lengths.cumsum(0)


def _decode_captions(data: torch.Tensor, offsets: torch.Tensor) -> list[str]:
    raw, ends = data.numpy().tobytes(), offsets.tolist()
    return [raw[a:b].decode("utf-8") for a, b in zip(ends[:-1], ends[1:], strict=True)]


class _Unflipped(torch.utils.data.Dataset):
    """The images of an :class:`ImageDataset` never flipped (the cache stores both orientations)."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self.dataset.get(position, flip=False)


def cache_latents(
    dataset: ImageDataset,
    vae: nn.Module,
    path: str | os.PathLike,
    *,
    batch_size: int = 64,
    data_identity: str,
    progress: bool = True,
    num_workers: int = 0,
) -> LatentCache:
    """Encode every image of ``dataset`` once with ``vae`` and store the posteriors at ``path``.

    ``data_identity`` must be :func:`data_identity` of ``dataset.config`` (checked: recording a
    wrong one would defeat the stale-cache check). Runs under ``torch.no_grad`` in ``vae``'s device
    and dtype, with ``vae`` in eval mode; ``num_workers`` DataLoader processes decode the images.
    Returns the cache, with ``dataset.seed`` for the flip choices.
    """
    if not isinstance(dataset, ImageDataset):
        raise ValueError(f"dataset={type(dataset).__name__} must be an ImageDataset (from build_dataset)")
    config = dataset.config
    check_cacheable(config)
    check_number("batch_size", batch_size, low=1, integer=True)
    check_number("num_workers", num_workers, low=0, integer=True)
    identity = vae_identity(vae)  # also checks that vae has a config
    f = vae.config.downsampling_factor
    if config.resolution % f:
        raise ValueError(
            f"data.resolution={config.resolution} is not a multiple of the VAE's downsampling factor {f}; "
            f"allowed: a multiple of {f}"
        )
    expected = _data_identity_of(config)
    if data_identity != expected:
        raise ValueError(
            f"data_identity={data_identity!r} is not the identity of dataset.config ({expected!r}); "
            "pass data_identity(dataset.config)"
        )
    parameter = next(vae.parameters())
    device, dtype = parameter.device, parameter.dtype
    n, c, h = len(dataset), vae.config.latent_channels, config.resolution // f
    flips = config.random_flip
    out = {name: torch.empty(n, c, h, h) for name in ("latent_mean", "latent_std")}
    if flips:
        out |= {name: torch.empty(n, c, h, h) for name in ("flip_latent_mean", "flip_latent_std")}
    indices, captions = torch.empty(n, dtype=torch.int64), []
    loader = torch.utils.data.DataLoader(
        _Unflipped(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="encoding latents", unit="batch")
    was_training = vae.training
    vae.eval()
    start = 0
    try:
        with torch.no_grad():
            for batch in loader:
                x = batch["pixel_values"].to(device=device, dtype=dtype)
                b = len(x)
                if flips:  # one forward pass for both orientations
                    x = torch.cat([x, x.flip(-1)])
                posterior = vae.encode(x)
                mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
                out["latent_mean"][start : start + b], out["latent_std"][start : start + b] = (
                    mean[:b],
                    std[:b],
                )
                if flips:
                    out["flip_latent_mean"][start : start + b] = mean[b:]
                    out["flip_latent_std"][start : start + b] = std[b:]
                indices[start : start + b] = batch["index"]
                captions.extend(batch["caption"])
                start += b
    finally:
        vae.train(was_training)
    caption_bytes, caption_offsets = _encode_captions(captions)
    tensors = {**out, "index": indices, "caption_bytes": caption_bytes, "caption_offsets": caption_offsets}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vae_identity": identity,
        "data_identity": data_identity,
        "count": str(n),
        "resolution": str(config.resolution),
        "flipped": json.dumps(flips),
        "skipped": str(len(dataset.skipped)),
        "description": dataset.describe(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)  # atomic on one filesystem: readers see the old file or the new one
    finally:
        tmp.unlink(missing_ok=True)
    return LatentCache(tensors, metadata, path, seed=dataset.seed)


def load_latent_cache(
    path: str | os.PathLike, vae: nn.Module | str, data_identity: str, *, seed: int = 0
) -> LatentCache:
    """The cache at ``path``, after checking that it was made by ``vae`` (a VAE, or its
    :func:`vae_identity`) from the data of ``data_identity``; a mismatch is a
    :class:`StaleCacheError` naming the file and both identities. ``seed`` drives the flip choices.
    A missing file is a ``FileNotFoundError`` (build it with :func:`cache_latents`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent cache {path} does not exist; build it with cache_latents")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise ValueError(f"{path} is not a safetensors file: {error}") from error
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is not a latent cache of format {FORMAT} v{FORMAT_VERSION} "
            f"(its format: {metadata.get('format')!r} v{metadata.get('format_version')!r}); re-encode it"
        )
    current_vae = vae if isinstance(vae, str) else vae_identity(vae)  # only read metadata so far
    for what, current in (("vae_identity", current_vae), ("data_identity", data_identity)):
        recorded = metadata.get(what)
        if recorded != current:
            raise StaleCacheError(
                f"latent cache {path} is stale: recorded {what} {recorded}, current {current}; "
                "delete the file to re-encode, or restore the VAE and data it was made with"
            )
    return LatentCache(load_file(str(path)), metadata, path, seed=seed)
