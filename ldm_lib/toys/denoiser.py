r"""A tiny timestep-conditioned denoiser that trains on a CPU in seconds, and toy data for it.

It makes training-time options measurable in a notebook: offset noise (notebook 03) and input
perturbation (notebook 04) change only how the noise of a training pair is drawn, and their effects
show up in a model trained for a few seconds on tiny images.

The network is an MLP on the flattened sample (any ``(C, H, W)`` or ``(D,)`` shape works),
conditioned on the timestep by a sinusoidal embedding (Vaswani et al. 2017, arXiv 1706.03762; used
for diffusion by Ho et al. 2020, arXiv 2006.11239) added inside every residual block, plus a learned
skip :math:`c(t)\,x_t` (see :class:`TinyDenoiser`). Its ``forward(x_t, t)`` returns the prediction
(epsilon, v or x0): exactly the ``model(x_t, t)`` that :func:`ldm_lib.samplers.ddim_sample` calls.

One training step (DDPM's Algorithm 1, with the two noise options):

.. math::
    t \sim \mathcal U\{0,\dots,T-1\},\quad
    \varepsilon = z + s\,\delta \ \text{(offset noise)},\quad
    \hat\varepsilon = \varepsilon + \rho\,\xi \ \text{(input perturbation)},

    x_t = \alpha_t x_0 + \sigma_t \hat\varepsilon,\qquad
    \mathcal L = \lVert f_\theta(x_t, t) - \mathrm{target}(x_0, \varepsilon, \alpha_t, \sigma_t)\rVert^2

The perturbation touches only the input :math:`x_t`; the target is built from the unperturbed
:math:`\varepsilon`, offset included (Ning et al. 2023, DDPM-IP, arXiv 2301.11706).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .._checks import check_choice, check_number
from ..noise import offset_noise, perturb_noise
from ..parameterization import PREDICTION_TYPES, training_target
from ..schedules import NoiseSchedule, per_sample

BRIGHTNESS = ("extremes", "uniform")


def toy_blobs(
    num_samples: int,
    resolution: int = 32,
    brightness: str = "extremes",
    contrast: float = 0.5,
    seed: int = 0,
) -> torch.Tensor:
    r"""Grey images ``(num_samples, 1, resolution, resolution)`` in [-1, 1]: a flat background with a
    soft blob that pulls it towards grey.

    .. math:: x = b - c\,\mathrm{sign}(b)\,\exp\!\big(-\lVert p - m\rVert^2 / 2w^2\big),\qquad
              w = 0.12\,\text{resolution}

    with the blob centre :math:`m` uniform in the middle 60% of the image, contrast :math:`c`, and
    the background level :math:`b` either -1 or +1 with equal probability (``"extremes"``: every
    image is very dark or very bright) or uniform in [-1, 1] (``"uniform"``). The structure is
    deliberately simple (three numbers per image) so that a tiny model learns it in seconds.
    """
    check_number("num_samples", num_samples, low=1, integer=True)
    check_number("resolution", resolution, low=2, integer=True)
    check_choice("brightness", brightness, BRIGHTNESS)
    check_number("contrast", contrast, low=0.0, high=1.0)
    check_number("seed", seed, low=0, integer=True)
    g = torch.Generator().manual_seed(seed)
    n, r = num_samples, resolution
    if brightness == "extremes":
        level = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    else:
        level = torch.rand(n, generator=g) * 2 - 1
    centre = (torch.rand(n, 2, generator=g) * 0.6 + 0.2) * r
    coords = torch.arange(r, dtype=torch.float32) + 0.5
    dist2 = (coords[None, :, None] - centre[:, 0, None, None]) ** 2 + (
        coords[None, None, :] - centre[:, 1, None, None]
    ) ** 2
    blob = torch.exp(-dist2 / (2 * (0.12 * r) ** 2))
    images = level[:, None, None] - contrast * torch.sign(level)[:, None, None] * blob
    return images[:, None].contiguous()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    r"""Sinusoidal embedding of integer timesteps, shape ``(B, dim)`` (Vaswani et al. 2017):

    .. math:: e_i = \cos(t\,\omega_i),\ e_{i + \text{dim}/2} = \sin(t\,\omega_i),\qquad
              \omega_i = \text{max\_period}^{-i/(\text{dim}/2)}
    """
    check_number("dim", dim, low=2, integer=True)
    if dim % 2:
        raise ValueError(f"dim={dim!r} must be even (a cos and a sin per frequency)")
    if not isinstance(t, torch.Tensor) or t.ndim != 1:
        raise ValueError(f"t must be a 1-D tensor of timesteps, got {t!r}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class _Block(nn.Module):
    """Pre-norm residual block: ``h + W2 SiLU(W1 LN(h) + temb)``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h)) + temb))


class TinyDenoiser(nn.Module):
    r"""An MLP denoiser on flattened samples of shape ``sample_shape``:

    .. math:: f_\theta(x_t, t) = c_\theta(t)\,x_t + \mathrm{MLP}_\theta(x_t, t)

    The learned scalar skip :math:`c_\theta(t)` (EDM's :math:`c_{skip}`, Karras et al. 2022,
    arXiv 2206.00364) carries the part of the prediction that is proportional to :math:`x_t` (an
    epsilon prediction is almost :math:`x_t` at large t); without it, an MLP narrower than the image
    has to squeeze :math:`x_t` through its hidden layers and trains far more slowly.

    ``forward(x_t, t)`` takes ``x_t`` of shape ``(B, *sample_shape)`` and integer timesteps ``t``
    of shape ``(B,)`` (or a scalar) and returns a tensor shaped like ``x_t``.
    """

    def __init__(
        self,
        sample_shape: tuple[int, ...],
        hidden: int = 256,
        depth: int = 2,
        time_dim: int = 64,
    ) -> None:
        super().__init__()
        if not sample_shape or any(not isinstance(n, int) or n < 1 for n in sample_shape):
            raise ValueError(f"sample_shape must be a tuple of positive ints, got {sample_shape!r}")
        check_number("hidden", hidden, low=1, integer=True)
        check_number("depth", depth, low=1, integer=True)
        check_number("time_dim", time_dim, low=2, integer=True)
        self.sample_shape = tuple(sample_shape)
        self.time_dim = time_dim
        features = math.prod(sample_shape)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(features, hidden)
        self.blocks = nn.ModuleList(_Block(hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, features)
        self.skip = nn.Linear(hidden, 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        if tuple(x_t.shape[1:]) != self.sample_shape:
            expected = ", ".join(map(str, self.sample_shape))
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}; expected (B, {expected})")
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t has shape {tuple(t.shape)}; expected ({x_t.shape[0]},), one per sample")
        temb = self.time_mlp(timestep_embedding(t, self.time_dim).to(x_t.dtype))
        h = self.inp(x_t.flatten(1))
        for block in self.blocks:
            h = block(h, temb)
        c_skip = self.skip(temb).view(-1, *([1] * (x_t.ndim - 1)))
        return c_skip * x_t + self.out(nn.functional.silu(self.norm(h))).view_as(x_t)


def training_pair(
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    t: torch.Tensor,
    prediction_type: str = "epsilon",
    offset_noise_strength: float = 0.0,
    input_perturbation: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The network input and target for clean samples ``x0`` at timesteps ``t``: ``(x_t, target)``.

    .. math:: \varepsilon = \mathrm{offset\_noise}(x_0, s),\quad
              x_t = \alpha_t x_0 + \sigma_t\,(\varepsilon + \rho\,\xi),\quad
              \mathrm{target} = \mathrm{training\_target}(x_0, \varepsilon, \alpha_t, \sigma_t)

    Offset noise (Guttenberg 2023, "Diffusion with Offset Noise", Crosslabs) is part of
    :math:`\varepsilon`, so the target includes it; the input perturbation :math:`\rho\,\xi` (Ning
    et al. 2023, arXiv 2301.11706) enters only :math:`x_t`. Both are drawn from ``generator``:
    the offset noise first, then the perturbation.
    """
    noise = offset_noise(x0, offset_noise_strength, generator)
    x_t = schedule.add_noise(x0, perturb_noise(noise, input_perturbation, generator), t)
    alpha = per_sample(schedule.alpha(t), x0)
    sigma = per_sample(schedule.sigma(t), x0)
    return x_t, training_target(prediction_type, x0, noise, alpha, sigma)


def train_denoiser(
    data: torch.Tensor,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    offset_noise_strength: float = 0.0,
    input_perturbation: float = 0.0,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    hidden: int = 256,
    depth: int = 2,
    num_threads: int | None = 1,
) -> tuple[TinyDenoiser, list[float]]:
    r"""Train a :class:`TinyDenoiser` on ``data`` (shape ``(N, *sample_shape)``) for ``steps`` steps.

    Each step draws ``batch_size`` samples with replacement and uniform timesteps, builds
    :func:`training_pair` and minimises the mean squared error
    :math:`\lVert f_\theta(x_t, t) - \mathrm{target}\rVert^2` with AdamW; the learning rate decays
    by a cosine from ``lr`` to ``lr / 10``. Deterministic given ``seed``: the initial weights come
    from ``torch.manual_seed(seed)`` inside a forked RNG (the global RNG is left as it was), every
    batch, timestep and noise from a generator seeded with ``seed``.

    ``num_threads`` sets torch's intra-op threads while training (restored afterwards; ``None``
    leaves them alone). The matrices are so small that one thread is faster than several: on a
    busy 2-core machine, two threads made each step about ten times slower.

    Returns the model (in eval mode) and the loss of every step.
    """
    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.ndim < 2:
        raise ValueError(f"data must be a floating-point tensor (N, *sample_shape), got {_describe(data)}")
    if data.shape[0] < 1:
        raise ValueError("data is empty; expected at least one sample")
    if not torch.isfinite(data).all():
        raise ValueError("data contains NaN or inf")
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_number("offset_noise_strength", offset_noise_strength, low=0.0)
    check_number("input_perturbation", input_perturbation, low=0.0)
    check_number("steps", steps, low=1, integer=True)
    check_number("batch_size", batch_size, low=1, integer=True)
    check_number("lr", lr, low=0.0, low_open=True)
    check_number("seed", seed, low=0, integer=True)
    if num_threads is not None:
        check_number("num_threads", num_threads, low=1, integer=True)

    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = TinyDenoiser(tuple(data.shape[1:]), hidden=hidden, depth=depth)
        model = model.to(device=data.device, dtype=data.dtype)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr / 10)
        T = schedule.num_train_timesteps
        losses: list[float] = []
        model.train()
        for _ in tqdm(range(steps), desc="train", disable=not progress, leave=False):
            index = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
            x0 = data[index.to(data.device)]
            t = torch.randint(0, T, (batch_size,), generator=generator).to(data.device)
            x_t, target = training_pair(
                x0, schedule, t, prediction_type, offset_noise_strength, input_perturbation, generator
            )
            loss = nn.functional.mse_loss(model(x_t, t), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(previous_threads)
    return model.eval(), losses


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
