"""Tests of latent caching (ldm_lib.data.latents): identities, the cache round trip against direct
encoding, flips, stale caches refused, and the checks that run before any work."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm_lib.data.images import DataConfig, build_dataset
from ldm_lib.data.latents import (
    LatentCache,
    StaleCacheError,
    cache_latents,
    data_identity,
    load_latent_cache,
    scaled_latents,
    vae_identity,
)
from ldm_lib.models.presets import vae_config
from ldm_lib.models.vae import AutoencoderKL

R = 16  # course VAE, f = 4: 16x16 images -> 4x4x4 latents
N = 6


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    model = AutoencoderKL(vae_config("course", base_channels=8, norm_num_groups=4, scaling_factor=0.5))
    with torch.no_grad():  # a non-zero log-variance, so std is not trivially 1
        model.quant_conv.bias[4:] = torch.linspace(-2.0, 1.0, 4)
    return model.eval()


def encode(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        posterior = vae.encode(pixels)
    return posterior.mean, posterior.std


def stack(dataset, key: str = "pixel_values") -> torch.Tensor:
    return torch.stack([dataset[i][key] for i in range(len(dataset))])


# ===================================================================================== Identities


def test_vae_identity_covers_every_weight_bit_and_the_config(vae: AutoencoderKL) -> None:
    identity = vae_identity(vae)
    assert len(identity) == 64 and identity == vae_identity(vae)
    twin = AutoencoderKL(vae.config)
    twin.load_state_dict(vae.state_dict())
    assert vae_identity(twin) == identity  # identity of the weights, not of the object
    twin.set_attention_backend("math")
    assert vae_identity(twin) == identity  # how attention is computed is not what it computes
    with torch.no_grad():
        w = twin.decoder.conv_out.bias
        w[0] = torch.nextafter(w[0], torch.tensor(1e9))  # one ulp of one weight
    assert vae_identity(twin) != identity
    rescaled = AutoencoderKL(vae_config("course", base_channels=8, norm_num_groups=4, scaling_factor=0.25))
    rescaled.load_state_dict(vae.state_dict())
    assert vae_identity(rescaled) != identity
    assert vae_identity(copy.deepcopy(vae).to(torch.float64)) != identity


def test_data_identity_tracks_pixel_fields_and_folder_content(tmp_path: Path) -> None:
    base = DataConfig(num_samples=N, resolution=R)
    identity = data_identity(base)
    assert identity == data_identity(DataConfig(num_samples=N, resolution=R), seed=7)  # seed: not a pixel
    assert identity == data_identity(DataConfig(num_samples=N, resolution=R, on_error="stop"))
    for change in (
        dict(num_samples=N + 1),
        dict(resolution=2 * R),
        dict(shapes_seed=1),
        dict(random_flip=True),
        dict(crop="random"),
    ):
        assert data_identity(DataConfig(**{**vars(base), **change})) != identity, change
    Image.new("RGB", (R, R)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}))
    folder = DataConfig(source="imagefolder", path=str(tmp_path), resolution=R)
    before = data_identity(folder)
    assert before == data_identity(folder)
    Image.new("RGB", (R, R), (255, 255, 255)).save(tmp_path / "a.png")  # same name, new pixels
    assert data_identity(folder) != before


# ========================================================================================== Cache


def test_cache_round_trip_equals_direct_encoding(vae: AutoencoderKL, tmp_path: Path) -> None:
    dataset = build_dataset(DataConfig(num_samples=N, resolution=R, shapes_seed=4))
    path = tmp_path / "cache" / "latents.safetensors"
    identity = data_identity(dataset.config)
    made = cache_latents(dataset, vae, path, batch_size=4, data_identity=identity, progress=False)
    assert sorted(p.name for p in path.parent.iterdir()) == ["latents.safetensors"]  # no temporary left
    loaded = load_latent_cache(path, vae, identity)
    mean, std = encode(vae, stack(dataset))
    for cache in (made, loaded):
        assert isinstance(cache, LatentCache) and len(cache) == N and not cache.flipped
        assert torch.allclose(stack(cache, "latent_mean"), mean, atol=1e-5)
        assert torch.allclose(stack(cache, "latent_std"), std, atol=1e-5)
        assert [cache[i]["caption"] for i in range(N)] == [dataset[i]["caption"] for i in range(N)]
        assert [cache[i]["index"] for i in range(N)] == list(range(N))
    assert cache[0]["latent_mean"].shape == (4, R // 4, R // 4)
    assert not torch.allclose(std, torch.ones_like(std))  # std really stored, not a constant
    assert loaded.metadata["count"] == str(N) and loaded.metadata["resolution"] == str(R)
    assert (
        loaded.metadata["vae_identity"] == vae_identity(vae) and loaded.metadata["data_identity"] == identity
    )
    assert "6 cached posteriors" in repr(loaded)


def test_flipped_cache_matches_the_image_pipelines_flips(vae: AutoencoderKL, tmp_path: Path) -> None:
    dataset = build_dataset(DataConfig(num_samples=N, resolution=R, random_flip=True), seed=3)
    identity = data_identity(dataset.config)
    cache_latents(
        dataset, vae, tmp_path / "c.safetensors", batch_size=4, data_identity=identity, progress=False
    )
    cache = load_latent_cache(tmp_path / "c.safetensors", vae, identity, seed=3)
    assert cache.flipped
    plain = torch.stack([dataset.get(i, flip=False)["pixel_values"] for i in range(N)])
    flip_mean, _ = encode(vae, plain.flip(-1))
    assert torch.allclose(cache.flip_latent_mean, flip_mean, atol=1e-5)  # the mirror image, encoded
    assert not torch.allclose(cache.flip_latent_mean, cache.latent_mean.flip(-1), atol=1e-3)
    choices = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        cache.set_epoch(epoch)
        mean, _ = encode(vae, stack(dataset))  # what an uncached run encodes this epoch
        assert torch.allclose(stack(cache, "latent_mean"), mean, atol=1e-5)
        choices += [torch.allclose(cache[i]["latent_mean"], cache.flip_latent_mean[i]) for i in range(N)]
    assert any(choices) and not all(choices)


def test_stale_cache_is_refused(vae: AutoencoderKL, tmp_path: Path) -> None:
    dataset = build_dataset(DataConfig(num_samples=N, resolution=R))
    identity, path = data_identity(dataset.config), tmp_path / "c.safetensors"
    cache_latents(dataset, vae, path, data_identity=identity, progress=False)
    changed = copy.deepcopy(vae)
    with torch.no_grad():
        changed.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3  # e.g. the VAE was trained further
    with pytest.raises(StaleCacheError) as info:
        load_latent_cache(path, changed, identity)
    message = str(info.value)
    assert str(path) in message and vae_identity(vae) in message and vae_identity(changed) in message
    assert isinstance(info.value, ValueError)
    other = data_identity(DataConfig(num_samples=N + 1, resolution=R))
    with pytest.raises(StaleCacheError, match=rf"recorded data_identity {identity}, current {other}"):
        load_latent_cache(path, vae, other)
    assert len(load_latent_cache(path, vae_identity(vae), identity)) == N  # an identity string works too


def test_checks_run_before_any_work(vae: AutoencoderKL, tmp_path: Path) -> None:
    path = tmp_path / "never" / "c.safetensors"
    random_crop = build_dataset(DataConfig(num_samples=2, resolution=R, crop="random"))
    with pytest.raises(ValueError, match=r"data\.crop='random' cannot be combined with cached latents"):
        cache_latents(random_crop, vae, path, data_identity=data_identity(random_crop.config))
    odd = build_dataset(DataConfig(num_samples=2, resolution=10))
    with pytest.raises(ValueError, match=r"data\.resolution=10 is not a multiple of .* factor 4"):
        cache_latents(odd, vae, path, data_identity=data_identity(odd.config))
    ok = build_dataset(DataConfig(num_samples=2, resolution=R))
    with pytest.raises(ValueError, match=r"data_identity='abc' is not the identity of dataset\.config"):
        cache_latents(ok, vae, path, data_identity="abc")
    with pytest.raises(ValueError, match=r"batch_size=0 is out of range"):
        cache_latents(ok, vae, path, batch_size=0, data_identity=data_identity(ok.config))
    with pytest.raises(ValueError, match=r"must be an ImageDataset"):
        cache_latents([1, 2], vae, path, data_identity="abc")
    assert not path.parent.exists()
    with pytest.raises(FileNotFoundError, match=r"does not exist; build it with cache_latents"):
        load_latent_cache(path, vae, "abc")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"junk\.safetensors is not a safetensors file"):
        load_latent_cache(tmp_path / "junk.safetensors", vae, "abc")


def test_imagefolder_cache_keeps_source_indices(vae: AutoencoderKL, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    names = ["a.png", "b.png", "c.png"]
    for value, name in zip((0, 99, 255), names, strict=True):
        Image.new("RGB", (R + 4, R), (value, 0, 255 - value)).save(folder / name)
    (folder / "b.png").write_bytes(b"broken")
    (folder / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": n, "text": f"é {n}"}) for n in names)
    )
    with pytest.warns(UserWarning, match="skipped 1"):
        dataset = build_dataset(DataConfig(source="imagefolder", path=str(folder), resolution=R))
    identity = data_identity(dataset.config)
    cache_latents(dataset, vae, tmp_path / "c.safetensors", data_identity=identity, progress=False)
    cache = load_latent_cache(tmp_path / "c.safetensors", vae, identity)
    assert [cache[i]["index"] for i in range(2)] == [0, 2]
    assert cache.captions == ["é a.png", "é c.png"]  # UTF-8 round trip
    assert cache.metadata["skipped"] == "1"
    (folder / "c.png").write_bytes((folder / "a.png").read_bytes())  # the images changed on disk
    with pytest.raises(StaleCacheError, match="data_identity"):
        load_latent_cache(tmp_path / "c.safetensors", vae, data_identity(dataset.config))


def test_scaled_latents_match_encode_latents(vae: AutoencoderKL) -> None:
    x = build_dataset(DataConfig(num_samples=2, resolution=R))
    pixels = stack(x)
    mean, std = encode(vae, pixels)
    s = vae.config.scaling_factor
    assert torch.allclose(scaled_latents(mean, std, s, 0.1, sample=False), s * (mean - 0.1))
    with torch.no_grad():
        direct = vae.encode_latents(pixels, generator=torch.Generator().manual_seed(5))
    cached = scaled_latents(mean, std, s, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(cached, direct, atol=1e-5)
    draws = torch.stack(
        [scaled_latents(mean, std, 1.0, generator=torch.Generator().manual_seed(k)) for k in range(400)]
    )
    assert torch.allclose(draws.std(0), std, rtol=0.2)  # z = mean + std * eps really samples
