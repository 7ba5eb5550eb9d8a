"""Training: the config, both stages (VAE, latent diffusion), checkpoints, EMA, metrics.

``python -m ldm_lib.train CONFIG [key=value ...]`` is the command line; in Python::

    from ldm_lib.training import load_config, make_trainer
    trainer = make_trainer(load_config("configs/shapes_ldm_eps.yaml", ["optim.max_steps=100"]))
    trainer.train()
"""

from __future__ import annotations

from .config import ConfigError, TrainConfig, config_from_dict, load_config
from .diffusion_loss import NoiseDraw, diffusion_loss, draw_noise
from .ema import EMA, ema_decay
from .lr_schedule import lr_factor
from .metrics import plot_metrics, read_metrics
from .trainer import NonFiniteLossError, Trainer


def make_trainer(config: TrainConfig) -> Trainer:
    """The trainer of ``config.stage``: :class:`~.vae_stage.VAETrainer` or :class:`~.ldm_stage.LDMTrainer`."""
    if config.stage == "vae":
        from .vae_stage import VAETrainer

        return VAETrainer(config)
    from .ldm_stage import LDMTrainer

    return LDMTrainer(config)


__all__ = [
    "EMA",
    "ConfigError",
    "NoiseDraw",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "config_from_dict",
    "diffusion_loss",
    "draw_noise",
    "ema_decay",
    "load_config",
    "lr_factor",
    "make_trainer",
    "plot_metrics",
    "read_metrics",
]
