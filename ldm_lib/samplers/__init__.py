"""Samplers: one file per algorithm, the denoising loop written out.

- ``ddim``: DDIM (Song et al. 2021), deterministic or with eta
- ``ddpm``: ancestral sampling of the DDPM posterior (Ho et al. 2020)
- ``euler``, ``euler_ancestral``, ``heun``: Karras et al. 2022 in the sigma = sigma_t / alpha_t form
- ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022)

Each matches the diffusers scheduler of the same name step for step (tests/test_samplers_parity.py).
Every ``*_sample`` takes ``model(x_t, t)`` (guidance lives inside it), one generator or one per
image, a progress bar and a ``callback(i, t, x0_pred)``; :func:`sample` picks one by name.
"""

from collections.abc import Callable

import torch

from .._checks import check_choice
from ..noise import Generators
from ..schedules import NoiseSchedule
from ._types import ModelFn, StepCallback
from .ddim import ddim_sample, ddim_step
from .ddpm import ddpm_sample, ddpm_step
from .dpmpp_2m import dpmpp_2m_sample, dpmpp_2m_step
from .euler import euler_sample, euler_step, karras_sigmas
from .euler_ancestral import euler_ancestral_sample, euler_ancestral_step
from .heun import heun_sample, heun_step

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": ddim_sample,
    "ddpm": ddpm_sample,
    "euler": euler_sample,
    "euler_ancestral": euler_ancestral_sample,
    "heun": heun_sample,
    "dpmpp_2m": dpmpp_2m_sample,
}
"""Every sampler by name, in the order the course meets them."""

STOCHASTIC = ("ddpm", "euler_ancestral")  # fresh noise at every step; ddim too when eta > 0
WITH_ETA = ("ddim", "euler_ancestral")  # the samplers whose amount of fresh noise is an option
# Network calls per step; Heun's last step (to sigma = 0) needs no correction: N steps cost 2N - 1.
MODEL_CALLS_PER_STEP = {name: 2 if name == "heun" else 1 for name in SAMPLERS}


def sample(
    name: str,
    model: ModelFn,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    num_inference_steps: int,
    prediction_type: str = "epsilon",
    spacing: str = "trailing",
    eta: float | None = None,
    generator: Generators = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run the sampler called ``name`` (a key of :data:`SAMPLERS`) from ``x_T`` (drawn if None).

    ``eta`` is the sampler's own default when None (0 for DDIM, 1 for Euler ancestral); giving one
    to a sampler without it is an error rather than silently ignored.
    """
    check_choice("sampler", name, tuple(SAMPLERS))
    kwargs = {}
    if eta is not None:
        if name not in WITH_ETA:
            raise ValueError(f"eta={eta} given for sampler {name!r}; eta applies only to {WITH_ETA}")
        kwargs["eta"] = eta
    return SAMPLERS[name](
        model,
        shape,
        schedule,
        num_inference_steps,
        prediction_type,
        spacing,
        generator=generator,
        device=device,
        x_T=x_T,
        progress=progress,
        callback=callback,
        **kwargs,
    )


__all__ = [
    "MODEL_CALLS_PER_STEP",
    "ModelFn",
    "SAMPLERS",
    "STOCHASTIC",
    "StepCallback",
    "WITH_ETA",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "dpmpp_2m_sample",
    "dpmpp_2m_step",
    "euler_ancestral_sample",
    "euler_ancestral_step",
    "euler_sample",
    "euler_step",
    "heun_sample",
    "heun_step",
    "karras_sigmas",
    "sample",
]
