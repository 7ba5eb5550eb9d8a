r"""DPM-Solver++(2M) (Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", arXiv 2211.01095, Alg. 2), as diffusers'
``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True)``.

In the VP form :math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon` with the half log-SNR
:math:`\lambda_t = \log(\alpha_t/\sigma_t)`, the exact solution of the ODE in data prediction
:math:`\hat x_0 = x_\theta(x_t, t)` is integrated with :math:`x_\theta` linear in :math:`\lambda`,
reusing the previous step's :math:`\hat x_0` (multistep):

.. math:: h_i = \lambda_{t_i} - \lambda_{t_{i-1}},\quad r_i = h_{i-1}/h_i,\quad
          D_i = \big(1 + \tfrac{1}{2r_i}\big)\hat x_0^{(i-1)} - \tfrac{1}{2r_i}\hat x_0^{(i-2)},

.. math:: x_{t_i} = \frac{\sigma_{t_i}}{\sigma_{t_{i-1}}}x_{t_{i-1}} - \alpha_{t_i}\big(e^{-h_i}-1\big)D_i.

The first step (no history) and the last (to :math:`\sigma = 0`, where it gives :math:`\hat x_0`) are
first order, :math:`D_i = \hat x_0^{(i-1)}` (DPM-Solver++(1) = DDIM). :math:`\alpha_t, \sigma_t` come
from the Karras sigma, :math:`\alpha = 1/\sqrt{\sigma^2+1}`, :math:`\sigma_t = \sigma\alpha`, with the
:math:`2^{-24}` clamp of :mod:`ldm_lib.samplers.euler` at zero terminal SNR. Timesteps as diffusers:
``"leading"``/``"linspace"`` take ``N + 1`` points and drop the last (t = 0), ``"trailing"`` as usual.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .._checks import check_choice, check_number
from ..noise import Generators, initial_noise
from ..parameterization import PREDICTION_TYPES, x0_from_prediction
from ..schedules import NoiseSchedule, inference_timesteps
from ._types import ModelFn, StepCallback
from .euler import karras_sigmas


def dpmpp_2m_timesteps(
    num_inference_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int = 0
) -> torch.Tensor:
    """The descending timesteps diffusers' DPMSolverMultistepScheduler visits for each spacing."""
    check_choice("spacing", spacing, ("leading", "trailing", "linspace"))
    check_number(
        "num_inference_steps", num_inference_steps, low=1, high=num_train_timesteps - 1, integer=True
    )
    if spacing == "trailing":
        return inference_timesteps(num_inference_steps, num_train_timesteps, spacing, steps_offset)
    return inference_timesteps(num_inference_steps + 1, num_train_timesteps, spacing, steps_offset)[:-1]


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def dpmpp_2m_step(
    prediction_type: str,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    sigma: float,
    sigma_next: float,
    x0_prev: torch.Tensor | None = None,
    sigma_prev: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One DPM-Solver++(2M) step on the VP sample ``x_t``; returns ``(x_next, x0_pred)``.

    ``sigma`` are Karras sigmas (:func:`~ldm_lib.samplers.euler.karras_sigmas`). Pass the previous
    step's ``x0_pred`` and sigma for the second-order update; without them, or when
    ``sigma_next = 0``, the step is first order.
    """
    check_number("sigma", sigma, low=0.0, low_open=True)
    check_number("sigma_next", sigma_next, low=0.0, high=sigma)
    if (x0_prev is None) != (sigma_prev is None):
        raise ValueError("x0_prev and sigma_prev must be given together (or both None)")
    # float32 scalars, as diffusers computes them.
    alpha_s, sigma_s = _alpha_sigma(torch.tensor(sigma, dtype=torch.float32))
    x0 = x0_from_prediction(prediction_type, x_t, model_output, alpha_s.to(x_t), sigma_s.to(x_t))
    if sigma_next == 0:
        return x0, x0  # the limit h -> inf of the update: alpha = 1, sigma = 0
    alpha_t, sigma_t = _alpha_sigma(torch.tensor(sigma_next, dtype=torch.float32))
    lambda_t, lambda_s = alpha_t.log() - sigma_t.log(), alpha_s.log() - sigma_s.log()
    h = lambda_t - lambda_s
    D = x0
    if x0_prev is not None:
        alpha_u, sigma_u = _alpha_sigma(torch.tensor(sigma_prev, dtype=torch.float32))
        r = (lambda_s - (alpha_u.log() - sigma_u.log())) / h
        D = x0 + (0.5 / r) * (x0 - x0_prev)  # (1 + 1/2r) x0 - 1/2r x0_prev
    x_next = (sigma_t / sigma_s).to(x_t) * x_t - (alpha_t * (torch.exp(-h) - 1.0)).to(x_t) * D
    return x_next, x0


@torch.no_grad()
def dpmpp_2m_sample(
    model: ModelFn,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    num_inference_steps: int = 20,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    generator: Generators = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
    steps_offset: int = 0,
) -> torch.Tensor:
    r"""Sample with DPM-Solver++(2M) from :math:`x_T \sim \mathcal N(0, I)`; ``model(x_t, t)`` as DDIM."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    timesteps = dpmpp_2m_timesteps(num_inference_steps, schedule.num_train_timesteps, spacing, steps_offset)
    sigmas = karras_sigmas(schedule, timesteps).tolist()
    x_T = initial_noise(shape, generator, device, x_T)
    x, x0_prev, sigma_prev = x_T, None, None
    for i, t in enumerate(tqdm(timesteps.tolist(), desc="DPM++ 2M", disable=not progress, leave=False)):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x, x0 = dpmpp_2m_step(
            prediction_type, model(x, t_batch), x, sigmas[i], sigmas[i + 1], x0_prev, sigma_prev
        )
        x0_prev, sigma_prev = x0, sigmas[i]
        if callback is not None:
            callback(i, t, x0)
    return x
