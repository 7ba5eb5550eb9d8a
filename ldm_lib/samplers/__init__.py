"""Samplers: one file per algorithm, the denoising loop written out."""

from .ddim import ddim_sample, ddim_step

__all__ = ["ddim_sample", "ddim_step"]
