r"""Exercises of notebook 13_noise_experiments: measuring brightness, and the signal-to-noise ratio of
the spatial mean that decides whether a model reads an image's brightness off its starting noise.

- ``background_luma(images, border)``: the brightness of each image's background, the mean luma
  :math:`Y = 0.299R + 0.587G + 0.114B` (Rec. ITU-R BT.601) of its ``border`` outermost rows and
  columns, on RGB mapped from :math:`[-1, 1]` to :math:`[0, 1]` by :math:`(x + 1)/2` and clamped.
  Reference: :func:`ldm_lib.eval.border_brightness`.
- ``mean_snr(alphas_cumprod, num_pixels, mean_var, offset)``: the signal-to-noise ratio of one
  channel's spatial mean :math:`m_t = \alpha_t m_0 + \sigma_t m_\varepsilon` of :math:`x_t`,

  .. math:: \mathrm{SNR}_{\text{mean}}(t) = \frac{\bar\alpha_t\,\mathrm{Var}(m_0)}
            {(1 - \bar\alpha_t)\,(1/N + s^2)}

  where :math:`N = HW` pixels average the noise (variance :math:`1/N`) and offset noise of strength
  :math:`s` adds :math:`s^2` to the variance of its mean (Guttenberg 2023; Lin et al. 2023, arXiv
  2305.08891). It is the per-pixel SNR :math:`\bar\alpha_t/(1-\bar\alpha_t)` of the schedule, times
  :math:`\mathrm{Var}(m_0)` (the clean means' spread), times :math:`N` when :math:`s = 0`: at
  :math:`t = T` the mean of :math:`x_T` still tells the brightness of :math:`x_0`.

Every exercise notebook imports this module (through ``ldm_lib.exercises``), so it imports only
torch at the top; the references import :mod:`ldm_lib.eval` when notebook 13 checks an answer.
"""

from __future__ import annotations

import torch

from .checker import Case, Exercise, register


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- background_luma


def _background_luma(images: torch.Tensor, border: int) -> torch.Tensor:
    from ..eval.brightness import border_brightness

    return border_brightness(images, border)


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    from ..eval.brightness import LUMA_WEIGHTS  # deferred: exercise modules import torch only

    return sum(w * rgb[:, i] for i, w in enumerate(LUMA_WEIGHTS))


def _ring(y: torch.Tensor, border: int) -> torch.Tensor:
    """The mean of ``y`` (B, H, W) over the border ring, the right way."""
    mask = torch.ones(y.shape[1:], dtype=torch.bool)
    mask[border:-border, border:-border] = False
    return y[:, mask].mean(dim=1)


def _unit(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) / 2).clamp(0, 1)


def _strips(y: torch.Tensor, border: int) -> torch.Tensor:
    """Mean of the four strips' means: the corners counted twice."""
    top, bottom = y[:, :border, :], y[:, -border:, :]
    left, right = y[:, :, :border], y[:, :, -border:]
    return torch.cat([top.flatten(1), bottom.flatten(1), left.flatten(1), right.flatten(1)], 1).mean(1)


BACKGROUND_LUMA_MISTAKES = [
    (
        lambda images, border: _ring(_luma(images.clamp(0, 1)), border),
        "the images were not mapped from [-1, 1] to [0, 1] first: use (images + 1) / 2 (then clamp)",
    ),
    (
        lambda images, border: _ring(_luma((images + 1) / 2), border),
        "the values were not clamped to [0, 1]: a decoder overshoots slightly, and luma is defined on [0, 1]",
    ),
    (
        lambda images, border: _ring(_unit(images).mean(dim=1), border),
        "that is the plain mean of R, G and B; luma weighs them 0.299 R + 0.587 G + 0.114 B (BT.601)",
    ),
    (
        lambda images, border: _luma(_unit(images)).mean(dim=(1, 2)),
        "that is the mean of the whole image; the background is the border: the `border` outermost "
        "rows and columns",
    ),
    (
        lambda images, border: _strips(_luma(_unit(images)), border),
        "the four strips overlap at the corners, which were counted twice: take the mean over the set "
        "of border pixels (a boolean mask), each pixel once",
    ),
    (
        lambda images, border: torch.cat(
            [_luma(_unit(images))[:, :border].flatten(1), _luma(_unit(images))[:, -border:].flatten(1)], 1
        ).mean(1),
        "only the top and bottom rows were used; the border also has the left and right columns",
    ),
    (
        lambda images, border: _ring(_luma(_unit(images)), 1),
        "the border is `border` pixels wide, not always 1",
    ),
]


def _background_luma_cases() -> list[Case]:
    g = _gen(13)

    def images(b: int, h: int, w: int, spread: float = 1.2) -> torch.Tensor:
        return (2 * torch.rand(b, 3, h, w, generator=g) - 1) * spread

    flat = torch.full((2, 3, 8, 8), -1.0)
    flat[1] = 1.0
    flat[:, :, 2:-2, 2:-2] = 0.3  # a "shape" inside: must not count
    return [
        Case("4 random 32x32 images in [-1.2, 1.2] (a decoder overshoots), border 1", (images(4, 32, 32), 1)),
        Case("3 random 64x64 images, border 2", (images(3, 64, 64), 2)),
        Case("2 random 16x24 images (not square), border 3", (images(2, 16, 24), 3)),
        Case("a black and a white background around a gray square, 8x8, border 2", (flat, 2)),
        Case("one random 8x8 image in [-1, 1], border 1", (images(1, 8, 8, 1.0), 1)),
    ]  # fmt: skip


register(
    Exercise(
        name="background_luma",
        notebook="13_noise_experiments",
        hint=(
            "rgb = ((images + 1) / 2).clamp(0, 1); y = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + "
            "0.114 * rgb[:, 2] (shape (B, H, W)); mask = torch.ones(H, W, dtype=torch.bool); "
            "mask[border:-border, border:-border] = False; return y[:, mask].mean(dim=1)."
        ),
        reference=_background_luma,
        cases=_background_luma_cases,
        mistakes=BACKGROUND_LUMA_MISTAKES,
    )
)


# ---------------------------------------------------------------- mean_snr


def _mean_snr(alphas_cumprod: torch.Tensor, num_pixels: int, mean_var: float, offset: float) -> torch.Tensor:
    a = alphas_cumprod
    return a * mean_var / ((1 - a) * (1 / num_pixels + offset**2))


def _snr_with(signal=None, noise=None):
    """A wrong mean SNR: the reference with the signal or the noise power replaced."""

    def fn(alphas_cumprod, num_pixels, mean_var, offset):
        a = alphas_cumprod
        s = signal(a, mean_var) if signal else a * mean_var
        n = noise(a, num_pixels, offset) if noise else (1 - a) * (1 / num_pixels + offset**2)
        return s / n

    return fn


MEAN_SNR_MISTAKES = [
    (
        _snr_with(signal=lambda a, v: a.sqrt() * v),
        "the signal's power uses alpha_t = sqrt(alphas_cumprod); a ratio of variances needs "
        "alpha_t**2 = alphas_cumprod",
    ),
    (
        _snr_with(noise=lambda a, n, s: (1 - a).sqrt() * (1 / n + s**2)),
        "the noise's power uses sigma_t = sqrt(1 - alphas_cumprod); a ratio of variances needs "
        "sigma_t**2 = 1 - alphas_cumprod",
    ),
    (
        _snr_with(noise=lambda a, n, s: (1 - a) * (1 / n**0.5 + s**2)),
        "1/sqrt(N) is the standard deviation of the mean of N unit Gaussians; its variance is 1/N",
    ),
    (
        _snr_with(noise=lambda a, n, s: (1 - a) * (1 / n + s)),
        "the offset adds s**2 to the variance of the noise's mean, not s",
    ),
    (
        _snr_with(noise=lambda a, n, s: (1 - a) / n),
        "the offset noise is missing: each channel's noise mean also has the offset's variance s**2",
    ),
    (
        _snr_with(noise=lambda a, n, s: (1 - a) * (1 + s**2)),
        "that is the SNR of one pixel: averaging N pixels divides the noise's variance by N "
        "(the offset's part is the same in every pixel and does not average out)",
    ),
    (
        _snr_with(noise=lambda a, n, s: 1 / n + s**2),
        "the noise is scaled by sigma_t in x_t: multiply its variance by 1 - alphas_cumprod",
    ),
]


def _mean_snr_cases() -> list[Case]:
    from ..schedules import NoiseSchedule  # torch only

    sd = NoiseSchedule.from_name("scaled_linear").alphas_cumprod
    zt = NoiseSchedule.from_name("scaled_linear", zero_terminal_snr=True).alphas_cumprod
    return [
        Case("t = 999 of the SD schedule, 8x8 latents, Var(m0) = 0.5, no offset", (sd[-1:], 64, 0.5, 0.0)),
        Case("the whole SD schedule (1000 values), 8x8 latents, offset 0.1", (sd, 64, 0.5, 0.1)),
        Case("t = 999, 960, 500, SD's 64x64 latents (N = 4096), Var(m0) = 0.2",
             (sd[[999, 960, 500]], 4096, 0.2, 0.0)),
        Case("zero terminal SNR: alphas_cumprod[999] = 0 gives 0", (zt[[999, 998, 0]], 256, 1.5, 0.05)),
        Case("a 2x3 grid of alphas_cumprod, 16x16 latents, offset 0.2",
             (sd[:6].reshape(2, 3), 256, 0.8, 0.2)),
    ]  # fmt: skip


register(
    Exercise(
        name="mean_snr",
        notebook="13_noise_experiments",
        hint=(
            "signal power: alphas_cumprod * mean_var (alpha_t**2 Var(m0)); noise power: "
            "(1 - alphas_cumprod) * (1 / num_pixels + offset**2) (sigma_t**2 times the variance of the "
            "noise's mean); return their ratio, the same shape as alphas_cumprod."
        ),
        reference=_mean_snr,
        cases=_mean_snr_cases,
        mistakes=MEAN_SNR_MISTAKES,
    )
)
