r"""Heun's second-order sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", arXiv 2206.00364, Alg. 1, deterministic: :math:`S_{churn} = 0`).

An Euler step to :math:`\sigma_{i+1}`, then the trapezoidal correction with the slope there:

.. math:: d_i = \frac{x_i - D(x_i;\sigma_i)}{\sigma_i},\quad
          \tilde x = x_i + (\sigma_{i+1}-\sigma_i)\,d_i,\quad
          d_i' = \frac{\tilde x - D(\tilde x;\sigma_{i+1})}{\sigma_{i+1}},\quad
          x_{i+1} = x_i + (\sigma_{i+1}-\sigma_i)\,\tfrac12(d_i + d_i').

The correction is skipped on the last step (:math:`\sigma_{i+1} = 0`), so ``N`` steps cost
``2N - 1`` network calls. Sigmas, input scaling and zero terminal SNR as in
:mod:`ldm_lib.samplers.euler` (diffusers' ``HeunDiscreteScheduler`` has no zero-SNR option;
we clamp as its Euler scheduler does).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .._checks import check_choice
from ..noise import Generators
from ..parameterization import PREDICTION_TYPES
from ..schedules import NoiseSchedule, inference_timesteps
from ._types import ModelFn, StepCallback
from .euler import as_sigma, denoise, initial_x, karras_sigmas, model_input


def heun_step(
    model: ModelFn,
    prediction_type: str,
    x: torch.Tensor,
    t: int,
    t_next: int,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One Heun step :math:`x_i \to x_{i+1}` in :math:`x`-space; returns ``(x_next, denoised)``.

    Unlike the one-evaluation steps this takes the ``model`` (it is called at :math:`(x_i, t)` and,
    unless :math:`\sigma_{next} = 0`, at :math:`(\tilde x, t_{next})`).
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    sigma, sigma_next = as_sigma("sigma", sigma, positive=True), as_sigma("sigma_next", sigma_next)
    batch = x.shape[0]
    t_batch = torch.full((batch,), t, device=x.device, dtype=torch.long)
    denoised = denoise(prediction_type, model(model_input(x, sigma), t_batch), x, sigma)
    d = (x - denoised) / sigma
    dt = sigma_next - sigma
    x_euler = x + d * dt
    if sigma_next == 0:
        return x_euler, denoised
    t_next_batch = torch.full((batch,), t_next, device=x.device, dtype=torch.long)
    denoised_next = denoise(
        prediction_type, model(model_input(x_euler, sigma_next), t_next_batch), x_euler, sigma_next
    )
    d_next = (x_euler - denoised_next) / sigma_next
    return x + (d + d_next) / 2 * dt, denoised


@torch.no_grad()
def heun_sample(
    model: ModelFn,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    num_inference_steps: int = 50,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    generator: Generators = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
    steps_offset: int = 0,
) -> torch.Tensor:
    r"""Sample with Heun steps from :math:`x_T \sim \mathcal N(0, I)` (VP); ``model`` as for Euler."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    timesteps = inference_timesteps(num_inference_steps, schedule.num_train_timesteps, spacing, steps_offset)
    sigmas = karras_sigmas(schedule, timesteps)
    steps = timesteps.tolist()
    x = initial_x(shape, float(sigmas[0]), generator, device, x_T)
    for i, t in enumerate(tqdm(steps, desc="Heun", disable=not progress, leave=False)):
        t_next = steps[i + 1] if i + 1 < len(steps) else 0  # unused on the last step (sigma_next = 0)
        x, x0 = heun_step(model, prediction_type, x, t, t_next, sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback(i, t, x0)
    return x
