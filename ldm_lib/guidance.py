r"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) and guidance rescale
(Lin et al. 2023, arXiv 2305.08891, §3.4).

Guidance acts on whatever the network predicts (epsilon, v or x0): all are affine in the score,
so guiding any of them guides the score the same way.
"""

from __future__ import annotations

import torch

from ._checks import check_number


def classifier_free_guidance(
    uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    r"""Extrapolate from the unconditional prediction towards the conditional one
    (Ho & Salimans 2022, arXiv 2207.12598, eq. 6):

    .. math:: \hat\varepsilon_w = \hat\varepsilon_u + w\,(\hat\varepsilon_c - \hat\varepsilon_u)

    (:math:`u` the unconditional, empty-prompt prediction; :math:`c` the conditional one.)

    ``w = 0`` is unconditional, ``w = 1`` conditional, ``w > 1`` pushes past the conditional model
    (Stable Diffusion's default is 7.5). ``scale`` may be a float or a per-sample tensor ``(B,)``.
    In score terms: :math:`\nabla\log p(x) + w\,\nabla\log p(c \mid x)`, a sharpened
    :math:`p(x)\,p(c \mid x)^w`.
    """
    if uncond.shape != cond.shape:
        raise ValueError(f"uncond and cond must have the same shape, got {uncond.shape} and {cond.shape}")
    if isinstance(scale, torch.Tensor) and scale.ndim == 1:
        scale = scale.to(cond).reshape(-1, *([1] * (cond.ndim - 1)))
    elif not isinstance(scale, torch.Tensor):
        check_number("scale", scale)
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    r"""Guidance rescale (Lin et al. 2023, arXiv 2305.08891, §3.4, Alg. 2):

    .. math:: x_{rescaled} = x_{cfg}\,\frac{\mathrm{std}(x_{pos})}{\mathrm{std}(x_{cfg})},\qquad
              x_{final} = \phi\,x_{rescaled} + (1-\phi)\,x_{cfg}

    with the standard deviation taken per sample, over all axes but the batch. Large guidance
    scales inflate the prediction's std (over-exposed, saturated images); rescaling brings it back
    to the conditional prediction's. ``phi`` in [0, 1]; the paper uses 0.7.
    """
    check_number("phi", phi, low=0.0, high=1.0)
    if guided.shape != cond.shape:
        raise ValueError(f"guided and cond must have the same shape, got {guided.shape} and {cond.shape}")
    dims = tuple(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    # A constant prediction (std 0) has nothing to rescale; leave it as it is instead of dividing by 0.
    ratio = torch.where(std_guided > 0, std_cond / std_guided, torch.ones_like(std_guided))
    rescaled = guided * ratio
    return phi * rescaled + (1 - phi) * guided
