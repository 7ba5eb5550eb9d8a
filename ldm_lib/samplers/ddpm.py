r"""DDPM ancestral sampling (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models",
arXiv 2006.11239, eq. 6-7), on a subsequence of timesteps.

From :math:`t` to the previous sampled timestep :math:`s < t`, draw from the posterior
:math:`q(x_s \mid x_t, \hat x_0)` with the strided :math:`\beta_t = 1 - \bar\alpha_t/\bar\alpha_s`:

.. math:: \tilde\mu = \frac{\sqrt{\bar\alpha_s}\,\beta_t}{1-\bar\alpha_t}\hat x_0
          + \frac{\sqrt{1-\beta_t}\,(1-\bar\alpha_s)}{1-\bar\alpha_t}x_t,\qquad
          \tilde\beta = \frac{1-\bar\alpha_s}{1-\bar\alpha_t}\beta_t,\qquad
          x_s = \tilde\mu + \sqrt{\tilde\beta}\,z.

:math:`\tilde\beta` is diffusers' ``variance_type="fixed_small"``. With ``s = -1`` (the last step)
:math:`\bar\alpha_s = 1`, so :math:`x_s = \hat x_0` with no noise. At zero terminal SNR
(:math:`\bar\alpha_T = 0`) :math:`\hat x_0` needs a v or x0 prediction: epsilon says nothing there.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .._checks import check_choice
from ..noise import Generators, initial_noise, seeded_randn
from ..parameterization import PREDICTION_TYPES, x0_from_prediction
from ..schedules import NoiseSchedule, inference_timesteps
from ._types import ModelFn, StepCallback


def ddpm_step(
    schedule: NoiseSchedule,
    prediction_type: str,
    model_output: torch.Tensor,
    t: int,
    t_prev: int,
    x_t: torch.Tensor,
    generator: Generators = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One ancestral step :math:`x_t \to x_{t_{prev}}`; returns ``(x_prev, x0_pred)``.

    ``t_prev = -1`` is the final step to the clean sample. Noise (float32, from ``generator``) is
    drawn only when ``t_prev >= 0``.
    """
    if not -1 <= t_prev < t:
        raise ValueError(f"t_prev={t_prev!r} must satisfy -1 <= t_prev < t={t!r}")
    abar_t = schedule.alphas_cumprod[t].item()
    abar_prev = schedule.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
    alpha_t = abar_t / abar_prev  # strided: the product of (1 - beta) over (t_prev, t]
    beta_t = 1 - alpha_t
    x0 = x0_from_prediction(prediction_type, x_t, model_output, abar_t**0.5, (1 - abar_t) ** 0.5)
    mean = (abar_prev**0.5 * beta_t / (1 - abar_t)) * x0 + (
        alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)
    ) * x_t
    if t_prev < 0:
        return mean, x0
    variance = (1 - abar_prev) / (1 - abar_t) * beta_t  # beta tilde, Ho et al. eq. 7
    return mean + variance**0.5 * seeded_randn(tuple(x_t.shape), x_t, generator), x0


@torch.no_grad()
def ddpm_sample(
    model: ModelFn,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    num_inference_steps: int = 1000,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    generator: Generators = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
    steps_offset: int = 0,
) -> torch.Tensor:
    r"""Sample by DDPM from :math:`x_T \sim \mathcal N(0, I)`; ``model(x_t, t)`` as for DDIM.

    The generator draws ``x_T`` (if not given) then one noise tensor per step but the last.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    timesteps = inference_timesteps(num_inference_steps, schedule.num_train_timesteps, spacing, steps_offset)
    steps = timesteps.tolist()
    if prediction_type == "epsilon" and schedule.alphas_cumprod[steps[0]] == 0:
        raise ValueError(
            f"prediction_type='epsilon' cannot be sampled from t={steps[0]}, where alphas_cumprod = 0 "
            "(zero terminal SNR); allowed: 'v_prediction' or 'sample'"
        )
    x = initial_noise(shape, generator, device, x_T)
    for i, t in enumerate(tqdm(steps, desc="DDPM", disable=not progress, leave=False)):
        t_prev = steps[i + 1] if i + 1 < len(steps) else -1
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x, x0 = ddpm_step(schedule, prediction_type, model(x, t_batch), t, t_prev, x, generator)
        if callback is not None:
            callback(i, t, x0)
    return x
