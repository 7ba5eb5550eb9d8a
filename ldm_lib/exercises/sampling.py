r"""Exercises of notebook 11_samplers: one Euler step and one DPM-Solver++(2M) step.

- ``euler_step(prediction_type, model_output, x, sigma, sigma_next)``: one Euler step of the
  probability-flow ODE in the variables of Karras et al. 2022 (arXiv 2206.00364, eq. 3 and Alg. 1),
  :math:`x = x_t/\alpha_t`, :math:`\sigma = \sigma_t/\alpha_t`; ``model_output`` is the network's
  output on the VP input :math:`x_t = x/\sqrt{\sigma^2+1}`;

  .. math:: D = \hat x_0,\qquad d = \frac{x - D}{\sigma},\qquad x_{next} = x + (\sigma_{next} - \sigma)\,d,

  returning ``(x_next, D)``, with :math:`D = x - \sigma\hat\varepsilon` for epsilon and
  :math:`D = x/(\sigma^2+1) - \sigma\hat v/\sqrt{\sigma^2+1}` for v (Salimans & Ho 2022, arXiv
  2202.00512). Reference: :func:`ldm_lib.samplers.euler_step`.
- ``dpmpp_2m_step(prediction_type, model_output, x_t, sigma, sigma_next, x0_prev, sigma_prev)``: one
  step of DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2) on the VP sample ``x_t``, the
  noise levels given as Karras sigmas (:math:`\alpha = 1/\sqrt{\sigma^2+1}`, :math:`\sigma_t = \sigma\alpha`,
  :math:`\lambda = \log(\alpha/\sigma_t)`);

  .. math:: h = \lambda_{next} - \lambda,\quad r = \frac{\lambda - \lambda_{prev}}{h},\quad
            D = \Big(1 + \frac1{2r}\Big)\hat x_0 - \frac1{2r}\hat x_0^{prev},\quad
            x_{next} = \frac{\sigma_{t,next}}{\sigma_t}x_t - \alpha_{next}\big(e^{-h} - 1\big)D,

  first order (:math:`D = \hat x_0`) without history, and :math:`x_{next} = \hat x_0` when
  :math:`\sigma_{next} = 0`; returning ``(x_next, x0_pred)``. Reference:
  :func:`ldm_lib.samplers.dpmpp_2m_step`.

The references are imported when a check runs (``ldm_lib.samplers`` pulls in tqdm), so that every
exercise notebook, which imports this module, stays cheap to start.
"""

from __future__ import annotations

import math

import torch

from .checker import Case, Exercise, register

# Karras sigmas sqrt((1 - abar_t) / abar_t) of Stable Diffusion's schedule at trailing timesteps
# (t = 999, 899, 599, 299, 99) and of its zero-terminal-SNR version at t = 999 (abar clamped to 2^-24)
# and about t = 899 (18.13 there; 18.125 is exact in float32, so sigma_next - sigma is too, and a right
# answer in float64 agrees with the float32-sigma reference): the noise levels of notebook 11's samplers.
SIGMA_999, SIGMA_899, SIGMA_599, SIGMA_299, SIGMA_99 = 14.6146, 8.3028, 2.2765, 0.8299, 0.3417
SIGMA_ZTSNR_999, SIGMA_ZTSNR_899 = 4096.0, 18.125


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    r"""VP :math:`(\alpha_t, \sigma_t)` of a Karras sigma, in float64."""
    alpha = 1 / math.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def _draws(shape: tuple[int, ...], sigma: float, g: torch.Generator, dtype: torch.dtype = torch.float32):
    """A clean latent, noise, the sigma-space sample ``x = x0 + sigma * eps`` and a network output
    that is a noisy version of the truth (so that the step moves somewhere sensible)."""
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    wobble = 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    return x0.to(dtype), eps.to(dtype), (x0 + sigma * eps).to(dtype), wobble.to(dtype)


# ---------------------------------------------------------------- euler_step


def _euler_step(prediction_type, model_output, x, sigma, sigma_next):
    from ..samplers import euler_step

    return euler_step(prediction_type, model_output, x, sigma, sigma_next)


def _euler_output(kind: str, x0: torch.Tensor, eps: torch.Tensor, sigma: float, wobble: torch.Tensor):
    """What a decent network returns on x_t = x / sqrt(sigma^2 + 1): eps or v, plus an error."""
    if kind == "epsilon":
        return eps + wobble
    alpha, sigma_t = _alpha_sigma(sigma)
    return alpha * eps - sigma_t * x0 + wobble


def _euler_cases() -> list[Case]:
    g = _gen(21)
    cases = []

    def add(description, kind, sigma, sigma_next, shape=(2, 4, 8, 8), dtype=torch.float32, as_tensor=False):
        x0, eps, x, wobble = _draws(shape, sigma, g, dtype)
        out = _euler_output(kind, x0, eps, sigma, wobble)
        if as_tensor:  # as karras_sigmas gives them: float32 scalar tensors
            sigma, sigma_next = torch.tensor(sigma), torch.tensor(sigma_next)
        cases.append(Case(description, (kind, out, x, sigma, sigma_next)))

    for kind in ("epsilon", "v_prediction"):
        add(f"{kind!r}, the first step of 10 (t = 999 -> 899): sigma {SIGMA_999} -> {SIGMA_899}",
            kind, SIGMA_999, SIGMA_899)  # fmt: skip
        add(f"{kind!r}, a middle step: sigma {SIGMA_599} -> {SIGMA_299}", kind, SIGMA_599, SIGMA_299)
        add(f"{kind!r}, the last step: sigma {SIGMA_99} -> 0 (x_next is the clean estimate)",
            kind, SIGMA_99, 0.0)  # fmt: skip
    add(f"'v_prediction', zero terminal SNR's first step: sigma {SIGMA_ZTSNR_999} -> {SIGMA_ZTSNR_899} "
        "(float64, so that float32 rounding at sigma = 4096 does not hide a mistake)",
        "v_prediction", SIGMA_ZTSNR_999, SIGMA_ZTSNR_899, dtype=torch.float64)  # fmt: skip
    add("'epsilon', sigmas given as 0-dim float32 tensors (as karras_sigmas returns them): 1.5 -> 0.9",
        "epsilon", 1.5, 0.9, as_tensor=True)  # fmt: skip
    add(
        "'v_prediction', a batch of one, shape (1, 4, 3, 5), sigma 3.0 -> 1.0",
        "v_prediction",
        3.0,
        1.0,
        (1, 4, 3, 5),
    )
    return cases


def _vp_formulas_on_x(kind, out, x, sigma, sigma_next):
    """x0 from the VP conversions, applied to x as if it were x_t (the input is not rescaled)."""
    alpha, sigma_t = _alpha_sigma(float(sigma))
    denoised = (x - sigma_t * out) / alpha if kind == "epsilon" else alpha * x - sigma_t * out
    return x + (float(sigma_next) - float(sigma)) * (x - denoised) / float(sigma), denoised


def _euler_with(*, denoise=None, step=None):
    """A wrong Euler step: the right one with its denoiser or its update replaced."""

    def wrong(kind, out, x, sigma, sigma_next):
        s, s_next = float(sigma), float(sigma_next)
        alpha = 1 / math.sqrt(s**2 + 1)
        if denoise is not None:
            denoised = denoise(kind, out, x, s, alpha)
        elif kind == "epsilon":
            denoised = x - s * out
        else:
            denoised = alpha**2 * x - s * alpha * out
        d = (x - denoised) / s
        x_next = step(x, d, denoised, s, s_next) if step is not None else x + (s_next - s) * d
        return x_next, denoised

    return wrong


EULER_MISTAKES = [
    (
        _euler_with(denoise=lambda kind, out, x, s, alpha: x - s * out),
        "the v output was used as if it were epsilon; for v, D = x / (sigma^2 + 1) - sigma * v / "
        "sqrt(sigma^2 + 1) (convert v to x0 with alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha, "
        "on x_t = x * alpha)",
    ),
    (
        _vp_formulas_on_x,
        "x is the sigma-space sample x_t / alpha_t, not x_t: the VP conversions need the network's input "
        "x_t = x / sqrt(sigma^2 + 1) (for epsilon simply D = x - sigma * eps)",
    ),
    (
        _euler_with(step=lambda x, d, denoised, s, s_next: x + (s - s_next) * d),
        "the step has the wrong sign: x_next = x + (sigma_next - sigma) * d, and sigma_next < sigma, so "
        "the step removes noise",
    ),
    (
        _euler_with(step=lambda x, d, denoised, s, s_next: x + (s_next - s) * (x - denoised) / s_next),
        "the slope was taken at sigma_next: d = (x - D) / sigma, at the current noise level (at "
        "sigma_next = 0 this divides by zero)",
    ),
    (
        _euler_with(step=lambda x, d, denoised, s, s_next: denoised),
        "the step jumps straight to the clean estimate D; that is right only for sigma_next = 0: "
        "x_next = x + (sigma_next - sigma) * d",
    ),
    (
        _euler_with(step=lambda x, d, denoised, s, s_next: (x + (s_next - s) * d) / math.sqrt(s_next**2 + 1)),
        "x_next was scaled back to the VP sample; Euler stays in sigma-space (x = x_t / alpha_t): return "
        "x + (sigma_next - sigma) * d itself",
    ),
]  # fmt: skip


register(
    Exercise(
        name="euler_step",
        notebook="11_samplers",
        hint=(
            "D = x - sigma * model_output for 'epsilon'; for 'v_prediction' D = x / (sigma^2 + 1) - "
            "sigma * model_output / sqrt(sigma^2 + 1); then d = (x - D) / sigma and "
            "x_next = x + (sigma_next - sigma) * d; return (x_next, D)."
        ),
        reference=_euler_step,
        cases=_euler_cases,
        mistakes=EULER_MISTAKES,
    )
)


# ---------------------------------------------------------------- dpmpp_2m_step


def _dpmpp_2m_step(prediction_type, model_output, x_t, sigma, sigma_next, x0_prev, sigma_prev):
    from ..samplers import dpmpp_2m_step

    return dpmpp_2m_step(prediction_type, model_output, x_t, sigma, sigma_next, x0_prev, sigma_prev)


def _dpmpp_cases() -> list[Case]:
    g = _gen(22)
    cases = []

    def add(description, kind, sigma, sigma_next, sigma_prev=None, shape=(2, 4, 8, 8)):
        x0, eps, x, wobble = _draws(shape, sigma, g)
        alpha, sigma_t = _alpha_sigma(sigma)
        x_t = x * alpha  # the VP sample
        out = eps + wobble if kind == "epsilon" else alpha * eps - sigma_t * x0 + wobble
        x0_prev = None if sigma_prev is None else x0 + 0.5 * torch.randn(shape, generator=g)
        cases.append(Case(description, (kind, out, x_t, sigma, sigma_next, x0_prev, sigma_prev)))

    for kind in ("epsilon", "v_prediction"):
        add(f"{kind!r}, the first step (no history: first order), sigma {SIGMA_999} -> {SIGMA_899}",
            kind, SIGMA_999, SIGMA_899)  # fmt: skip
        add(f"{kind!r}, a second-order step, sigma {SIGMA_899} -> {SIGMA_599} after {SIGMA_999}",
            kind, SIGMA_899, SIGMA_599, SIGMA_999)  # fmt: skip
        add(f"{kind!r}, the last step, sigma {SIGMA_99} -> 0 (with history): x_next = x0_pred",
            kind, SIGMA_99, 0.0, SIGMA_299)  # fmt: skip
    add(f"'epsilon', second order, unequal steps: sigma {SIGMA_299} -> {SIGMA_99} after {SIGMA_599}",
        "epsilon", SIGMA_299, SIGMA_99, SIGMA_599)  # fmt: skip
    add(f"'v_prediction', zero terminal SNR's first step, sigma {SIGMA_ZTSNR_999} -> {SIGMA_ZTSNR_899}",
        "v_prediction", SIGMA_ZTSNR_999, SIGMA_ZTSNR_899)  # fmt: skip
    add(f"'v_prediction', zero terminal SNR's second step, sigma {SIGMA_ZTSNR_899} -> {SIGMA_599} after "
        f"{SIGMA_ZTSNR_999}", "v_prediction", SIGMA_ZTSNR_899, SIGMA_599, SIGMA_ZTSNR_999)  # fmt: skip
    add("'epsilon', a batch of one, shape (1, 4, 3, 5), sigma 3.0 -> 1.0 after 6.0",
        "epsilon", 3.0, 1.0, 6.0, (1, 4, 3, 5))  # fmt: skip
    return cases


def _dpmpp_with(*, x0_from=None, vp=None, order=2, r_from=None, combine=None, sign=1.0, h_sign=1.0):
    """A wrong DPM-Solver++(2M) step: the right one (written in float64 scalars) with one piece replaced."""

    def wrong(kind, out, x_t, sigma, sigma_next, x0_prev, sigma_prev):
        to_vp = vp or _alpha_sigma
        alpha_s, sigma_s = to_vp(sigma)
        if x0_from is not None:
            x0 = x0_from(kind, out, x_t, alpha_s, sigma_s)
        else:
            x0 = (x_t - sigma_s * out) / alpha_s if kind == "epsilon" else alpha_s * x_t - sigma_s * out
        if sigma_next == 0:
            return x0, x0
        alpha_t, sigma_t = to_vp(sigma_next)
        lam_s, lam_t = math.log(alpha_s / sigma_s), math.log(alpha_t / sigma_t)
        h = h_sign * (lam_t - lam_s)
        D = x0
        if x0_prev is not None and order == 2:
            alpha_u, sigma_u = to_vp(sigma_prev)
            lam_u = math.log(alpha_u / sigma_u)
            r = r_from(lam_u, lam_s, lam_t) if r_from is not None else (lam_s - lam_u) / h
            D = combine(x0, x0_prev, r) if combine is not None else x0 + (0.5 / r) * (x0 - x0_prev)
        x_next = (sigma_t / sigma_s) * x_t - sign * alpha_t * (math.exp(-h) - 1.0) * D
        return x_next, x0

    return wrong


DPMPP_MISTAKES = [
    (
        _dpmpp_with(x0_from=lambda kind, out, x_t, a, s: (x_t - s * out) / a),
        "the v output was used as if it were epsilon; for v, x0 = alpha_t * x_t - sigma_t * v",
    ),
    (
        _dpmpp_with(order=1),
        "the history is ignored, so every step is first order (DDIM): with x0_prev, use "
        "D = (1 + 1/(2r)) * x0 - 1/(2r) * x0_prev",
    ),
    (
        _dpmpp_with(r_from=lambda lam_u, lam_s, lam_t: (lam_t - lam_s) / (lam_s - lam_u)),
        "r is upside down: r = h_prev / h = (lambda - lambda_prev) / (lambda_next - lambda)",
    ),
    (
        _dpmpp_with(combine=lambda x0, x0_prev, r: (1 + 0.5 / r) * x0_prev - (0.5 / r) * x0),
        "the two predictions are swapped: the current x0 gets the weight 1 + 1/(2r), the previous one "
        "-1/(2r)",
    ),
    (
        _dpmpp_with(sign=-1.0),
        "the sign of the data term is flipped: x_next = (sigma_t,next / sigma_t) * x_t - "
        "alpha_next * (exp(-h) - 1) * D, and exp(-h) - 1 < 0",
    ),
    (
        _dpmpp_with(vp=lambda sigma: (1 / math.sqrt(sigma**2 + 1), sigma)),
        "the Karras sigma was used as the VP sigma_t; the VP pair is alpha = 1 / sqrt(sigma^2 + 1), "
        "sigma_t = sigma * alpha (so that alpha^2 + sigma_t^2 = 1)",
    ),
    (
        _dpmpp_with(h_sign=-1.0),
        "h has the wrong sign: h = lambda_next - lambda > 0, since the log-SNR grows as the noise falls",
    ),
]


register(
    Exercise(
        name="dpmpp_2m_step",
        notebook="11_samplers",
        hint=(
            "alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha, lambda = log(alpha / sigma_t) for "
            "sigma, sigma_next and sigma_prev; x0 = (x_t - sigma_t * out) / alpha ('epsilon') or "
            "alpha * x_t - sigma_t * out ('v_prediction'); if sigma_next == 0 return (x0, x0); "
            "h = lambda_next - lambda; D = x0, or with history r = (lambda - lambda_prev) / h and "
            "D = x0 + (x0 - x0_prev) / (2r); "
            "x_next = (sigma_t_next / sigma_t) * x_t - alpha_next * (exp(-h) - 1) * D; return (x_next, x0)."
        ),
        reference=_dpmpp_2m_step,
        cases=_dpmpp_cases,
        mistakes=DPMPP_MISTAKES,
    )
)
