r"""Euler sampler for the probability-flow ODE (Karras, Aittala, Aila & Laine 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models", arXiv 2206.00364, Alg. 1 without the Heun
correction and with :math:`S_{churn} = 0`).

Karras et al. write the variance-preserving process in the variance-exploding form
:math:`x = x_t / \alpha_t = x_0 + \sigma\varepsilon` with

.. math:: \sigma = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t},

so that sampling is the ODE :math:`\mathrm dx/\mathrm d\sigma = (x - D(x;\sigma))/\sigma` (eq. 3
with :math:`\sigma(t) = t`). The denoiser :math:`D(x;\sigma) = c_{skip}x + c_{out}F(c_{in}x, t)`
(eq. 7) wraps a network trained on the VP input :math:`x_t = c_{in}x`, :math:`c_{in} = 1/\sqrt{\sigma^2+1}`.
One Euler step is

.. math:: x_{i+1} = x_i + (\sigma_{i+1} - \sigma_i)\,\frac{x_i - D(x_i;\sigma_i)}{\sigma_i}.

At zero terminal SNR :math:`\sigma_T = \infty`; as diffusers' ``EulerDiscreteScheduler`` does, the
last :math:`\bar\alpha` is raised to :math:`2^{-24}` (:math:`\sigma_T \approx 4096`). The functions
here work in :math:`x`-space; the samplers take and return VP tensors (:math:`x_T \sim \mathcal N(0, I)`,
and :math:`x = x_0` at :math:`\sigma = 0`).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .._checks import check_choice, check_number
from ..noise import Generators, initial_noise
from ..parameterization import PREDICTION_TYPES
from ..schedules import NoiseSchedule, inference_timesteps
from ._types import ModelFn, StepCallback

# Smallest alphas_cumprod allowed: keeps sigma_T finite at zero terminal SNR (diffusers' choice).
MIN_ALPHAS_CUMPROD = 2.0**-24


def karras_sigmas(schedule: NoiseSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    r""":math:`\sigma_i = \sqrt{(1-\bar\alpha_{t_i})/\bar\alpha_{t_i}}` at the given timesteps, then a 0.

    Returns a float32 tensor of length ``len(timesteps) + 1`` (computed in float32 as diffusers does,
    so that both give bit-identical sigmas). :math:`\bar\alpha` is clamped to at least
    :math:`2^{-24}` so that a zero-terminal-SNR schedule gives a finite :math:`\sigma_T`.
    """
    alphas_cumprod = schedule.alphas_cumprod.clamp(min=MIN_ALPHAS_CUMPROD)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return torch.cat([sigmas[timesteps.long().cpu()], torch.zeros(1)])


def as_sigma(option: str, value: float | torch.Tensor, positive: bool = False) -> torch.Tensor:
    """Check a noise level and return it as a float32 scalar tensor.

    float32 on purpose: sigma differences such as ``sigma_next - sigma`` are then rounded as in
    diffusers, which matters at :math:`\\sigma_T \approx 4096` where one float32 ulp is 5e-4.
    """
    number = float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    check_number(option, number, low=0.0, low_open=positive)
    return torch.tensor(number, dtype=torch.float32)


def model_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    r""":math:`c_{in}x = x/\sqrt{\sigma^2+1} = x_t`: the VP tensor the network was trained on."""
    return x / (sigma**2 + 1) ** 0.5


def denoise(
    prediction_type: str, model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    r""":math:`D(x;\sigma) = c_{skip}x + c_{out}F` (Karras et al. 2022, eq. 7, Table 1 for the VP network).

    - epsilon: :math:`c_{skip} = 1`, :math:`c_{out} = -\sigma` (:math:`x_0 = x - \sigma\hat\varepsilon`),
    - v (Salimans & Ho 2022, arXiv 2202.00512): :math:`c_{skip} = 1/(\sigma^2+1)`,
      :math:`c_{out} = -\sigma/\sqrt{\sigma^2+1}`,
    - sample: :math:`c_{skip} = 0`, :math:`c_{out} = 1`.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return model_output


def euler_step(
    prediction_type: str,
    model_output: torch.Tensor,
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One Euler step :math:`x_i \to x_{i+1}` in :math:`x`-space; returns ``(x_next, denoised)``.

    ``model_output`` is the network's output at input :math:`x/\sqrt{\sigma^2+1}`.
    """
    sigma, sigma_next = as_sigma("sigma", sigma, positive=True), as_sigma("sigma_next", sigma_next)
    denoised = denoise(prediction_type, model_output, x, sigma)
    d = (x - denoised) / sigma  # dx/dsigma, eq. 3
    return x + d * (sigma_next - sigma), denoised


def initial_x(
    shape: tuple[int, ...],
    sigma_max: float,
    generator: Generators,
    device: torch.device | str,
    x_T: torch.Tensor | None,
) -> torch.Tensor:
    r""":math:`x = x_T\sqrt{\sigma_{max}^2+1}`, :math:`x_T \sim \mathcal N(0, I)` (VP noise) unless given.

    diffusers' ``init_noise_sigma`` is :math:`\sigma_{max}` for trailing/linspace, an approximation of
    the same factor; we keep the exact one so that the network's first input is exactly ``x_T``.
    """
    x_T = initial_noise(shape, generator, device, x_T)
    return x_T * (sigma_max**2 + 1) ** 0.5


@torch.no_grad()
def euler_sample(
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
    r"""Sample with Euler steps from :math:`x_T \sim \mathcal N(0, I)` (VP); one network call per step.

    ``model(x_t, t)`` sees the VP input :math:`x_t = x/\sqrt{\sigma^2+1}` and a ``(B,)`` long ``t``,
    as with DDIM. Returns :math:`x` at :math:`\sigma = 0`.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    timesteps = inference_timesteps(num_inference_steps, schedule.num_train_timesteps, spacing, steps_offset)
    sigmas = karras_sigmas(schedule, timesteps)
    x = initial_x(shape, float(sigmas[0]), generator, device, x_T)
    for i, t in enumerate(tqdm(timesteps.tolist(), desc="Euler", disable=not progress, leave=False)):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        model_output = model(model_input(x, sigmas[i]), t_batch)
        x, x0 = euler_step(prediction_type, model_output, x, sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback(i, t, x0)
    return x
