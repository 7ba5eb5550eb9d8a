"""Stable Diffusion weights in diffusers format: a folder per model with ``config.json`` and
``diffusion_pytorch_model.safetensors``.

The course's :class:`~ldm_lib.models.unet.UNet` and :class:`~ldm_lib.models.vae.AutoencoderKL` name
their parameters as diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` do, so the key map is
the identity: what this module adds is the translation of ``config.json`` into our config dataclasses
(and back), refusing what our models cannot represent, and strict loading (every key present, none
extra, every shape right; see :mod:`ldm_lib.interop.keys`). The networks are those of Rombach et al.
2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (arXiv 2112.10752).

A Stable Diffusion repository (``runwayml/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-2-1``,
...) holds one such folder per model, ``unet/`` and ``vae/``; ``load_unet(root)`` looks in
``root/unet`` (or in ``root`` itself when that is a model folder).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models.unet import _DIFFUSERS_FIXED, UNet, UNetConfig, from_diffusers_config, to_diffusers_config
from ..models.vae import AutoencoderKL, VAEConfig
from .keys import CheckpointError, build_and_load, model_state_dict, read_state_dict, save_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"  # + ".safetensors", ".bin", or ".<variant>.safetensors"

# ============================================================================================ UNet

# Options that ``from_diffusers_config`` (unet.py) translates, and options that change no weight and
# nothing in an fp32 forward of the SD 1.x/2.x layout: ``sample_size`` is a pipeline's default latent
# size, ``upcast_attention`` (set by SD 2.1) asks for fp32 attention scores when running in fp16, and
# the last four only matter with SDXL-style added embeddings, which ``from_diffusers_config`` refuses.
_UNET_UNDERSTOOD = {
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
    "up_block_types", "attention_head_dim", "cross_attention_dim", "use_linear_projection",
    "transformer_layers_per_block", "norm_num_groups", "norm_eps", "dropout", "flip_sin_to_cos",
    "freq_shift",
}  # fmt: skip
_UNET_NO_EFFECT = {
    "sample_size", "upcast_attention", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
    "class_embeddings_concat", "addition_embed_type_num_heads",
}  # fmt: skip


def _check_class(config: Mapping[str, Any], expected: str) -> None:
    name = config.get("_class_name", expected)
    if name != expected:
        raise ValueError(f"config _class_name={name!r} is not supported here; expected {expected!r}")


def _warn_unknown(config: Mapping[str, Any], known: set[str], model: str) -> None:
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        warnings.warn(
            f"{model} config options unknown to ldm_lib were ignored: "
            + ", ".join(f"{k}={config[k]!r}" for k in unknown),
            stacklevel=3,
        )


def unet_config_from_diffusers(config: Mapping[str, Any], **overrides: Any) -> UNetConfig:
    """The :class:`UNetConfig` of a diffusers ``UNet2DConditionModel`` config (its ``config.json``).

    ``block_out_channels`` gives ``model_channels`` and ``channel_mult``; the ``CrossAttnDownBlock2D``
    entries of ``down_block_types`` give ``attention_levels``; ``attention_head_dim`` is, despite its
    name, a head count (an int: SD1's 8 heads) or a list of per-level head counts (SD2's
    ``[5, 10, 20, 20]``, i.e. 64 channels per head). Options our UNet does not have (SDXL's added
    embeddings, class embeddings, other block types...) raise ``ValueError`` naming the option and
    value; options we do not know are ignored with a warning. ``overrides`` set runtime fields such
    as ``attention_backend``.
    """
    _check_class(config, "UNet2DConditionModel")
    _warn_unknown(config, _UNET_UNDERSTOOD | _UNET_NO_EFFECT | set(_DIFFUSERS_FIXED), "UNet")
    return from_diffusers_config(config, **overrides)


def unet_config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """The ``config.json`` content of a diffusers ``UNet2DConditionModel`` with our architecture.

    Training-only fields (``attention_dropout``, ``zero_init``, ``gradient_checkpointing``) and the
    runtime ``attention_backend`` are not part of it: they change no weight.
    """
    return {"_class_name": "UNet2DConditionModel", **_jsonable(to_diffusers_config(config))}


# ============================================================================================= VAE

_VAE_NO_EFFECT = {"sample_size", "force_upcast"}  # pipeline hints: default image size, fp16 upcasting
_VAE_FIXED: dict[str, Any] = {  # what the SD "KL-f8" layout needs; anything else is another network
    "act_fn": "silu",
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}
_VAE_NORM_EPS = 1e-6  # diffusers' AutoencoderKL hard-codes its GroupNorm epsilon


def vae_config_from_diffusers(config: Mapping[str, Any], **overrides: Any) -> VAEConfig:
    r"""The :class:`VAEConfig` of a diffusers ``AutoencoderKL`` config (its ``config.json``).

    ``block_out_channels`` gives ``base_channels`` and ``channel_mult``, ``layers_per_block`` the
    encoder's ResNet blocks per level, ``scaling_factor``/``shift_factor`` the latent scaling
    :math:`z' = s\,(z - m)` (Rombach et al. 2022, §4.3.2; SD: :math:`s = 0.18215`, :math:`m = 0`).
    Missing options take diffusers' defaults. Other block types, activations, per-channel latent
    statistics or a missing quant conv raise ``ValueError`` naming the option and value.
    """
    _check_class(config, "AutoencoderKL")
    for option, needed in _VAE_FIXED.items():
        if config.get(option, needed) != needed:
            raise ValueError(
                f"diffusers option {option}={config[option]!r} is not supported; the SD autoencoder "
                f"layout needs {option}={needed!r}"
            )
    channels = tuple(config.get("block_out_channels", (64,)))
    for option, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = tuple(config.get(option, (block,) * len(channels)))
        if types != (block,) * len(channels):
            raise ValueError(
                f"{option}={list(types)!r} is not supported; expected {block!r} for each of the "
                f"{len(channels)} levels of block_out_channels={list(channels)!r}"
            )
    base = channels[0] if channels else 0
    if not channels or base <= 0 or any(c % base for c in channels):
        raise ValueError(
            f"block_out_channels={list(channels)!r} must be positive multiples of the first entry"
        )
    shift = config.get("shift_factor")
    fields = {
        "in_channels": config.get("in_channels", 3),
        "out_channels": config.get("out_channels", 3),
        "base_channels": base,
        "channel_mult": tuple(c // base for c in channels),
        "num_res_blocks": config.get("layers_per_block", 1),
        "latent_channels": config.get("latent_channels", 4),
        "norm_num_groups": config.get("norm_num_groups", 32),
        "norm_eps": _VAE_NORM_EPS,
        "mid_block_attention": config.get("mid_block_add_attention", True),
        "scaling_factor": config.get("scaling_factor", 0.18215),
        "shift_factor": 0.0 if shift is None else shift,
    }
    known = {"in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
             "norm_num_groups", "mid_block_add_attention", "scaling_factor", "shift_factor",
             "down_block_types", "up_block_types"}  # fmt: skip
    _warn_unknown(config, known | _VAE_NO_EFFECT | set(_VAE_FIXED), "AutoencoderKL")
    return VAEConfig(**{**fields, **overrides})


def vae_config_to_diffusers(config: VAEConfig) -> dict[str, Any]:
    """The ``config.json`` content of a diffusers ``AutoencoderKL`` with our architecture;
    ``ValueError`` for a ``norm_eps`` other than diffusers' fixed 1e-6."""
    if config.norm_eps != _VAE_NORM_EPS:
        raise ValueError(
            f"norm_eps={config.norm_eps!r} cannot be saved in diffusers format: its AutoencoderKL "
            f"always uses {_VAE_NORM_EPS}"
        )
    levels = len(config.channel_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(config.block_channels),
        "layers_per_block": config.num_res_blocks,
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_num_groups,
        "mid_block_add_attention": config.mid_block_attention,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor or None,
        **_VAE_FIXED,
    }


# ================================================================================= folders and files


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _model_folder(folder: str | Path, subfolder: str | None) -> Path:
    """``folder/subfolder`` if it exists, else ``folder`` itself when it is a model folder."""
    folder = Path(folder)
    candidates = [folder / subfolder, folder] if subfolder else [folder]
    for path in candidates:
        if (path / CONFIG_NAME).is_file():
            return path
    looked = " or ".join(repr(str(p / CONFIG_NAME)) for p in candidates)
    raise CheckpointError(f"no diffusers model folder: {looked} does not exist")


def _read_weights(path: Path, variant: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a diffusers model folder: ``diffusion_pytorch_model[.variant].safetensors``,
    its sharded form (``.safetensors.index.json``), or the legacy pickled ``.bin``."""
    stem = WEIGHTS_STEM + (f".{variant}" if variant else "")
    single, index, legacy = (path / f"{stem}.safetensors", path / f"{stem}.safetensors.index.json",
                             path / f"{stem}.bin")  # fmt: skip
    if single.is_file():
        return read_state_dict(single), str(single)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        state_dict = {}
        for shard in sorted(set(weight_map.values())):
            state_dict.update(read_state_dict(path / shard))
        return state_dict, str(index)
    if legacy.is_file():
        return read_state_dict(legacy), str(legacy)
    present = sorted(p.name for p in path.iterdir())
    raise CheckpointError(
        f"no weights in {str(path)!r}: looked for {single.name}, {index.name} and {legacy.name}; "
        f"the folder has {present}"
    )


def _write_folder(folder: str | Path, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_safetensors(state_dict, folder / f"{WEIGHTS_STEM}.safetensors")
    return folder


def load_unet(
    folder: str | Path,
    subfolder: str | None = "unet",
    dtype: torch.dtype | None = None,
    *,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    **overrides: Any,
) -> UNet:
    """Our :class:`UNet` from a diffusers ``UNet2DConditionModel`` folder (``config.json`` and
    ``diffusion_pytorch_model.safetensors``, or ``.bin`` read with ``torch.load(weights_only=True)``).

    ``folder`` is a pipeline root (the UNet is in ``folder/unet``) or the model folder itself.
    ``dtype`` defaults to float32 whatever the file stores (fp16 variants included); ``variant``
    picks ``diffusion_pytorch_model.<variant>.safetensors`` (e.g. ``"fp16"``); ``overrides`` set
    runtime config fields (``attention_backend``...). Keys and shapes are checked before anything is
    loaded: a mismatch is a :class:`~ldm_lib.interop.keys.KeyMismatchError` listing them.
    """
    path = _model_folder(folder, subfolder)
    config = unet_config_from_diffusers(json.loads((path / CONFIG_NAME).read_text()), **overrides)
    state_dict, source = _read_weights(path, variant)
    return build_and_load(lambda: UNet(config), state_dict, source, dtype=dtype, device=device)


def load_vae(
    folder: str | Path,
    subfolder: str | None = "vae",
    dtype: torch.dtype | None = None,
    *,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    **overrides: Any,
) -> AutoencoderKL:
    """Our :class:`AutoencoderKL` from a diffusers ``AutoencoderKL`` folder; as :func:`load_unet`,
    with the model in ``folder/vae`` or ``folder`` itself. ``config.json``'s ``scaling_factor``
    becomes the config's (Rombach et al. 2022, §4.3.2)."""
    path = _model_folder(folder, subfolder)
    config = vae_config_from_diffusers(json.loads((path / CONFIG_NAME).read_text()), **overrides)
    state_dict, source = _read_weights(path, variant)
    return build_and_load(lambda: AutoencoderKL(config), state_dict, source, dtype=dtype, device=device)


def save_unet(model: UNet, folder: str | Path) -> Path:
    """Write ``model`` as a diffusers model folder (``config.json``, ``diffusion_pytorch_model.safetensors``)
    that ``UNet2DConditionModel.from_pretrained(folder)`` and :func:`load_unet` read. For a pipeline
    layout pass ``root / "unet"``. Tensors are saved in the model's dtype. Returns the folder."""
    return _write_folder(folder, unet_config_to_diffusers(model.config), model_state_dict(model))


def save_vae(model: AutoencoderKL, folder: str | Path) -> Path:
    """Write ``model`` as a diffusers ``AutoencoderKL`` folder (for a pipeline: ``root / "vae"``),
    scaling factor included. Returns the folder."""
    return _write_folder(folder, vae_config_to_diffusers(model.config), model_state_dict(model))
