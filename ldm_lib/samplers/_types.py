"""The two callables every sampler takes."""

from __future__ import annotations

from collections.abc import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``model(x_t, t) -> prediction``: the network (with any guidance inside) on a VP sample ``x_t`` and
a ``(B,)`` long tensor of timesteps, returning its prediction of the model's ``prediction_type``."""

StepCallback = Callable[[int, int, torch.Tensor], None]
"""``callback(i, t, x0_pred)``, called after step ``i`` (at timestep ``t``) with that step's estimate
of the clean sample: how notebooks draw x0-trajectories without copying a sampler's loop."""
