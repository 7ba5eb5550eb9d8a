r"""Euler ancestral sampler (Karras et al. 2022, arXiv 2206.00364; the ``sample_euler_ancestral`` of
Crowson's k-diffusion, which diffusers' ``EulerAncestralDiscreteScheduler`` follows).

Each step of :math:`\sigma_i \to \sigma_{i+1}` splits the target noise level into a deterministic
part :math:`\sigma_{down}` reached by an Euler step of the ODE, and fresh noise :math:`\sigma_{up}`,
with :math:`\sigma_{down}^2 + \sigma_{up}^2 = \sigma_{i+1}^2` and (for ``eta = 1``) the variance of the
DDPM posterior (Ho et al. 2020, arXiv 2006.11239, eq. 7, in the VE form):

.. math:: \sigma_{up} = \min\!\Big(\sigma_{i+1},
          \ \eta\sqrt{\sigma_{i+1}^2(\sigma_i^2-\sigma_{i+1}^2)/\sigma_i^2}\Big),\quad
          x_{i+1} = x_i + (\sigma_{down} - \sigma_i)\,\frac{x_i - D(x_i;\sigma_i)}{\sigma_i} + \sigma_{up}\,z.

Sigmas, input scaling and zero terminal SNR are handled as in :mod:`ldm_lib.samplers.euler`.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .._checks import check_choice, check_number
from ..noise import Generators, seeded_randn
from ..parameterization import PREDICTION_TYPES
from ..schedules import NoiseSchedule, inference_timesteps
from ._types import ModelFn, StepCallback
from .euler import as_sigma, denoise, initial_x, karras_sigmas, model_input


def ancestral_sigmas(
    sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(sigma_down, sigma_up)`` for a step :math:`\sigma \to \sigma_{next}` (formula above)."""
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def euler_ancestral_step(
    prediction_type: str,
    model_output: torch.Tensor,
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    eta: float = 1.0,
    generator: Generators = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One Euler-ancestral step in :math:`x`-space; returns ``(x_next, denoised)``.

    Noise is drawn (float32, from ``generator``) only when :math:`\sigma_{next} > 0`.
    """
    check_number("eta", eta, low=0.0)
    sigma, sigma_next = as_sigma("sigma", sigma, positive=True), as_sigma("sigma_next", sigma_next)
    if sigma_next > sigma:
        raise ValueError(f"sigma_next={float(sigma_next)!r} must be at most sigma={float(sigma)!r}")
    denoised = denoise(prediction_type, model_output, x, sigma)
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
    d = (x - denoised) / sigma
    x_next = x + d * (sigma_down - sigma)
    if sigma_next > 0:
        x_next = x_next + sigma_up * seeded_randn(tuple(x.shape), x, generator)
    return x_next, denoised


@torch.no_grad()
def euler_ancestral_sample(
    model: ModelFn,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    num_inference_steps: int = 50,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    eta: float = 1.0,
    generator: Generators = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
    steps_offset: int = 0,
) -> torch.Tensor:
    r"""Sample with Euler-ancestral steps from :math:`x_T \sim \mathcal N(0, I)` (VP).

    ``model(x_t, t)`` as for :func:`~ldm_lib.samplers.euler.euler_sample`. The generator draws
    ``x_T`` (if not given) then one noise tensor per step but the last.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_number("eta", eta, low=0.0)
    timesteps = inference_timesteps(num_inference_steps, schedule.num_train_timesteps, spacing, steps_offset)
    sigmas = karras_sigmas(schedule, timesteps)
    x = initial_x(shape, float(sigmas[0]), generator, device, x_T)
    for i, t in enumerate(tqdm(timesteps.tolist(), desc="Euler a", disable=not progress, leave=False)):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        model_output = model(model_input(x, sigmas[i]), t_batch)
        x, x0 = euler_ancestral_step(
            prediction_type, model_output, x, sigmas[i], sigmas[i + 1], eta, generator
        )
        if callback is not None:
            callback(i, t, x0)
    return x
