r"""Exercises of notebook 10_training_loop: the training step's loss and the EMA update.

- ``training_loss(model, schedule, x0, t, noise, xi, rho, prediction_type, min_snr_gamma)``: the
  per-sample loss, shape ``(B,)`` float32, of one latent diffusion training step. ``noise`` is the
  :math:`\varepsilon` the target is built from (offset noise already included, Guttenberg 2023);
  input perturbation (Ning et al. 2023, DDPM-IP, arXiv 2301.11706) makes :math:`x_t` from
  :math:`\varepsilon + \rho\,\xi`;

  .. math:: x_t = \alpha_t x_0 + \sigma_t(\varepsilon + \rho\,\xi),\qquad
            y = \varepsilon\ \text{or}\ v = \alpha_t\varepsilon - \sigma_t x_0,\qquad
            \ell_b = w(t_b)\,\mathrm{mean}_{chw}\big(f(x_t, t) - y\big)^2

  with :math:`w = 1` (``min_snr_gamma=None``) or Min-SNR-:math:`\gamma` (Hang et al. 2023, arXiv
  2303.09556): :math:`\min(\mathrm{SNR},\gamma)/\mathrm{SNR}` for epsilon,
  :math:`\min(\mathrm{SNR},\gamma)/(\mathrm{SNR}+1)` for v (Salimans & Ho 2022, arXiv 2202.00512).
  Reference: :func:`ldm_lib.training.diffusion_loss`.
- ``ema_update(average, weights, step, decay)``: one step of the exponential moving average with
  the LDM code's warm-up, :math:`\bar\theta \leftarrow \beta_n\bar\theta + (1-\beta_n)\theta`,
  :math:`\beta_n = \min(\beta, (1+n)/(10+n))`. Reference: :func:`ldm_lib.training.ema_decay`.

Every exercise notebook imports this module (through ``ldm_lib.exercises``), so it imports only
torch-level modules at the top; ``ldm_lib.training`` (yaml, matplotlib, the trainer) is imported
inside the references, when notebook 10 checks an answer.
"""

from __future__ import annotations

import torch

from ..noise import offset_noise
from ..parameterization import training_target
from ..schedules import NoiseSchedule, per_sample
from .checker import Case, Exercise, register

T = 1000  # training timesteps of every schedule in the cases


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- training_loss


class NamedSchedule(NoiseSchedule):
    """A :class:`NoiseSchedule` whose ``repr`` names it, so a failing case reads well."""

    def __init__(self, name: str, zero_terminal_snr: bool = False) -> None:
        super().__init__(NoiseSchedule.from_name(name, T, zero_terminal_snr=zero_terminal_snr).betas)
        self.label = f"NoiseSchedule({name!r}{', zero_terminal_snr=True' if zero_terminal_snr else ''})"

    def __repr__(self) -> str:
        return self.label


class ToyDenoiser:
    r"""A fixed stand-in for the UNet: :math:`f(x_t, t) = W x_t + (t/T)\,b` (a 1x1 channel mix and a
    per-channel bias that grows with t). It depends on both inputs, so a wrong :math:`x_t` or a
    wrong t changes the loss."""

    def __init__(self, channels: int = 4, seed: int = 0) -> None:
        g = _gen(seed)
        self.weight = 0.5 * torch.randn(channels, channels, generator=g)
        self.bias = torch.randn(channels, generator=g)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("oc,bchw->bohw", self.weight, x_t)
        return mixed + (t.float() / T)[:, None, None, None] * self.bias[None, :, None, None]

    def __repr__(self) -> str:
        return "ToyDenoiser(W @ x_t + (t / 1000) * b)"


def _training_loss(model, schedule, x0, t, noise, xi, rho, prediction_type, min_snr_gamma):
    """The library's loss, with the perturbed noise made from ``xi`` and ``rho``."""
    from ..training.diffusion_loss import diffusion_loss

    return diffusion_loss(
        model,
        schedule,
        x0,
        t,
        noise,
        prediction_type,
        noisy_input_noise=noise + rho * xi,
        min_snr_gamma=min_snr_gamma,
    )


def _loss_parts(schedule, x0, t, noise, xi, rho):
    """alpha and sigma (shaped to broadcast) and x_t, the right way."""
    alpha, sigma = per_sample(schedule.alpha(t), x0), per_sample(schedule.sigma(t), x0)
    return alpha, sigma, alpha * x0 + sigma * (noise + rho * xi)


def _snr_weight(snr: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    if gamma is None:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr == 0, torch.ones_like(snr), clipped / snr.clamp(min=1e-30))


def _mistake(*, target=None, x_t=None, weight=None, reduce=None):
    """A wrong loss: the reference with one piece replaced."""

    def loss(model, schedule, x0, t, noise, xi, rho, prediction_type, gamma):
        alpha, sigma, x_t_right = _loss_parts(schedule, x0, t, noise, xi, rho)
        x_in = x_t(alpha, sigma, x0, noise, xi, rho) if x_t else x_t_right
        prediction = model(x_in, t)
        y = (target or _right_target)(prediction_type, alpha, sigma, x0, noise, xi, rho)
        squared = (prediction - y).pow(2)
        mse = reduce(squared) if reduce else squared.flatten(1).mean(dim=1)
        snr = schedule.snr(t)
        w = weight(snr, gamma, prediction_type) if weight else _snr_weight(snr, gamma, prediction_type)
        return mse * w

    return loss


def _right_target(prediction_type, alpha, sigma, x0, noise, xi, rho):
    return training_target(prediction_type, x0, noise, alpha, sigma)


def _swapped_weight(snr, gamma, prediction_type):
    other = {"epsilon": "v_prediction", "v_prediction": "epsilon"}[prediction_type]
    return _snr_weight(snr, gamma, other)


def _x0_weight(snr, gamma, prediction_type):
    return snr.clamp(max=gamma) if gamma is not None else torch.ones_like(snr)


def _batch_mean_first(model, schedule, x0, t, noise, xi, rho, prediction_type, gamma):
    per_sample_mse = _training_loss(model, schedule, x0, t, noise, xi, rho, prediction_type, None)
    return per_sample_mse.mean() * _snr_weight(schedule.snr(t), gamma, prediction_type)


TRAINING_LOSS_MISTAKES = [
    (
        _mistake(target=lambda k, a, s, x0, n, xi, rho: training_target(k, x0, n + rho * xi, a, s)),
        "the target is built from the perturbed noise; input perturbation changes only the noise that "
        "makes x_t, the target uses the unperturbed `noise`",
    ),
    (
        _mistake(target=lambda k, a, s, x0, n, xi, rho: -training_target(k, x0, n, a, s)),
        "the v target has the wrong sign: v = alpha * eps - sigma * x0 (Salimans & Ho 2022)",
    ),
    (
        _mistake(target=lambda k, a, s, x0, n, xi, rho: a * x0 - s * n if k == "v_prediction" else n),
        "the v target swaps x0 and eps: v = alpha * eps - sigma * x0, not alpha * x0 - sigma * eps",
    ),
    (
        _mistake(x_t=lambda a, s, x0, n, xi, rho: a * x0 + s * n + rho * xi),
        "the perturbation was added to x_t directly; perturb the noise, so that sigma scales it too: "
        "x_t = alpha * x0 + sigma * (noise + rho * xi)",
    ),
    (
        _mistake(x_t=lambda a, s, x0, n, xi, rho: a * x0 + s * n),
        "x_t has no input perturbation: make it from noise + rho * xi",
    ),
    (
        _mistake(weight=_swapped_weight),
        "the min-SNR forms are swapped: epsilon divides min(SNR, gamma) by SNR, v by SNR + 1",
    ),
    (
        _mistake(weight=_x0_weight),
        "min(SNR, gamma) is the weight of an x0 loss; on the epsilon loss divide it by SNR, on the v "
        "loss by SNR + 1",
    ),
    (
        _batch_mean_first,
        "the squared error was averaged over the batch before weighting: each sample has its own "
        "weight w(t_b), so average over (C, H, W) only, weight, and return one loss per sample",
    ),
    (
        _mistake(reduce=lambda sq: sq.flatten(1).sum(dim=1)),
        "the squared error is summed over (C, H, W); take its mean",
    ),
]


def _training_loss_cases() -> list[Case]:
    g = _gen(10)
    sd = NamedSchedule("scaled_linear")
    zt = NamedSchedule("scaled_linear", zero_terminal_snr=True)
    model = ToyDenoiser()

    def draws(b: int, offset: float = 0.0):
        x0 = torch.randn(b, 4, 8, 8, generator=g)
        noise = offset_noise(x0, offset, g)
        return x0, noise, torch.randn(b, 4, 8, 8, generator=g)

    def random_t(b: int) -> torch.Tensor:
        return torch.randint(0, T, (b,), generator=g)

    ends = torch.tensor([0, 1, 998, 999])
    # Batch sizes other than 8 (the latents' width): a (B,) alpha that is not reshaped to
    # (B, 1, 1, 1) then raises instead of silently broadcasting along the width.
    cases = []
    for kind in ("epsilon", "v_prediction"):
        x0, noise, xi = draws(6)
        cases.append(
            Case(
                f"{kind!r}, 6 random t, no perturbation (rho = 0), no min-SNR",
                (model, sd, x0, random_t(6), noise, xi, 0.0, kind, None),
            )
        )
    for kind in ("epsilon", "v_prediction"):
        x0, noise, xi = draws(4)
        cases.append(
            Case(
                f"{kind!r}, t = 0, 1, 998, 999 (both ends of the schedule), rho = 0",
                (model, sd, x0, ends, noise, xi, 0.0, kind, None),
            )
        )
    for kind in ("epsilon", "v_prediction"):
        x0, noise, xi = draws(6)
        cases.append(
            Case(
                f"{kind!r}, input perturbation rho = 0.1, no min-SNR",
                (model, sd, x0, random_t(6), noise, xi, 0.1, kind, None),
            )
        )
    for kind in ("epsilon", "v_prediction"):
        x0, noise, xi = draws(7)
        t = torch.cat([ends, random_t(3)])
        cases.append(
            Case(
                f"{kind!r}, min-SNR gamma = 5 (t at both ends and random), rho = 0",
                (model, sd, x0, t, noise, xi, 0.0, kind, 5.0),
            )
        )
    for kind in ("epsilon", "v_prediction"):
        x0, noise, xi = draws(7, offset=0.1)
        t = torch.cat([ends, random_t(3)])
        cases.append(
            Case(
                f"{kind!r}, everything on: offset noise 0.1 in `noise`, rho = 0.15, gamma = 5",
                (model, sd, x0, t, noise, xi, 0.15, kind, 5.0),
            )
        )
    x0, noise, xi = draws(4, offset=0.1)
    cases.append(
        Case(
            "'v_prediction', zero terminal SNR (alpha = 0, SNR = 0 at t = 999), rho = 0.1, gamma = 5",
            (model, zt, x0, ends, noise, xi, 0.1, "v_prediction", 5.0),
        )
    )
    x0, noise, xi = draws(1)
    cases.append(
        Case(
            "a batch of one, 'epsilon', rho = 0.1, gamma = 1",
            (model, sd, x0, torch.tensor([500]), noise, xi, 0.1, "epsilon", 1.0),
        )
    )
    return cases  # fmt: skip


register(
    Exercise(
        name="training_loss",
        notebook="10_training_loop",
        hint=(
            "alpha = schedule.alpha(t), sigma = schedule.sigma(t), each reshaped to (B, 1, 1, 1); "
            "x_t = alpha * x0 + sigma * (noise + rho * xi); target = noise for 'epsilon', "
            "alpha * noise - sigma * x0 for 'v_prediction' (the unperturbed noise in both); "
            "mse = ((model(x_t, t) - target) ** 2).mean(dim=(1, 2, 3)); with a gamma, multiply by "
            "min(SNR, gamma) / SNR (epsilon) or min(SNR, gamma) / (SNR + 1) (v), SNR = schedule.snr(t)."
        ),
        reference=_training_loss,
        cases=_training_loss_cases,
        mistakes=TRAINING_LOSS_MISTAKES,
    )
)


# ---------------------------------------------------------------- ema_update


def _beta(step: int, decay: float) -> float:
    """The library's warm-up decay, :func:`ldm_lib.training.ema_decay`."""
    from ..training.ema import ema_decay

    return ema_decay(step, decay)


def _ema_update(average: torch.Tensor, weights: torch.Tensor, step: int, decay: float) -> torch.Tensor:
    beta = _beta(step, decay)
    return beta * average + (1 - beta) * weights


def _ema_cases() -> list[Case]:
    g = _gen(11)

    def pair(*shape: int):
        return torch.randn(shape, generator=g), torch.randn(shape, generator=g)

    return [
        Case("step 0, decay 0.999: the warm-up gives beta = 1/10", (*pair(3, 4), 0, 0.999)),
        Case("step 5, decay 0.999: beta = 6/15", (*pair(16,), 5, 0.999)),
        Case("step 100, decay 0.9999: beta = 101/110", (*pair(2, 3, 3), 100, 0.9999)),
        Case("step 100000, decay 0.999: past the warm-up, beta = decay", (*pair(8,), 100_000, 0.999)),
        Case("step 20, decay 0.5: beta = min(0.5, 21/30) = 0.5", (*pair(4, 4), 20, 0.5)),
        Case("a scalar weight, step 1, decay 0.99: beta = 2/11", (*pair(), 1, 0.99)),
    ]  # fmt: skip


def _ema_with(beta_fn):
    def update(average, weights, step, decay):
        beta = beta_fn(step, decay)
        return beta * average + (1 - beta) * weights

    return update


register(
    Exercise(
        name="ema_update",
        notebook="10_training_loop",
        hint=(
            "beta = min(decay, (1 + step) / (10 + step)); return beta * average + (1 - beta) * weights "
            "(a new tensor: do not change average in place)."
        ),
        reference=_ema_update,
        cases=_ema_cases,
        mistakes=[
            (
                lambda avg, w, step, decay: (1 - _beta(step, decay)) * avg + _beta(step, decay) * w,
                "average and weights are swapped: the average keeps the fraction beta of itself and takes "
                "1 - beta of the new weights",
            ),
            (
                _ema_with(lambda step, decay: decay),
                "the warm-up is missing: beta = min(decay, (1 + step) / (10 + step)), so that the first "
                "updates forget the random initial weights quickly",
            ),
            (
                _ema_with(lambda step, decay: (1 + step) / (10 + step)),
                "beta is not capped: (1 + step) / (10 + step) keeps growing towards 1; take its min with "
                "decay",
            ),
            (
                _ema_with(lambda step, decay: min(decay, step / (10 + step))),
                "the warm-up is step / (10 + step); the LDM code uses (1 + step) / (10 + step) (beta = 0.1 "
                "at step 0)",
            ),
        ],
    )
)
