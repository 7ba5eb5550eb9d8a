"""Exercise checker for ``exercises/`` and ``solutions/``.

In a notebook::

    from ldm_lib.exercises import check, report
    check("x0_from_eps", x0_from_eps)   # ✓ passed, ☐ still to do, or an explanation of what is wrong
    report("02_eps_vs_v")               # what is done in this notebook
"""

# Importing a module registers its exercises.
from . import (  # noqa: F401
    autoencoder,
    basics,
    cfg_experiments,
    kernels,
    noise_experiments,
    sampling,
    scaling,
    text_conditioning,
    training,
    unet,
)
from .checker import EXERCISES, ExerciseFailure, check, report

__all__ = ["EXERCISES", "ExerciseFailure", "check", "report"]
