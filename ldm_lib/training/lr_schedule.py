r"""Learning-rate schedules: linear warm-up (Goyal et al. 2017, arXiv 1706.02677), then constant,
linear decay or cosine decay (Loshchilov & Hutter 2017, SGDR, arXiv 1608.03983).

With warm-up :math:`W`, total :math:`N` steps and :math:`p = (n - W)/(N - W)`:

.. math:: f(n) = \frac{n+1}{W}\ (n < W),\qquad
          f(n) = \begin{cases} 1 & \text{constant}\\ 1 - p & \text{linear}\\
          r + (1-r)\,\tfrac12(1 + \cos \pi p) & \text{cosine}\end{cases}

a factor on the base learning rate (:math:`r` = ``min_lr_ratio``).
"""

from __future__ import annotations

import math

from .._checks import check_choice, check_number

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(
    step: int, schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """The factor :math:`f(n)` on the base learning rate at optimizer step ``step`` (0-based)."""
    check_choice("lr_schedule", schedule, LR_SCHEDULES)
    check_number("step", step, low=0, integer=True)
    check_number("warmup_steps", warmup_steps, low=0, integer=True)
    check_number("max_steps", max_steps, low=1, integer=True)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or max_steps <= warmup_steps:
        return 1.0
    p = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - p
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
