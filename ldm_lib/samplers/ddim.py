r"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", arXiv 2010.02502).

One step from timestep :math:`t` to the previous sampled timestep :math:`s < t` (eq. 12):

.. math:: x_s = \alpha_s \hat x_0 + \sqrt{\sigma_s^2 - \eta_t^2}\,\hat\varepsilon + \eta_t z,\qquad
          \eta_t = \eta\,\frac{\sigma_s}{\sigma_t}\sqrt{1 - \frac{\alpha_t^2}{\alpha_s^2}}

with :math:`\hat x_0, \hat\varepsilon` the model's estimates at :math:`(x_t, t)`. ``eta = 0`` is
deterministic (the probability-flow ODE, discretised); ``eta = 1`` is DDPM's ancestral sampling.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .._checks import check_number
from ..noise import Generators, initial_noise, seeded_randn
from ..parameterization import eps_from_prediction, x0_from_prediction
from ..schedules import NoiseSchedule, inference_timesteps
from ._types import ModelFn, StepCallback


def ddim_step(
    schedule: NoiseSchedule,
    prediction_type: str,
    model_output: torch.Tensor,
    t: int,
    t_prev: int,
    x_t: torch.Tensor,
    eta: float = 0.0,
    generator: Generators = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One DDIM update :math:`x_t \to x_{t_{prev}}`; returns ``(x_prev, x0_pred)``.

    ``t_prev = -1`` means the final step to the clean sample (:math:`\alpha = 1, \sigma = 0`).
    """
    check_number("eta", eta, low=0.0)
    a_t, s_t = schedule.alpha(t).to(x_t), schedule.sigma(t).to(x_t)
    if t_prev >= 0:
        a_s, s_s = schedule.alpha(t_prev).to(x_t), schedule.sigma(t_prev).to(x_t)
    else:
        a_s, s_s = torch.ones_like(a_t), torch.zeros_like(s_t)
    x0 = x0_from_prediction(prediction_type, x_t, model_output, a_t, s_t)
    eps = eps_from_prediction(prediction_type, x_t, model_output, a_t, s_t)
    # eta_t: the std of fresh noise; the rest of sigma_s is the deterministic direction to x_t.
    eta_t = eta * (s_s / s_t) * (1 - a_t**2 / a_s**2).clamp(min=0).sqrt() if eta else torch.zeros_like(s_s)
    x_prev = a_s * x0 + (s_s**2 - eta_t**2).clamp(min=0).sqrt() * eps
    if eta:
        x_prev = x_prev + eta_t * seeded_randn(tuple(x_t.shape), x_t, generator)
    return x_prev, x0


@torch.no_grad()
def ddim_sample(
    model: ModelFn,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    num_inference_steps: int = 50,
    prediction_type: str = "epsilon",
    spacing: str = "trailing",
    eta: float = 0.0,
    generator: Generators = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    r"""Sample by DDIM from :math:`x_T \sim \mathcal N(0, I)`.

    ``model(x_t, t)`` returns the network's prediction (of ``prediction_type``) for a batch, with
    ``t`` a ``(B,)`` long tensor. Guidance, if any, lives inside ``model``.
    """
    timesteps = inference_timesteps(num_inference_steps, schedule.num_train_timesteps, spacing)
    x = initial_noise(shape, generator, device, x_T)
    steps = timesteps.tolist()
    for i, t in enumerate(tqdm(steps, desc="DDIM", disable=not progress, leave=False)):
        t_prev = steps[i + 1] if i + 1 < len(steps) else -1
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x, x0 = ddim_step(schedule, prediction_type, model(x, t_batch), t, t_prev, x, eta, generator)
        if callback is not None:
            callback(i, t, x0)
    return x
