"""Shared helpers of the trainer tests (test_training_*.py, test_cli.py): tiny artefacts written to a
temporary folder (a VAE folder, a text encoder folder), tiny configs, runs and state comparisons.
No tests here; the test files import these functions and wrap them in their own fixtures.

Everything is sized to train a step in about 0.1 s on one CPU core: 16 px shapes, a course VAE with
8 base channels (f = 4: 4x4x4 latents), a UNet of 16/32 channels and a one-layer 32-wide encoder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm_lib.training import config_from_dict, make_trainer
from ldm_lib.training.checkpoint import list_checkpoints, read_checkpoint
from ldm_lib.training.config import TrainConfig, apply_overrides

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

PROMPT = "a large red circle on a white background"
UNET_OVERRIDES = {"model_channels": 16, "context_dim": 32, "norm_num_groups": 4, "num_heads": 2}
TEXT_WIDTH = 32


@dataclass(frozen=True)
class Artefacts:
    vae: Path  # a diffusers AutoencoderKL folder (course preset, 8 base channels, f = 4)
    text_encoder: Path  # a CLIPTextModel folder (32 wide, one layer)


_ARTEFACTS: dict[str, Artefacts] = {}


def make_artefacts(root: Path) -> Artefacts:
    """The frozen networks of stage 2, written once per process under ``root`` (seeded)."""
    if "arts" in _ARTEFACTS:
        return _ARTEFACTS["arts"]
    from ldm_lib.interop.diffusers_format import save_vae
    from ldm_lib.models.presets import vae_config
    from ldm_lib.models.text import TextEncoderConfig, build_text_encoder
    from ldm_lib.models.vae import AutoencoderKL

    root = Path(root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        vae = AutoencoderKL(vae_config("course", base_channels=8, norm_num_groups=4, scaling_factor=0.7))
        with torch.no_grad():  # a log-variance that is not ~0, so sampling the posterior matters
            vae.quant_conv.bias[4:] = torch.linspace(-3.0, -1.0, 4)
        save_vae(vae, root / "vae")
        encoder = build_text_encoder(
            TextEncoderConfig(
                hidden_size=TEXT_WIDTH, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
            )
        )
        encoder.save_pretrained(root / "text_encoder")
    _ARTEFACTS["arts"] = Artefacts(root / "vae", root / "text_encoder")
    return _ARTEFACTS["arts"]


def ldm_dict(arts: Artefacts, out: Path | str) -> dict[str, Any]:
    """A stage-2 config as a dict: 3 steps of batch 8 on 64 shapes at 16 px, constant lr, EMA on."""
    return {
        "stage": "ldm",
        "output_dir": str(out),
        "device": "cpu",
        "seed": 0,
        "data": {"source": "shapes", "num_samples": 64, "resolution": 16},
        "model": {
            "unet": "course_tiny",
            "unet_overrides": dict(UNET_OVERRIDES),
            "vae": str(arts.vae),
            "text_encoder": str(arts.text_encoder),
            "attention_backend": "sdpa",
        },
        "diffusion": {"caption_dropout": 0.25},
        "optim": {"batch_size": 8, "max_steps": 3, "lr": 1e-3, "max_grad_norm": 1.0},
        "ema": {"decay": 0.99},
        "logging": {
            "progress": False,
            "log_every": 1,
            "checkpoint_every": 1000,
            "validation_prompts": [PROMPT],
            "validation_seeds": [0],
            "validation_steps": 2,
        },
    }


def vae_dict(out: Path | str) -> dict[str, Any]:
    """A stage-1 config as a dict: 3 steps of batch 8 on 64 shapes at 16 px."""
    return {
        "stage": "vae",
        "output_dir": str(out),
        "device": "cpu",
        "seed": 0,
        "data": {"source": "shapes", "num_samples": 64, "resolution": 16},
        "vae": {
            "preset": "course",
            "overrides": {"base_channels": 8, "norm_num_groups": 4},
            "scale_batches": 1,
        },
        "optim": {"batch_size": 8, "max_steps": 3, "lr": 1e-3, "max_grad_norm": None},
        "ema": {"decay": 0.99},
        "logging": {"progress": False, "log_every": 1, "checkpoint_every": 1000},
    }


def ldm_config(arts: Artefacts, out: Path | str, *overrides: str) -> TrainConfig:
    """:func:`ldm_dict` with ``key=value`` overrides, validated."""
    return config_from_dict(apply_overrides(ldm_dict(arts, out), list(overrides)))


def vae_train_config(out: Path | str, *overrides: str) -> TrainConfig:
    return config_from_dict(apply_overrides(vae_dict(out), list(overrides)))


def train(config: TrainConfig):
    """Build the stage's trainer, run it to ``optim.max_steps``, return the trainer."""
    trainer = make_trainer(config)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def last_checkpoint(out: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    found = list_checkpoints(Path(out) / "checkpoints")
    assert found, f"no checkpoint in {out}"
    return read_checkpoint(found[-1])


def section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def assert_tensors_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 0.0, atol: float = 0.0
) -> None:
    """Same keys and values (exact by default), with the first differing key in the message."""
    assert sorted(a) == sorted(b), f"keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for key in sorted(a):
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
