r"""A labelled 2-D mixture of isotropic Gaussians whose diffused densities are known exactly.

The data are points :math:`x_0 \in \mathbb R^2` drawn from

.. math:: p(x_0) = \sum_k \pi_k\, \mathcal N(x_0;\ \mu_k,\ s_k^2 I),

each component :math:`k` belonging to one class :math:`c_k`. Diffusing by the variance-preserving
forward process :math:`x_t = \alpha x_0 + \sigma\varepsilon` keeps every component Gaussian:

.. math:: \mathcal N(\mu_k, s_k^2 I) \;\to\; \mathcal N(\alpha\mu_k,\ v_k I),\qquad
          v_k = \alpha^2 s_k^2 + \sigma^2,

so :math:`p_t(x)`, the class-conditional :math:`p_t(x \mid c)` (the same sum over the components of
class :math:`c`, weights renormalised), their scores, and the exact "network outputs" are closed
form. With the responsibilities :math:`r_k(x) = \pi_k \mathcal N(x; \alpha\mu_k, v_k I) / p_t(x)`:

.. math:: \nabla_x \log p_t(x) = \sum_k r_k(x)\,\frac{\alpha\mu_k - x}{v_k},\qquad
          \hat\varepsilon(x) = \mathbb E[\varepsilon \mid x_t = x] = -\sigma\,\nabla_x \log p_t(x),

the second by Tweedie's formula, :math:`\alpha\,\mathbb E[x_0 \mid x_t] = x_t + \sigma^2
\nabla\log p_t(x_t)` (Efron 2011, "Tweedie's formula and selection bias"; in diffusion models:
Song et al. 2021, arXiv 2011.13456; Kingma et al. 2021, arXiv 2107.00630). A sampler fed these
exact predictions has no model error left: what it produces shows the sampler and the guidance
alone. That is what notebook 06 needs to show classifier-free guidance (Ho & Salimans 2022,
arXiv 2207.12598): the guided score :math:`\nabla\log p_t(x) + w\,\nabla\log p_t(c \mid x)` is
computable here, where the conditional and unconditional scores are exact.

Everything is computed in float64; results come back in the dtype of ``x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_number

#: The label meaning "no condition" (the empty caption): ``label=NULL_LABEL`` gives p(x), as None does.
NULL_LABEL = -1

Scalarish = float | torch.Tensor
Labelish = int | torch.Tensor | None


@dataclass(frozen=True, eq=False)
class GaussianMixture2D:
    r"""A mixture :math:`\sum_k \pi_k \mathcal N(\mu_k, s_k^2 I)` in 2-D with a class per component.

    - ``means``: ``(K, 2)`` component means :math:`\mu_k`,
    - ``stds``: ``(K,)`` component standard deviations :math:`s_k > 0`,
    - ``weights``: ``(K,)`` positive weights :math:`\pi_k` (normalised to sum to 1),
    - ``labels``: ``(K,)`` integer class of each component; classes are ``0 .. C-1``, each with
      at least one component.

    Wherever a method takes ``alpha, sigma``, it describes :math:`x_t = \alpha x_0 + \sigma
    \varepsilon`: floats, or tensors of shape ``()``, ``(N,)`` or ``(N, 1)`` (one pair per point,
    as a sampler's ``schedule.alpha(t)`` for a batch of timesteps). Wherever it takes ``label``:
    ``None`` or :data:`NULL_LABEL` for the unconditional density, an ``int`` class for all points,
    or an ``(N,)`` integer tensor of per-point classes where ``-1`` marks an unconditional point
    (a dropped caption).
    """

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        means = torch.as_tensor(self.means, dtype=torch.float64)
        stds = torch.as_tensor(self.stds, dtype=torch.float64)
        weights = torch.as_tensor(self.weights, dtype=torch.float64)
        labels = torch.as_tensor(self.labels)
        if means.ndim != 2 or means.shape[1] != 2 or means.shape[0] == 0:
            raise ValueError(f"means must have shape (K, 2) with K >= 1, got {tuple(means.shape)}")
        K = means.shape[0]
        for name, value in (("stds", stds), ("weights", weights), ("labels", labels)):
            if value.shape != (K,):
                raise ValueError(
                    f"{name} must have shape ({K},) like means' first axis, got {tuple(value.shape)}"
                )
        if not torch.isfinite(means).all():
            raise ValueError("means contains NaN or inf; expected finite values")
        if not (torch.isfinite(stds).all() and (stds > 0).all()):
            raise ValueError(f"stds={stds.tolist()!r}: every std must be finite and > 0")
        if not (torch.isfinite(weights).all() and (weights > 0).all()):
            raise ValueError(f"weights={weights.tolist()!r}: every weight must be finite and > 0")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        labels = labels.long()
        if labels.min() < 0:
            raise ValueError(f"labels={labels.tolist()!r}: classes are numbered 0 .. C-1")
        missing = set(range(int(labels.max()) + 1)) - set(labels.tolist())
        if missing:
            raise ValueError(f"labels={labels.tolist()!r}: classes {sorted(missing)} have no component")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds)
        object.__setattr__(self, "weights", weights / weights.sum())
        object.__setattr__(self, "labels", labels)

    # ------------------------------------------------------------------ structure

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def class_weights(self) -> torch.Tensor:
        r"""The class prior :math:`p(c) = \sum_{k: c_k = c} \pi_k`, shape ``(C,)``."""
        return torch.zeros(self.num_classes, dtype=torch.float64).index_add_(0, self.labels, self.weights)

    def component_weights(self, label: int | None = None) -> torch.Tensor:
        r"""The mixture weights of :math:`p(x_0 \mid c)`: :math:`\pi_k / p(c)` for the components of
        class ``label``, 0 for the others; ``None`` gives :math:`\pi` itself. Shape ``(K,)``."""
        if label is None or label == NULL_LABEL:
            return self.weights.clone()
        self._check_class(label)
        w = torch.where(self.labels == label, self.weights, torch.zeros_like(self.weights))
        return w / w.sum()

    def _check_class(self, label: int) -> None:
        check_number("label", label, low=0, high=self.num_classes - 1, integer=True)

    # ------------------------------------------------------------------ moments and sampling

    def mean(self, label: int | None = None) -> torch.Tensor:
        r""":math:`\mathbb E[x_0] = \sum_k \pi_k \mu_k` (of class ``label`` if given), shape ``(2,)``."""
        return self.component_weights(label) @ self.means

    def covariance(self, label: int | None = None) -> torch.Tensor:
        r""":math:`\mathrm{Cov}[x_0] = \sum_k \pi_k (s_k^2 I + \mu_k\mu_k^\top) - m m^\top`, ``(2, 2)``."""
        w = self.component_weights(label)
        m = w @ self.means
        second = torch.eye(2, dtype=torch.float64) * (w @ self.stds**2)
        second = second + (w[:, None] * self.means).T @ self.means
        return second - torch.outer(m, m)

    def sample(
        self, n: int, generator: torch.Generator | None = None, label: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``n`` draws of :math:`x_0` (of class ``label`` if given) and their classes.

        Returns ``(x0, classes)``: float64 ``(n, 2)`` and int64 ``(n,)``. Pick a component
        :math:`k \sim \pi` then :math:`x_0 = \mu_k + s_k z`, :math:`z \sim \mathcal N(0, I)`.
        """
        check_number("n", n, low=1, integer=True)
        k = torch.multinomial(self.component_weights(label), n, replacement=True, generator=generator)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z, self.labels[k]

    def diffused(self, alpha: float, sigma: float) -> GaussianMixture2D:
        r"""The mixture of :math:`x_t = \alpha x_0 + \sigma\varepsilon`: means :math:`\alpha\mu_k`,
        stds :math:`\sqrt{\alpha^2 s_k^2 + \sigma^2}`, same weights and labels."""
        check_number("alpha", alpha, low=0.0)
        check_number("sigma", sigma, low=0.0)
        stds = (alpha**2 * self.stds**2 + sigma**2).sqrt()
        return GaussianMixture2D(alpha * self.means, stds, self.weights, self.labels)

    # ------------------------------------------------------------------ densities of x_t

    def _prepare(
        self, x: torch.Tensor, alpha: Scalarish, sigma: Scalarish
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` as float64 ``(N, 2)``; alpha and sigma as float64 ``(N or 1, 1)``."""
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (N, 2), got {shape}")
        n = x.shape[0]
        out = []
        for name, value in (("alpha", alpha), ("sigma", sigma)):
            v = torch.as_tensor(value, dtype=torch.float64, device=x.device)
            if v.numel() != 1 and v.shape not in ((n,), (n, 1)):
                raise ValueError(
                    f"{name} must be a scalar or have shape ({n},) or ({n}, 1), got {tuple(v.shape)}"
                )
            if not torch.isfinite(v).all() or (v < 0).any():
                raise ValueError(f"{name} must be finite and >= 0 everywhere")
            out.append(v.reshape(-1, 1))
        return x.to(torch.float64), out[0], out[1]

    def _log_joint(
        self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, label: Labelish
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`\log \pi_k + \log\mathcal N(x; \alpha\mu_k, v_k I)` for the components allowed
        by ``label`` (``-inf`` for the others), shape ``(N, K)``, and the variances ``(N, K)``."""
        means, stds, weights = (p.to(x.device) for p in (self.means, self.stds, self.weights))
        var = alpha**2 * stds**2 + sigma**2  # (N or 1, K)
        if (var <= 0).any():
            raise ValueError("alpha and sigma are both 0: x_t = 0 has no density")
        diff = x[:, None, :] - alpha[:, :, None] * means  # (N, K, 2)
        log_normal = -0.5 * (diff**2).sum(-1) / var - torch.log(2 * math.pi * var)
        log_joint = torch.log(weights) + log_normal
        mask = self._mask(label, x.shape[0], x.device)
        return log_joint.masked_fill(~mask, -math.inf), var.expand_as(log_joint)

    def _mask(self, label: Labelish, n: int, device: torch.device) -> torch.Tensor:
        """``(N or 1, K)`` booleans: which components each point's label allows."""
        labels = self.labels.to(device)
        if label is None:
            return torch.ones(1, self.num_components, dtype=torch.bool, device=device)
        if isinstance(label, torch.Tensor) and label.ndim > 0:
            if label.dtype.is_floating_point or label.dtype == torch.bool or label.shape != (n,):
                raise ValueError(
                    f"label must be an integer tensor of shape ({n},), got {label.dtype} {tuple(label.shape)}"
                )
            if label.numel() and (label.min() < NULL_LABEL or label.max() >= self.num_classes):
                raise ValueError(
                    f"labels must lie in {NULL_LABEL} .. {self.num_classes - 1}, got {label.tolist()}"
                )
            label = label.to(device)
            return (labels[None, :] == label[:, None]) | (label[:, None] == NULL_LABEL)
        label = int(label) if isinstance(label, torch.Tensor) else label
        if label == NULL_LABEL:
            return self._mask(None, n, device)
        self._check_class(label)
        return (labels == label)[None, :]

    def log_prob(
        self, x: torch.Tensor, alpha: Scalarish = 1.0, sigma: Scalarish = 0.0, label: Labelish = None
    ) -> torch.Tensor:
        r""":math:`\log p_t(x)` (or :math:`\log p_t(x \mid c)`), shape ``(N,)``; by default
        :math:`\alpha = 1, \sigma = 0`, the data density itself.

        .. math:: \log p_t(x \mid c) = \operatorname{logsumexp}_{k: c_k = c}
                  \big[\log \pi_k - \log p(c) + \log\mathcal N(x; \alpha\mu_k, v_k I)\big]
        """
        xx, a, s = self._prepare(x, alpha, sigma)
        log_joint, _ = self._log_joint(xx, a, s, label)
        log_class = self._log_class_prior(label, xx.shape[0], xx.device)
        return (torch.logsumexp(log_joint, dim=1) - log_class).to(_out_dtype(x))

    def _log_class_prior(self, label: Labelish, n: int, device: torch.device) -> torch.Tensor:
        """:math:`\\log p(c)` per point (0 where unconditional), shape ``(N,)`` or ``()``."""
        if label is None:
            return torch.zeros((), dtype=torch.float64, device=device)
        mask = self._mask(label, n, device).to(torch.float64)
        return torch.log(mask @ self.weights.to(device))

    def responsibilities(
        self, x: torch.Tensor, alpha: Scalarish, sigma: Scalarish, label: Labelish = None
    ) -> torch.Tensor:
        r""":math:`r_k(x) = p(k \mid x_t = x, c)`, the posterior over components, shape ``(N, K)``."""
        xx, a, s = self._prepare(x, alpha, sigma)
        log_joint, _ = self._log_joint(xx, a, s, label)
        return torch.softmax(log_joint, dim=1).to(_out_dtype(x))

    def class_posterior(
        self, x: torch.Tensor, alpha: Scalarish = 1.0, sigma: Scalarish = 0.0
    ) -> torch.Tensor:
        r""":math:`p(c \mid x_t = x) = \sum_{k: c_k = c} r_k(x)`, the exact classifier, shape ``(N, C)``.

        Classifier guidance (Dhariwal & Nichol 2021, arXiv 2105.05233) follows the gradient of its
        log; classifier-free guidance gets the same direction as a difference of two scores,
        :math:`\nabla\log p_t(c \mid x) = \nabla\log p_t(x \mid c) - \nabla\log p_t(x)` (Bayes).
        """
        r = self.responsibilities(x, alpha, sigma).to(torch.float64)
        out = torch.zeros(r.shape[0], self.num_classes, dtype=torch.float64, device=r.device)
        return out.index_add_(1, self.labels.to(r.device), r).to(_out_dtype(x))

    def score(
        self, x: torch.Tensor, alpha: Scalarish, sigma: Scalarish, label: Labelish = None
    ) -> torch.Tensor:
        r"""The score of the diffused density, :math:`\nabla_x \log p_t(x \mid c)`, shape ``(N, 2)``:

        .. math:: \nabla_x \log \sum_k \pi_k \mathcal N(x; \alpha\mu_k, v_k I)
                  = \sum_k r_k(x)\, \frac{\alpha\mu_k - x}{v_k}

        (the gradient of each Gaussian is itself times :math:`(\alpha\mu_k - x)/v_k`; dividing by
        the sum turns the weights into the responsibilities :math:`r_k`).
        """
        xx, a, s = self._prepare(x, alpha, sigma)
        log_joint, var = self._log_joint(xx, a, s, label)
        r = torch.softmax(log_joint, dim=1)  # (N, K)
        pull = (a[:, :, None] * self.means.to(xx.device) - xx[:, None, :]) / var[:, :, None]
        return (r[:, :, None] * pull).sum(1).to(_out_dtype(x))

    def eps(
        self, x: torch.Tensor, alpha: Scalarish, sigma: Scalarish, label: Labelish = None
    ) -> torch.Tensor:
        r"""The ideal epsilon-prediction :math:`\mathbb E[\varepsilon \mid x_t = x, c]
        = -\sigma\,\nabla_x \log p_t(x \mid c)` (Tweedie), shape ``(N, 2)``.

        It is what a network trained with the epsilon MSE converges to, so ``model(x, t) =
        mixture.eps(x, alpha(t), sigma(t))`` is a perfect epsilon model for the samplers.
        """
        _, _, s = self._prepare(x, alpha, sigma)
        return (-s * self.score(x, alpha, sigma, label).to(torch.float64)).to(_out_dtype(x))

    def denoise(
        self, x: torch.Tensor, alpha: Scalarish, sigma: Scalarish, label: Labelish = None
    ) -> torch.Tensor:
        r"""The ideal x0-prediction :math:`\mathbb E[x_0 \mid x_t = x, c]`, shape ``(N, 2)``:

        .. math:: \mathbb E[x_0 \mid x_t] = \sum_k r_k(x)\Big(\mu_k + \frac{\alpha s_k^2}{v_k}
                  (x - \alpha\mu_k)\Big)

        (the Gaussian posterior mean of each component). It equals Tweedie's
        :math:`(x + \sigma^2\nabla\log p_t)/\alpha` wherever :math:`\alpha > 0`, and stays defined at
        :math:`\alpha = 0` (zero terminal SNR), where it is the mean of the data.
        """
        xx, a, s = self._prepare(x, alpha, sigma)
        log_joint, var = self._log_joint(xx, a, s, label)
        r = torch.softmax(log_joint, dim=1)
        means, stds = self.means.to(xx.device), self.stds.to(xx.device)
        gain = (a * stds**2 / var)[:, :, None]  # (N, K, 1)
        post = means + gain * (xx[:, None, :] - a[:, :, None] * means)
        return (r[:, :, None] * post).sum(1).to(_out_dtype(x))


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype.is_floating_point else torch.float64


def default_mixture() -> GaussianMixture2D:
    r"""The course's toy data: three classes on a triangle, about unit scale like SD's latents.

    - class 0 ("left"): one component at (-1.6, -0.8), std 0.5, weight 0.35;
    - class 1 ("right"): one component at (1.6, -0.8), std 0.5, weight 0.35;
    - class 2 ("top"): two components at (-0.7, 1.3) and (0.7, 1.3), std 0.45, weight 0.15 each.

    The classes are separated but overlap a little: 0.5% to 1.5% of a class's samples lie nearer
    another class's component, the ambiguous samples that classifier-free guidance removes.
    """
    return GaussianMixture2D(
        means=torch.tensor([[-1.6, -0.8], [1.6, -0.8], [-0.7, 1.3], [0.7, 1.3]], dtype=torch.float64),
        stds=torch.tensor([0.5, 0.5, 0.45, 0.45], dtype=torch.float64),
        weights=torch.tensor([0.35, 0.35, 0.15, 0.15], dtype=torch.float64),
        labels=torch.tensor([0, 1, 2, 2]),
    )


__all__ = ["NULL_LABEL", "GaussianMixture2D", "default_mixture"]
