r"""Noise schedules of the variance-preserving forward process.

The forward process of DDPM (Ho et al. 2020, arXiv 2006.11239) adds Gaussian noise in ``T`` small
steps, :math:`q(x_t \mid x_{t-1}) = \mathcal N(\sqrt{1-\beta_t}\,x_{t-1}, \beta_t I)`, which has the
closed form

.. math::  x_t = \alpha_t x_0 + \sigma_t \varepsilon,\quad
           \alpha_t = \sqrt{\bar\alpha_t},\ \sigma_t = \sqrt{1-\bar\alpha_t},\
           \bar\alpha_t = \prod_{s \le t} (1-\beta_s).

Everything the course needs about a schedule is derived from ``betas``: ``alphas_cumprod``
(:math:`\bar\alpha_t`), ``alpha``, ``sigma`` and the signal-to-noise ratio
:math:`\mathrm{SNR}(t) = \alpha_t^2/\sigma_t^2`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._checks import check_choice, check_number

SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")

# Published defaults: DDPM's linear schedule, and Stable Diffusion's scaled_linear one.
_DEFAULT_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def make_betas(
    schedule: str,
    num_train_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    *,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> torch.Tensor:
    r"""The ``betas`` of a named schedule, as a float32 tensor of length ``num_train_timesteps``.

    - ``"linear"`` (Ho et al. 2020, arXiv 2006.11239):
      :math:`\beta_i = \beta_{start} + \tfrac{i}{T-1}(\beta_{end}-\beta_{start})`,
      defaults 1e-4 to 0.02.
    - ``"scaled_linear"`` (Stable Diffusion; Rombach et al. 2022, arXiv 2112.10752): linear in
      :math:`\sqrt\beta`, :math:`\beta_i = \big(\sqrt{\beta_{start}} + \tfrac{i}{T-1}
      (\sqrt{\beta_{end}}-\sqrt{\beta_{start}})\big)^2`, defaults 0.00085 to 0.012. Its final
      ``alphas_cumprod`` is about 0.0047: the signal is never fully destroyed.
    - ``"cosine"`` (Nichol & Dhariwal 2021, arXiv 2102.09672):
      :math:`\bar\alpha(t) = \cos^2\!\big(\tfrac{t/T + s}{1 + s}\tfrac{\pi}{2}\big)`,
      :math:`\beta_i = \min\!\big(1 - \bar\alpha(\tfrac{i+1}{T})/\bar\alpha(\tfrac{i}{T}),
      \beta_{max}\big)` with :math:`s = 0.008`, :math:`\beta_{max} = 0.999`.

    Computed in float64 and rounded once to float32.
    """
    check_choice("schedule", schedule, SCHEDULES)
    check_number("num_train_timesteps", num_train_timesteps, low=2, integer=True)
    T = num_train_timesteps
    if schedule == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError(
                f"beta_start={beta_start!r}, beta_end={beta_end!r}: the cosine schedule is defined "
                "by alphas_cumprod, not by a beta range; leave both as None"
            )
        check_number("cosine_s", cosine_s, low=0.0)
        check_number("max_beta", max_beta, low=0.0, high=1.0, low_open=True, high_open=True)
        t = np.arange(T + 1, dtype=np.float64) / T
        alpha_bar = np.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
    else:
        default_start, default_end = _DEFAULT_BETA_RANGE[schedule]
        beta_start = default_start if beta_start is None else beta_start
        beta_end = default_end if beta_end is None else beta_end
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            check_number(name, value, low=0.0, high=1.0, low_open=True, high_open=True)
        if schedule == "linear":
            betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
        else:
            betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    return torch.from_numpy(betas).to(torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    r"""Rescale a schedule so that its terminal SNR is exactly zero (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv 2305.08891, Alg. 1).

    Shift and scale :math:`\sqrt{\bar\alpha_t}` so that the first value is kept and the last is 0:

    .. math:: \sqrt{\bar\alpha_t}' = \big(\sqrt{\bar\alpha_t} - \sqrt{\bar\alpha_T}\big)
              \frac{\sqrt{\bar\alpha_1}}{\sqrt{\bar\alpha_1} - \sqrt{\bar\alpha_T}}

    then recover :math:`\beta_t = 1 - \bar\alpha'_t/\bar\alpha'_{t-1}`. The last beta becomes
    exactly 1: at t = T the model sees pure noise, as it will at the start of sampling.
    Only v-prediction (or x0) can be trained there; epsilon is undetermined at SNR = 0.
    """
    _check_betas(betas, allow_one=False)
    alphas_cumprod = torch.cumprod(1 - betas.double(), dim=0)
    sqrt_ac = alphas_cumprod.sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    alphas_cumprod = sqrt_ac**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return (1 - alphas).to(betas.dtype)


def _check_betas(betas: torch.Tensor, allow_one: bool) -> None:
    if not isinstance(betas, torch.Tensor) or betas.ndim != 1 or betas.numel() < 2:
        raise ValueError(f"betas must be a 1-D tensor of at least 2 values, got {betas!r}")
    if not torch.isfinite(betas).all():
        raise ValueError("betas contains NaN or inf; allowed: values in (0, 1)")
    interior = betas[:-1] if allow_one else betas
    bad = (interior <= 0) | (interior >= 1)
    if allow_one:
        bad_last = bool(betas[-1] <= 0 or betas[-1] > 1)
    else:
        bad_last = False
    if bad.any() or bad_last:
        idx = int(torch.nonzero(bad)[0]) if bad.any() else len(betas) - 1
        allowed = "(0, 1), and (0, 1] for the last one" if allow_one else "(0, 1)"
        raise ValueError(f"betas[{idx}]={float(betas[idx])!r} is out of range; allowed: {allowed}")


class NoiseSchedule:
    r"""A discrete variance-preserving schedule: everything derived from its ``betas``.

    - ``alphas_cumprod[t]`` :math:`= \bar\alpha_t = \prod_{s \le t}(1-\beta_s)` (float32),
    - ``alpha(t)`` :math:`= \sqrt{\bar\alpha_t}`, ``sigma(t)`` :math:`= \sqrt{1-\bar\alpha_t}`,
    - ``snr(t)`` :math:`= \alpha_t^2/\sigma_t^2 = \bar\alpha_t/(1-\bar\alpha_t)` (Kingma et al.
      2021, "Variational Diffusion Models", arXiv 2107.00630),
    - ``add_noise(x0, noise, t)`` :math:`= \alpha_t x_0 + \sigma_t \varepsilon`, the closed form of
      :math:`q(x_t \mid x_0)` (Ho et al. 2020, eq. 4).

    ``t`` is a 0-based index in ``[0, num_train_timesteps)``: an int or an integer tensor.
    Betas must lie in (0, 1); the last may be exactly 1 (zero terminal SNR).
    """

    def __init__(self, betas: torch.Tensor) -> None:
        _check_betas(betas, allow_one=True)
        self.betas = betas.to(torch.float32)
        self.alphas = 1 - self.betas
        # cumprod in float64: 1000 float32 products drift by ~1e-5 relative at the end.
        self.alphas_cumprod = torch.cumprod(1 - betas.double(), dim=0).to(torch.float32)

    @classmethod
    def from_name(
        cls,
        schedule: str = "scaled_linear",
        num_train_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        zero_terminal_snr: bool = False,
    ) -> NoiseSchedule:
        """Build a schedule with :func:`make_betas`, optionally rescaled to zero terminal SNR."""
        betas = make_betas(schedule, num_train_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    def _gather(self, values: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(t)
        if index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(f"t must be an integer timestep or integer tensor, got dtype {index.dtype}")
        if index.numel() and (index.min() < 0 or index.max() >= self.num_train_timesteps):
            raise ValueError(
                f"t={index.tolist()!r} is out of range; allowed: 0 to {self.num_train_timesteps - 1}"
            )
        return values[index.cpu()].to(index.device)

    def alpha(self, t: int | torch.Tensor) -> torch.Tensor:
        r""":math:`\alpha_t = \sqrt{\bar\alpha_t}`, the scale of the signal in :math:`x_t`."""
        return self._gather(self.alphas_cumprod.sqrt(), t)

    def sigma(self, t: int | torch.Tensor) -> torch.Tensor:
        r""":math:`\sigma_t = \sqrt{1-\bar\alpha_t}`, the scale of the noise in :math:`x_t`."""
        return self._gather((1 - self.alphas_cumprod).sqrt(), t)

    def snr(self, t: int | torch.Tensor) -> torch.Tensor:
        r""":math:`\mathrm{SNR}(t) = \bar\alpha_t / (1-\bar\alpha_t)`; exactly 0 at zero terminal SNR."""
        return self._gather(self.alphas_cumprod / (1 - self.alphas_cumprod), t)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        r"""Sample :math:`q(x_t \mid x_0)`: :math:`x_t = \alpha_t x_0 + \sigma_t \varepsilon`.

        ``t`` is an int (same step for the batch) or a tensor of shape ``(B,)``; alpha and sigma
        are broadcast over the remaining axes and cast to ``x0``'s device and dtype.
        """
        if x0.shape != noise.shape:
            raise ValueError(f"x0 and noise must have the same shape, got {x0.shape} and {noise.shape}")
        alpha = per_sample(self.alpha(t), x0)
        sigma = per_sample(self.sigma(t), x0)
        return alpha * x0 + sigma * noise

    def __repr__(self) -> str:
        ac = self.alphas_cumprod
        return (
            f"NoiseSchedule(T={self.num_train_timesteps}, alphas_cumprod[0]={float(ac[0]):.6f}, "
            f"alphas_cumprod[-1]={float(ac[-1]):.6g})"
        )


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape per-sample values ``(B,)`` (or a scalar) as ``(B, 1, ..., 1)`` to multiply ``like``."""
    values = values.to(device=like.device, dtype=like.dtype)
    if values.ndim == 0:
        return values
    if values.ndim != 1 or values.shape[0] != like.shape[0]:
        raise ValueError(
            f"per-sample values of shape {tuple(values.shape)} do not match a batch of "
            f"shape {tuple(like.shape)}; expected a scalar or shape ({like.shape[0]},)"
        )
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def inference_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> torch.Tensor:
    r"""The descending integer timesteps a sampler visits (Lin et al. 2023, arXiv 2305.08891, Table 2).

    With :math:`T` training steps and :math:`S` sampling steps:

    - ``"linspace"``: :math:`\mathrm{round}(\mathrm{linspace}(0, T-1, S))`, first step T - 1.
    - ``"leading"`` (DDIM, Stable Diffusion with ``steps_offset=1``):
      :math:`k \lfloor T/S \rfloor + \text{offset}` for :math:`k = 0..S-1`; its first step is
      :math:`(S-1)\lfloor T/S \rfloor + \text{offset}`, usually below T - 1 (it reaches
      it only when the offset fills the gap, e.g. S = T). Sampling then starts from pure noise at a
      timestep where training always left signal in x_t: the flaw Lin et al. point out.
    - ``"trailing"``: :math:`\mathrm{round}(T - k\,T/S) - 1`, first step T - 1; the spacing
      zero terminal SNR needs, because it starts from pure noise.
    """
    check_number("num_train_timesteps", num_train_timesteps, low=1, integer=True)
    check_number("num_inference_steps", num_inference_steps, low=1, high=num_train_timesteps, integer=True)
    check_choice("spacing", spacing, SPACINGS)
    check_number("steps_offset", steps_offset, low=0, integer=True)
    T, S = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        steps = np.linspace(0, T - 1, S).round()[::-1]
    elif spacing == "leading":
        steps = (np.arange(S) * (T // S)).round()[::-1] + steps_offset
    else:
        steps = np.round(np.arange(T, 0, -T / S)) - 1
    if spacing != "leading" and steps_offset:
        raise ValueError(f"steps_offset={steps_offset!r} only applies to spacing='leading'")
    if steps.max() > T - 1:
        raise ValueError(
            f"steps_offset={steps_offset!r} pushes the first timestep to {int(steps.max())}; "
            f"allowed: at most {T - 1 - int(steps.max()) + steps_offset} for {S} steps of {T}"
        )
    return torch.from_numpy(steps.astype(np.int64).copy())
