"""Exercise checker for ``exercises/`` and ``solutions/``.

In a notebook::

    from ldm_lib.exercises import check, report
    check("x0_from_eps", x0_from_eps)   # ✓ passed, ☐ still to do, or an explanation of what is wrong
    report("02_eps_vs_v")               # what is done in this notebook
"""

from . import basics  # noqa: F401  (registers the exercises of notebooks 01-06)
from .checker import EXERCISES, ExerciseFailure, check, report

__all__ = ["EXERCISES", "ExerciseFailure", "check", "report"]
