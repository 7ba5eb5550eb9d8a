r"""The latent diffusion training loss, assembled from the pieces of notebooks 01-06.

For clean latents :math:`x_0` and a caption embedding :math:`c`, with random :math:`t`,
:math:`\varepsilon` (offset noise, Guttenberg 2023) and, for input perturbation (Ning et al. 2023,
arXiv 2301.11706), :math:`\hat\varepsilon = \varepsilon + \rho\,\xi`:

.. math:: x_t = \alpha_t x_0 + \sigma_t \hat\varepsilon,\qquad
          y = \begin{cases}\varepsilon & \text{epsilon}\\ \alpha_t\varepsilon - \sigma_t x_0 & \text{v}\\
          x_0 & \text{sample}\end{cases},\qquad
          \mathcal L = \frac1B\sum_b w(t_b)\,\frac{1}{CHW}\lVert f_\theta(x_t, t, c) - y\rVert^2

with :math:`w = 1`, or Min-SNR-:math:`\gamma` (Hang et al. 2023, arXiv 2303.09556). The target is
built from the unperturbed :math:`\varepsilon`. All randomness is drawn up front by
:func:`draw_noise` for a whole (global) batch, so it can be sliced per micro-batch and process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..noise import offset_noise, perturb_noise, seeded_randn
from ..parameterization import training_target
from ..schedules import NoiseSchedule, per_sample
from ..weighting import min_snr_weight


@dataclass
class NoiseDraw:
    """The random inputs of one training step, for a batch of ``B`` samples."""

    timesteps: torch.Tensor  # (B,) int64 in [0, T)
    noise: torch.Tensor  # (B, C, H, W) epsilon, offset included: what the target is built from
    noisy_input_noise: torch.Tensor  # (B, C, H, W) the noise that makes x_t (perturbed or the same)
    drop_caption: torch.Tensor  # (B,) bool: replace the caption by "" (classifier-free guidance)
    posterior_eps: torch.Tensor  # (B, C, H, W) standard normal for z = mean + std * eps

    def __getitem__(self, rows: slice) -> NoiseDraw:
        return NoiseDraw(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


def draw_noise(
    batch_size: int,
    latent_shape: tuple[int, int, int],
    num_train_timesteps: int,
    generator: torch.Generator,
    *,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
    caption_dropout: float = 0.0,
) -> NoiseDraw:
    """Draw timesteps (uniform), noise (with offset), perturbation and caption dropout, in a fixed
    order from ``generator``, on the generator's device (float32)."""
    like = torch.empty((batch_size, *latent_shape), device=generator.device)
    timesteps = torch.randint(
        0, num_train_timesteps, (batch_size,), generator=generator, device=generator.device
    )
    noise = offset_noise(like, noise_offset, generator)
    noisy = perturb_noise(noise, input_perturbation, generator)
    drop = torch.rand(batch_size, generator=generator, device=generator.device) < caption_dropout
    posterior_eps = seeded_randn(tuple(like.shape), like, generator)
    return NoiseDraw(timesteps, noise, noisy, drop, posterior_eps)


def diffusion_loss(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    prediction_type: str,
    *,
    noisy_input_noise: torch.Tensor | None = None,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    r"""Per-sample loss :math:`w(t_b)\,\mathrm{mean}_{chw}(f_\theta(x_t, t) - y)^2`, shape ``(B,)``, fp32.

    ``model(x_t, t)`` is the network with its conditioning bound (e.g. a lambda passing the caption
    embeddings). ``noisy_input_noise`` (default ``noise``) makes :math:`x_t`; ``noise`` makes the target.
    """
    alpha = per_sample(schedule.alpha(timesteps), x0).to(x0)
    sigma = per_sample(schedule.sigma(timesteps), x0).to(x0)
    x_t = alpha * x0 + sigma * (noise if noisy_input_noise is None else noisy_input_noise)
    target = training_target(prediction_type, x0, noise, alpha, sigma)
    prediction = model(x_t, timesteps)
    mse = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if min_snr_gamma is not None:
        mse = mse * min_snr_weight(schedule.snr(timesteps).to(mse.device), min_snr_gamma, prediction_type)
    return mse
