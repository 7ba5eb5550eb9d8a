"""Named sizes of the networks: the real Stable Diffusion models and the small course models.

One section per network, each a table of keyword arguments and a function that builds a validated
config from a name (with optional overrides), e.g. ``unet_config("course_tiny", attention_backend="math")``.
``PRESETS`` lists the names per network.

The real sizes are those of Rombach et al. 2022 (arXiv 2112.10752) as released: SD 1.x conditions on
CLIP ViT-L/14 text tokens (768 wide, Radford et al. 2021), SD 2.x on OpenCLIP ViT-H/14 (1024 wide).
The course models keep the same architecture at a size that trains on a laptop CPU in minutes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .._checks import check_choice
from .unet import UNetConfig
from .vae import VAEConfig

# ============================================================================================ UNet

_UNET: dict[str, dict[str, Any]] = {
    # Stable Diffusion 1.x (1.1-1.5): 859,520,964 parameters; 8 heads everywhere, conv projections.
    "sd15": dict(
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_levels=(0, 1, 2),
        num_heads=8,
        context_dim=768,
        use_linear_projection=False,
    ),
    # Stable Diffusion 2.x (2.0, 2.1, base and 768-v): 865,910,724 parameters; 64-channel heads,
    # linear projections, OpenCLIP's 1024-wide tokens. Same shapes for epsilon and v models.
    "sd21": dict(
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_levels=(0, 1, 2),
        num_heads=None,
        head_dim=64,
        context_dim=1024,
        use_linear_projection=True,
    ),
    # Course, tiny: 8x8x4 latents, levels of 32 and 64 channels (8x8, 4x4), SD1-style attention.
    # Trains on the shapes set on a laptop CPU in minutes.
    "course_tiny": dict(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(0, 1),
        num_heads=4,
        context_dim=128,
        norm_num_groups=8,
        use_linear_projection=False,
    ),
    # Course, small: 16x16x4 latents, levels of 64, 128, 128 channels, SD2-style attention.
    "course_small": dict(
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_levels=(1, 2),
        num_heads=None,
        head_dim=32,
        context_dim=128,
        norm_num_groups=16,
        use_linear_projection=True,
    ),
}


def unet_config(name: str, **overrides: Any) -> UNetConfig:
    """The ``UNetConfig`` of a preset (``"sd15"``, ``"sd21"``, ``"course_tiny"``, ``"course_small"``),
    with any field replaced by ``overrides``; a wrong name or field is a ``ValueError``."""
    check_choice("UNet preset", name, tuple(_UNET))
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    for key in overrides:
        check_choice("UNetConfig field", key, sorted(fields))
    return UNetConfig(**{**_UNET[name], **overrides})


# ============================================================================================= VAE

_VAE: dict[str, dict[str, Any]] = {
    # Stable Diffusion 1.x and 2.x ("KL-f8"): 83,653,863 parameters, 512x512x3 -> 64x64x4.
    "sd": dict(
        base_channels=128,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.18215,
    ),
    # "sdxl" (below): the same architecture and size, retrained; its latents need a different scale.
    # Course: f = 4 (32x32x3 shapes -> 8x8x4 latents, 64x64 -> 16x16x4), levels of 32, 64, 64
    # channels, 954,567 parameters. scaling_factor 1.0 is a placeholder: a trained course VAE stores
    # 1/std of its own latents (vae.latent_scaling_factor) in its config.
    "course": dict(
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=1.0,
    ),
}
_VAE["sdxl"] = {**_VAE["sd"], "scaling_factor": 0.13025}


def vae_config(name: str, **overrides: Any) -> VAEConfig:
    """The ``VAEConfig`` of a preset (``"sd"``, ``"sdxl"``, ``"course"``), with any field replaced
    by ``overrides`` (e.g. ``scaling_factor=`` measured on a trained model); a wrong name or field
    is a ``ValueError``."""
    check_choice("VAE preset", name, tuple(_VAE))
    fields = {f.name for f in dataclasses.fields(VAEConfig)}
    for key in overrides:
        check_choice("VAEConfig field", key, sorted(fields))
    return VAEConfig(**{**_VAE[name], **overrides})


# ===================================================================================== Index

# Preset names per network; each section above adds its own entry.
PRESETS: dict[str, tuple[str, ...]] = {
    "unet": tuple(_UNET),
    "vae": tuple(_VAE),
}
