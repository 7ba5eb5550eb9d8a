"""Build the networks and the noise schedule a config describes, for training and for sampling."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..interop.diffusers_format import load_vae
from ..models.presets import unet_config, vae_config
from ..models.text import TEXT_ENCODER_CONFIGS, build_text_encoder, load_tokenizer
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..schedules import NoiseSchedule
from .checkpoint import prefixed, read_checkpoint
from .config import ConfigError, TrainConfig, config_from_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_schedule(config: TrainConfig) -> NoiseSchedule:
    d = config.diffusion
    return NoiseSchedule.from_name(
        d.schedule, d.num_train_timesteps, d.beta_start, d.beta_end, zero_terminal_snr=d.zero_terminal_snr
    )


def build_unet(config: TrainConfig, init_weights: bool = True) -> UNet:
    """The UNet of ``model.unet`` (+ overrides); with ``model.unet_init``, loaded from those weights,
    whose architecture must be the preset's (a difference is an error listing the fields). The runtime
    switches ``model.attention_backend`` and ``model.fused_groupnorm_silu`` are applied."""
    import dataclasses

    from ..interop.diffusers_format import load_unet
    from ..interop.single_file import load_unet_single_file
    from ..pipeline import resolve_path

    m = config.model
    runtime = dict(attention_backend=m.attention_backend, fused_groupnorm_silu=m.fused_groupnorm_silu)
    cfg = unet_config(m.unet, **runtime, **m.unet_overrides)
    if m.unet_init is None or not init_weights:
        return UNet(cfg)
    path = resolve_path(m.unet_init)
    if not path.is_dir():
        return load_unet_single_file(path, cfg)
    unet = load_unet(path, subfolder="unet", **runtime)
    fields = [f.name for f in dataclasses.fields(cfg) if f.name != "gradient_checkpointing"]
    diff = [
        f"{n}: {getattr(unet.config, n)!r} (file) vs {getattr(cfg, n)!r} (config)"
        for n in fields
        if getattr(unet.config, n) != getattr(cfg, n)
    ]
    if diff:
        raise ConfigError(f"model.unet_init={m.unet_init!r} is not a {m.unet!r} UNet: " + "; ".join(diff))
    return unet


def build_vae(config: TrainConfig) -> AutoencoderKL:
    """A fresh autoencoder for stage 1 (``model.fused_groupnorm_silu`` applied)."""
    vae = AutoencoderKL(vae_config(config.vae.preset, **config.vae.overrides))
    vae.set_fused_groupnorm_silu(config.model.fused_groupnorm_silu)
    return vae


def load_frozen_vae(
    path: str | Path, attention_backend: str = "auto", fused_groupnorm_silu: bool = False
) -> AutoencoderKL:
    """A trained VAE folder (the trainer's ``vae/`` or a Stable Diffusion checkpoint's), frozen, eval;
    ``fused_groupnorm_silu`` switches its SiLU(GroupNorm) to the Triton kernel."""
    from ..pipeline import resolve_path

    path = resolve_path(path)
    vae = load_vae(path, subfolder="vae" if (path / "vae" / "config.json").is_file() else None)
    vae.set_attention_backend(attention_backend)
    vae.set_fused_groupnorm_silu(fused_groupnorm_silu)
    return vae.requires_grad_(False).eval()


def load_text_models(config: TrainConfig, base: Path | None = None):
    """``(tokenizer, text_encoder)``: from folders, or a fresh encoder of a named size (seeded)."""
    from ..pipeline import resolve_path

    m = config.model
    extra = (base,) if base else ()
    tokenizer = load_tokenizer(resolve_path(m.tokenizer, *extra) if m.tokenizer else None)
    if m.text_encoder in TEXT_ENCODER_CONFIGS and not Path(m.text_encoder).is_dir():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            encoder = build_text_encoder(TEXT_ENCODER_CONFIGS[m.text_encoder])
    else:
        encoder = build_text_encoder(str(resolve_path(m.text_encoder, *extra)))
    return tokenizer, encoder.float()  # saved in fp16 or fp32; trained and cast by the trainer


def build_sampling_model(path: Path, *, use_ema: bool = True, device: str | torch.device = "cpu"):
    """A :class:`~ldm_lib.pipeline.LatentDiffusion` from a trainer's ``model.safetensors`` or checkpoint."""
    from ..pipeline import LatentDiffusion

    tensors, metadata = read_checkpoint(path)
    if "config" not in metadata:
        raise ValueError(
            f"{path} has no training config in its metadata: not a file written by ldm_lib.training"
        )
    config = config_from_dict(yaml.safe_load(metadata["config"]), check_paths=False)
    if config.stage != "ldm":
        raise ValueError(f"{path} is a stage {config.stage!r} file; sampling needs a stage 'ldm' model")
    # "model." holds the trained module's state (unet.*, text_encoder.* when trained), "ema." the
    # average of its parameters; buffers come from "model.".
    state = prefixed(tensors, "model")
    if not use_ema and metadata.get("weights") == "ema-only":
        raise ValueError(f"{path} holds only the EMA weights; the raw ones are in the run's checkpoints")
    if use_ema and any(k.startswith("ema.") for k in tensors):
        state.update(prefixed(tensors, "ema"))
    unet = build_unet(config, init_weights=False)
    # The kernel switch was a training choice for the training device; sampling may run anywhere, so
    # torch's ops here (same weights; unet.set_fused_groupnorm_silu(True) on a GPU to use the kernel).
    unet.set_fused_groupnorm_silu(False)
    unet.load_state_dict(prefixed(state, "unet"))
    tokenizer, text_encoder = load_text_models(config, path.parent)
    for prefix, source in (("text_encoder", state), ("frozen_text_encoder", tensors)):
        if any(k.startswith(prefix + ".") for k in source):
            text_encoder.load_state_dict(prefixed(source, prefix))
    vae = load_frozen_vae(config.model.vae)
    return LatentDiffusion(
        unet=unet.eval().requires_grad_(False).to(device),
        vae=vae.to(device),
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval().requires_grad_(False).to(device),
        schedule=build_schedule(config),
        prediction_type=config.diffusion.prediction_type,
        resolution=config.data.resolution,
        text_encoder_layer=config.model.text_encoder_layer,
        config=config.to_dict(),
    )
