r"""What the network predicts: epsilon, x0 or v, and every conversion between them.

Given :math:`x_t = \alpha x_0 + \sigma \varepsilon`, any one of :math:`\varepsilon`, :math:`x_0`
and the velocity :math:`v = \alpha\varepsilon - \sigma x_0` (Salimans & Ho 2022,
"Progressive Distillation for Fast Sampling of Diffusion Models", arXiv 2202.00512, §4 and App. D)
determines the other two. The formulas below hold for any alpha and sigma, not only for the
variance-preserving case :math:`\alpha^2+\sigma^2=1`, which is why the v-conversions divide by
:math:`\alpha^2+\sigma^2`. All arguments broadcast (alpha and sigma may be floats or tensors shaped
``(B, 1, 1, 1)``).

The stable pair is v: :math:`(x_t, v)` is a rotation of :math:`(x_0, \varepsilon)` by the angle
:math:`\phi` with :math:`(\alpha, \sigma) = (\cos\phi, \sin\phi)`, so converting back never divides
by a vanishing alpha. Recovering :math:`x_0` from :math:`\varepsilon` divides by alpha, which is 0
at zero terminal SNR: there an epsilon prediction says nothing about the image.
"""

from __future__ import annotations

import torch

from ._checks import check_choice

Tensorish = torch.Tensor | float
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha: Tensorish, sigma: Tensorish) -> torch.Tensor:
    r""":math:`x_0 = (x_t - \sigma\varepsilon)/\alpha` (Ho et al. 2020, arXiv 2006.11239, eq. 15).

    Undefined at :math:`\alpha = 0`, and an error in epsilon is amplified by :math:`\sigma/\alpha`.
    """
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha: Tensorish, sigma: Tensorish) -> torch.Tensor:
    r""":math:`\varepsilon = (x_t - \alpha x_0)/\sigma` (Song et al. 2021, DDIM, arXiv 2010.02502, eq. 12)."""
    return (x_t - alpha * x0) / sigma


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha: Tensorish, sigma: Tensorish) -> torch.Tensor:
    r""":math:`v = \alpha\varepsilon - \sigma x_0` (Salimans & Ho 2022, arXiv 2202.00512, §4)."""
    return alpha * eps - sigma * x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha: Tensorish, sigma: Tensorish) -> torch.Tensor:
    r""":math:`x_0 = (\alpha x_t - \sigma v)/(\alpha^2+\sigma^2)` (Salimans & Ho 2022, App. D).

    Derivation: :math:`\alpha x_t - \sigma v = \alpha^2 x_0 + \alpha\sigma\varepsilon
    - \sigma\alpha\varepsilon + \sigma^2 x_0 = (\alpha^2+\sigma^2)\,x_0`.
    """
    return (alpha * x_t - sigma * v) / (alpha**2 + sigma**2)


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha: Tensorish, sigma: Tensorish) -> torch.Tensor:
    r""":math:`\varepsilon = (\sigma x_t + \alpha v)/(\alpha^2+\sigma^2)` (Salimans & Ho 2022, App. D).

    Derivation: :math:`\sigma x_t + \alpha v = \sigma\alpha x_0 + \sigma^2\varepsilon
    + \alpha^2\varepsilon - \alpha\sigma x_0 = (\alpha^2+\sigma^2)\,\varepsilon`.
    """
    return (sigma * x_t + alpha * v) / (alpha**2 + sigma**2)


def v_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha: Tensorish, sigma: Tensorish) -> torch.Tensor:
    r""":math:`v = \big((\alpha^2+\sigma^2)\,\varepsilon - \sigma x_t\big)/\alpha`: substitute
    :math:`x_0 = (x_t-\sigma\varepsilon)/\alpha` into :math:`v = \alpha\varepsilon - \sigma x_0`
    (Salimans & Ho 2022, arXiv 2202.00512)."""
    return ((alpha**2 + sigma**2) * eps - sigma * x_t) / alpha


def v_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha: Tensorish, sigma: Tensorish) -> torch.Tensor:
    r""":math:`v = \big(\alpha x_t - (\alpha^2+\sigma^2)\,x_0\big)/\sigma`: substitute
    :math:`\varepsilon = (x_t-\alpha x_0)/\sigma` into :math:`v = \alpha\varepsilon - \sigma x_0`
    (Salimans & Ho 2022, arXiv 2202.00512)."""
    return (alpha * x_t - (alpha**2 + sigma**2) * x0) / sigma


def training_target(
    prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, alpha: Tensorish, sigma: Tensorish
) -> torch.Tensor:
    r"""What the network is trained to output: :math:`\varepsilon`, :math:`v = \alpha\varepsilon -
    \sigma x_0` or :math:`x_0`, for ``prediction_type`` "epsilon", "v_prediction" or "sample"."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    return x0


def x0_from_prediction(
    prediction_type: str, x_t: torch.Tensor, pred: torch.Tensor, alpha: Tensorish, sigma: Tensorish
) -> torch.Tensor:
    """The network's estimate of :math:`x_0`, whatever it predicts (see the conversions above)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, pred, alpha, sigma)
    if prediction_type == "v_prediction":
        return x0_from_v(x_t, pred, alpha, sigma)
    return pred


def eps_from_prediction(
    prediction_type: str, x_t: torch.Tensor, pred: torch.Tensor, alpha: Tensorish, sigma: Tensorish
) -> torch.Tensor:
    r"""The network's estimate of :math:`\varepsilon`, whatever it predicts."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return eps_from_v(x_t, pred, alpha, sigma)
    return eps_from_x0(x_t, pred, alpha, sigma)
