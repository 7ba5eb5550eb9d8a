r"""Loss weights over timesteps: Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via
Min-SNR Weighting Strategy", arXiv 2303.09556).

In x0-space the paper's weight is :math:`w_t = \min(\mathrm{SNR}(t), \gamma)`. The same weighting
expressed on the MSE of what the network actually predicts differs by the factor between the two
losses: :math:`\|\varepsilon-\hat\varepsilon\|^2 = \mathrm{SNR}\,\|x_0-\hat x_0\|^2` and
:math:`\|v-\hat v\|^2 = (\mathrm{SNR}+1)\,\|x_0-\hat x_0\|^2` (variance preserving, so
:math:`\sigma^2 = 1/(\mathrm{SNR}+1)`).
"""

from __future__ import annotations

import warnings

import torch

from ._checks import check_choice, check_number
from .parameterization import PREDICTION_TYPES


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    r"""Per-sample weights for the MSE of the prediction, Min-SNR-:math:`\gamma` (Hang et al. 2023,
    arXiv 2303.09556, §3.4 and §4.2):

    - ``"sample"`` (x0):      :math:`w = \min(\mathrm{SNR}, \gamma)`
    - ``"epsilon"``:          :math:`w = \min(\mathrm{SNR}, \gamma) / \mathrm{SNR}`
    - ``"v_prediction"``:     :math:`w = \min(\mathrm{SNR}, \gamma) / (\mathrm{SNR} + 1)`

    (Not :math:`\min(\mathrm{SNR}+1, \gamma)/(\mathrm{SNR}+1)`: that clips a different quantity.)

    Zero terminal SNR makes :math:`\mathrm{SNR} = 0` at t = T, where the epsilon form is 0/0.
    For every :math:`\mathrm{SNR} < \gamma` the epsilon weight is exactly 1, so the guard returns
    that limit, 1, instead of NaN, and warns: at SNR = 0 the input is pure noise, so predicting
    epsilon is trivial and says nothing about x0; zero terminal SNR should be trained with v.
    """
    check_number("gamma", gamma, low=0.0, low_open=True)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    snr = torch.as_tensor(snr)
    if not snr.dtype.is_floating_point:
        snr = snr.float()
    if (snr < 0).any() or torch.isnan(snr).any():
        raise ValueError("snr must be >= 0 everywhere (it is alpha**2 / sigma**2); got negative or NaN")
    clipped = snr.clamp(max=gamma)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    zero = snr == 0
    if zero.any():
        warnings.warn(
            "min_snr_weight: SNR = 0 (zero terminal SNR) makes the epsilon weight 0/0; using its "
            "limit 1. At SNR = 0 epsilon-prediction cannot learn x0: train zero terminal SNR "
            "with prediction_type='v_prediction'.",
            stacklevel=2,
        )
    return torch.where(zero, torch.ones_like(snr), clipped / torch.where(zero, 1, snr))
