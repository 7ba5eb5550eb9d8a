"""Samplers: one file per algorithm, the denoising loop written out.

- ``ddim``: DDIM (Song et al. 2021), deterministic or with eta
- ``ddpm``: ancestral sampling of the DDPM posterior (Ho et al. 2020)
- ``euler``, ``euler_ancestral``, ``heun``: Karras et al. 2022 in the sigma = sigma_t / alpha_t form
- ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022)

Each matches the diffusers scheduler of the same name step for step (tests/test_samplers_parity.py).
"""

from .ddim import ddim_sample, ddim_step
from .ddpm import ddpm_sample, ddpm_step
from .dpmpp_2m import dpmpp_2m_sample, dpmpp_2m_step
from .euler import euler_sample, euler_step, karras_sigmas
from .euler_ancestral import euler_ancestral_sample, euler_ancestral_step
from .heun import heun_sample, heun_step

__all__ = [
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "dpmpp_2m_sample",
    "dpmpp_2m_step",
    "euler_ancestral_sample",
    "euler_ancestral_step",
    "euler_sample",
    "euler_step",
    "heun_sample",
    "heun_step",
    "karras_sigmas",
]
