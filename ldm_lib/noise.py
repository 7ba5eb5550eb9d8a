r"""The noise used to build :math:`x_t` in training: offset noise and input perturbation.

Both change only how the noise is drawn; the forward process
:math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon` stays the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import check_number

Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the whole tensor, one per batch row (so that a row does not depend on its
batch: the pipeline gives every image its own seed), or None for torch's global generator."""


def _randn(shape: tuple[int, ...], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """float32 standard normal noise drawn on the generator's device (a CPU generator cannot feed a
    CUDA tensor); with a sequence of generators, row ``i`` comes from ``generator[i]``."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(
            f"{len(generators)} generators for a batch of {shape[0]}; give one generator per row, "
            "one torch.Generator, or None"
        )
    return torch.stack([_randn(tuple(shape[1:]), g, g.device) for g in generators])


def seeded_randn(shape: tuple[int, ...], like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``like``'s device and dtype.

    Drawn in float32 on the generator's device (a CPU generator cannot feed a CUDA tensor),
    then moved: the same seed gives the same noise whatever the target device or dtype.
    """
    return _randn(shape, generator, like.device).to(device=like.device, dtype=like.dtype)


def initial_noise(
    shape: tuple[int, ...],
    generator: Generators = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""A sampler's start, :math:`x_T \sim \mathcal N(0, I)`: ``x_T`` itself when given, else drawn on
    the generator's device (a CPU generator gives the same noise for any target device) and moved
    to ``device``."""
    if x_T is not None:
        return x_T
    return _randn(shape, generator, device).to(device)


def offset_noise(
    like: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Gaussian noise with a random per-(sample, channel) offset (Guttenberg 2023, "Diffusion
    with Offset Noise", Crosslabs; analysed by Lin et al. 2023, arXiv 2305.08891):

    .. math:: \varepsilon = z + s\,\delta,\quad z \sim \mathcal N(0, I)^{B \times C \times H \times W},
              \ \delta \sim \mathcal N(0, I)^{B \times C \times 1 \times 1}

    Each channel's mean now varies from sample to sample, as the mean of real images does, so the
    model learns to move the mean of :math:`x_0` instead of keeping what leaks through at t = T.
    Each channel has variance :math:`1 + s^2` and its spatial mean has variance :math:`s^2 + 1/HW`.
    Recommended ``strength``: 0.05 to 0.2. The result has ``like``'s shape, device and dtype.
    """
    check_number("strength", strength, low=0.0)
    if like.ndim < 2:
        raise ValueError(f"like must have a batch and a channel axis, got shape {tuple(like.shape)}")
    noise = seeded_randn(tuple(like.shape), like, generator)
    if strength == 0:
        return noise
    offset_shape = (like.shape[0], like.shape[1]) + (1,) * (like.ndim - 2)
    return noise + strength * seeded_randn(offset_shape, like, generator)


def perturb_noise(
    noise: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion
    Models", DDPM-IP, arXiv 2301.11706):

    .. math:: \hat\varepsilon = \varepsilon + \rho\,\xi,\quad \xi \sim \mathcal N(0, I),\qquad
              x_t = \alpha_t x_0 + \sigma_t \hat\varepsilon,\qquad \text{target built from } \varepsilon

    Only the noise that makes :math:`x_t` is perturbed (variance :math:`1+\rho^2`); the training
    target is still built from the unperturbed ``noise``. This mimics the small errors a sampler's
    own predictions put into :math:`x_t` (exposure bias). Suggested ``strength``: 0.05 to 0.15.
    """
    check_number("strength", strength, low=0.0)
    if strength == 0:
        return noise
    return noise + strength * seeded_randn(tuple(noise.shape), noise, generator)
