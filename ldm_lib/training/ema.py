r"""Exponential moving average of the weights (Polyak & Juditsky 1992; used for sampling by DDPM,
Ho et al. 2020, and LDM, Rombach et al. 2022).

After each optimizer step :math:`n`:

.. math:: \bar\theta \leftarrow \beta_n\,\bar\theta + (1 - \beta_n)\,\theta,\qquad
          \beta_n = \min\!\left(\beta, \frac{1 + n}{10 + n}\right)\ \text{(with warm-up)}

The warm-up (the LDM code's ``LitEma``) keeps the early average from being dominated by the random
initial weights: at :math:`n = 0` the average is 90% the new weights; :math:`\beta` is reached after
about :math:`10/(1-\beta)` steps. The average is kept in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_number


def ema_decay(step: int, decay: float, warmup: bool = True) -> float:
    r""":math:`\beta_n = \min(\beta, (1+n)/(10+n))` with warm-up, else :math:`\beta`."""
    check_number("step", step, low=0, integer=True)
    check_number("decay", decay, low=0.0, high=1.0, high_open=True)
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


class EMA:
    """An fp32 shadow copy of a module's trainable parameters (buffers are copied as they are)."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        check_number("decay", decay, low=0.0, high=1.0, high_open=True)
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold the model's current weights into the average; returns the decay used."""
        beta = ema_decay(self.num_updates, self.decay, self.warmup)
        params = dict(model.named_parameters())
        names = list(self.shadow)
        shadow = [self.shadow[n] for n in names]
        current = [params[n].detach().float() for n in names]
        torch._foreach_lerp_(shadow, current, 1 - beta)  # shadow += (1 - beta) * (current - shadow)
        self.num_updates += 1
        return beta

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the average (e.g. a copy of the model for sampling)."""
        params = dict(model.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value.to(params[name].dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, value in state.items():
            self.shadow[name].copy_(value)
        self.num_updates = num_updates
