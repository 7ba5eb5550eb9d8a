"""Exercises of notebook 07_autoencoder: the reparameterisation trick and the KL of a diagonal
Gaussian posterior to N(0, I) (Kingma & Welling 2014, arXiv 1312.6114).

The references are the library's :class:`~ldm_lib.models.vae.DiagonalGaussian`. It clamps the
log-variance to [-30, 20], so every case keeps ``logvar`` inside that range, where the clamp does
nothing and the closed forms hold exactly. Each case names its situation (batch of one, 3-D and 4-D
latents, the prior itself, very confident and very vague posteriors), because that is where the
usual mistakes show.
"""

from __future__ import annotations

import torch

from ..models.vae import DiagonalGaussian
from .checker import Case, Exercise, register


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _posterior(mean: torch.Tensor, logvar: torch.Tensor) -> DiagonalGaussian:
    """The library's posterior with these parameters (mean and log-variance stacked on dim 1)."""
    return DiagonalGaussian(torch.cat([mean, logvar], dim=1))


def _extreme_logvar(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Log-variances of -25 (std 3.7e-6, a very confident posterior) and 18 (std 8103, a vague one),
    mixed at random: inside the library's clamp range [-30, 20], far from 0."""
    pick = torch.rand(shape, generator=generator) < 0.5
    return torch.where(pick, torch.full(shape, -25.0), torch.full(shape, 18.0))


def _sum_non_batch(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------- reparameterized_sample


def _reparameterized_sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    posterior = _posterior(mean, logvar)
    return posterior.mean + posterior.std * noise


def _sample_cases() -> list[Case]:
    g = _gen(70)

    def triple(*shape: int, scale: float = 1.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = torch.randn(*shape, generator=g)
        logvar = scale * torch.randn(*shape, generator=g)
        return mean, logvar, torch.randn(*shape, generator=g)

    m, lv, n = triple(4, 4, 8, 8)
    m1, lv1, n1 = triple(1, 4, 8, 8)
    m3, lv3, n3 = triple(3, 2, 16)
    mx, _, nx = triple(2, 4, 4, 4)
    m64, lv64, n64 = (a.double() for a in triple(2, 4, 4, 4))
    return [
        Case("4 latents (B, c, h, w) = (4, 4, 8, 8), logvar ~ N(0, 1.5^2)", (m, lv, n)),
        Case("a batch of one latent (1, 4, 8, 8)", (m1, lv1, n1)),
        Case("3-D latents (B, c, L) = (3, 2, 16): nothing may assume 4 dimensions", (m3, lv3, n3)),
        Case("logvar = 0 (std 1): the sample must be mean + noise", (m, torch.zeros_like(lv), n)),
        Case("noise = 0: the sample must be the mean", (m, lv, torch.zeros_like(n))),
        Case(
            "large |logvar|: -25 (std 3.7e-6) and 18 (std 8103), mixed",
            (mx, _extreme_logvar(tuple(mx.shape), g), nx),
        ),
        Case("float64 inputs: the result stays float64", (m64, lv64, n64)),
    ]


register(
    Exercise(
        name="reparameterized_sample",
        notebook="07_autoencoder",
        hint=(
            "z = mean + sigma * noise, where sigma is the standard deviation: "
            "logvar = log(sigma**2), so sigma = exp(0.5 * logvar)."
        ),
        reference=_reparameterized_sample,
        cases=_sample_cases,
        mistakes=[
            (
                lambda m, lv, n: m + lv * n,
                "you used logvar itself as the standard deviation; sigma = exp(0.5 * logvar)",
            ),
            (
                lambda m, lv, n: m + torch.exp(lv) * n,
                "exp(logvar) is the variance sigma**2, not the standard deviation; sigma = exp(0.5 * logvar)",
            ),
            (
                lambda m, lv, n: m + torch.exp(-0.5 * lv) * n,
                "exp(-0.5 * logvar) is 1 / sigma; the sign of the exponent is +",
            ),
        ],
    )
)


# ---------------------------------------------------------------- gaussian_kl


def _gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return _posterior(mean, logvar).kl()


def _kl_cases() -> list[Case]:
    g = _gen(71)

    def pair(*shape: int, scale: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(*shape, generator=g), scale * torch.randn(*shape, generator=g)

    m, lv = pair(4, 4, 8, 8)
    m1, lv1 = pair(1, 4, 8, 8)
    m3, lv3 = pair(3, 2, 16)
    m2, lv2 = pair(5, 6)
    mx, _ = pair(2, 4, 4, 4)
    m64, lv64 = (a.double() for a in pair(2, 4, 4, 4))
    return [
        Case("4 latents (B, c, h, w) = (4, 4, 8, 8), logvar ~ N(0, 1.5^2)", (m, lv)),
        Case("a batch of one latent (1, 4, 8, 8): the result has shape (1,)", (m1, lv1)),
        Case("3-D latents (B, c, L) = (3, 2, 16): sum over every non-batch dimension", (m3, lv3)),
        Case("flat latent vectors (B, d) = (5, 6)", (m2, lv2)),
        Case("the prior itself (mean = 0, logvar = 0): the KL is exactly 0", (0 * m, 0 * lv)),
        Case("mean = 3 everywhere, logvar = 0: only the mean term, 0.5 * 9 per element", (0 * m + 3, 0 * lv)),
        Case(
            "large |logvar|: -25 (std 3.7e-6) and 18 (std 8103), mixed",
            (mx, _extreme_logvar(tuple(mx.shape), g)),
        ),
        Case("float64 inputs: the result stays float64", (m64, lv64)),
    ]


register(
    Exercise(
        name="gaussian_kl",
        notebook="07_autoencoder",
        hint=(
            "Per element, KL = 0.5 * (mean**2 + exp(logvar) - 1 - logvar); sum it over every "
            "dimension except the batch dimension 0, giving one value per sample, shape (B,)."
        ),
        reference=_gaussian_kl,
        cases=_kl_cases,
        mistakes=[
            (
                lambda m, lv: _sum_non_batch(m**2 + lv.exp() - 1 - lv),
                "twice the KL: the factor 0.5 is missing",
            ),
            (
                lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 - lv).mean(dim=tuple(range(1, m.ndim))),
                "you averaged over the latent elements; the KL of independent dimensions is their sum",
            ),
            (
                lambda m, lv: 0.5 * _sum_non_batch(m**2 + lv - 1 - torch.log(lv)),
                "you used logvar as the variance; the variance is exp(logvar) and log(variance) is logvar",
            ),
            (
                lambda m, lv: 0.5 * _sum_non_batch(m**2 + torch.exp(2 * lv) - 1 - 2 * lv),
                "you treated logvar as log(sigma); it is log(sigma**2), so the variance is exp(logvar)",
            ),
            (
                lambda m, lv: 0.5 * _sum_non_batch(m**2 + lv.exp() - 1 + lv),
                "the sign of the log term is wrong: it is - log(sigma**2) = - logvar",
            ),
            (
                lambda m, lv: _gaussian_kl(m, lv).sum(),
                "you summed over the batch too; return one KL per sample, shape (B,)",
            ),
        ],
    )
)
