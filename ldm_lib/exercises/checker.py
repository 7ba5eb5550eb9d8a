"""The exercise checker: runs a learner's function against the reference on chosen inputs and
explains the first failure (which input, expected vs got, a hint) without showing the solution.

An exercise is registered once (see ``basics.py``) with its reference, its cases (random inputs
and the edge cases that catch real mistakes: t near 0 and T, SNR = 0, broadcasting) and, where a
common mistake is known, a function reproducing it so the hint can name it. Random functions
(noise) cannot be compared value by value; they register a ``verify`` that tests properties.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


class ExerciseFailure(AssertionError):
    """A learner's function gave a wrong result; the message says where and why."""


@dataclass
class Case:
    """One input to try: a description for the learner, and the positional arguments."""

    description: str
    args: tuple


@dataclass
class Exercise:
    """One exercise: what to compare the learner's function with, on which inputs, and how to help."""

    name: str
    notebook: str
    hint: str
    reference: Callable[..., Any] | None = None
    cases: Callable[[], Sequence[Case]] = lambda: ()
    # Other answers that are also right (e.g. a population instead of a sample std).
    accepted: Sequence[Callable[..., Any]] = ()
    # (mistaken function, what it means): recognised wrong answers get a precise hint.
    mistakes: Sequence[tuple[Callable[..., Any], str]] = ()
    # For random functions: verify(fn) returns None when fn is right, else what is wrong.
    verify: Callable[[Callable[..., Any]], str | None] | None = None
    atol: float = 1e-5
    rtol: float = 1e-4
    extra: dict = field(default_factory=dict)


EXERCISES: dict[str, Exercise] = {}
# name -> "passed" | "todo" | "failed", for report()
_status: dict[str, str] = {}


def register(exercise: Exercise) -> Exercise:
    """Add an exercise to the registry ``check`` looks names up in (each name once)."""
    if exercise.name in EXERCISES:
        raise ValueError(f"exercise {exercise.name!r} is registered twice")
    EXERCISES[exercise.name] = exercise
    return exercise


def describe(value: Any) -> str:
    """A short description of an argument or result: shape and dtype for tensors, else repr."""
    if isinstance(value, torch.Tensor):
        if value.numel() <= 6:
            return f"tensor({value.tolist()}, dtype={value.dtype})"
        return f"tensor of shape {tuple(value.shape)}, {value.dtype}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, torch.Generator):
        return "torch.Generator"
    return repr(value)


def compare(got: Any, expected: Any, atol: float, rtol: float) -> str | None:
    """None if ``got`` matches ``expected``, else a sentence saying how it differs."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"expected a tuple of {len(expected)} values, got {describe(got)}"
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            problem = compare(g, e, atol, rtol)
            if problem:
                return f"item {i} of the result: {problem}"
        return None
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor, got {type(got).__name__}: {describe(got)}"
        if got.shape != expected.shape:
            return (
                f"expected shape {tuple(expected.shape)}, got {tuple(got.shape)} "
                "(check how your values broadcast)"
            )
        if got.dtype != expected.dtype:
            return f"expected dtype {expected.dtype}, got {got.dtype}"
        if got.device != expected.device:
            return f"expected the result on {expected.device}, got it on {got.device}"
        g, e = got.double(), expected.double()
        if torch.isnan(g).any() and not torch.isnan(e).any():
            where = tuple(torch.nonzero(torch.isnan(g))[0].tolist())
            return f"your result has NaN (first at index {where}); expected {e[where].item():.6g} there"
        close = torch.isclose(g, e, atol=atol, rtol=rtol, equal_nan=True)
        if not close.all():
            err = (g - e).abs().nan_to_num(nan=float("inf"))
            where = tuple(torch.nonzero(~close)[0].tolist())
            return (
                f"values differ: at index {where} expected {e[where].item():.6g}, got "
                f"{g[where].item():.6g} ({int((~close).sum())} of {close.numel()} values wrong, "
                f"largest error {err.max().item():.3g})"
            )
        return None
    if isinstance(expected, (int, float)):
        if not isinstance(got, (int, float, torch.Tensor)):
            return f"expected a number, got {describe(got)}"
        if abs(float(got) - expected) > atol + rtol * abs(expected):
            return f"expected {expected:.6g}, got {float(got):.6g}"
        return None
    return None if got == expected else f"expected {describe(expected)}, got {describe(got)}"


def _fail(ex: Exercise, message: str) -> None:
    _status[ex.name] = "failed"
    raise ExerciseFailure(f"✗ {ex.name}: {message}\nHint: {ex.hint}") from None


def check(name: str, fn: Callable[..., Any]) -> bool:
    """Check the learner's ``fn`` for exercise ``name``.

    Returns True when every case passes, False (and says what is left to do) while ``fn`` still
    raises ``NotImplementedError``; raises :class:`ExerciseFailure` explaining the first wrong case.
    """
    if name not in EXERCISES:
        known = ", ".join(sorted(EXERCISES))
        raise ValueError(f"name={name!r} is not an exercise; expected one of {known}")
    ex = EXERCISES[name]
    if not callable(fn):
        raise ValueError(f"check({name!r}, ...) needs your function, got {describe(fn)}")
    try:
        if ex.verify is not None:
            problem = ex.verify(fn)
            if problem:
                _fail(ex, problem)
            n = "all property"
        else:
            cases = ex.cases()
            for case in cases:
                _run_case(ex, fn, case)
            n = str(len(cases))
    except NotImplementedError:
        _status[name] = "todo"
        print(f"☐ {name}: still to do (replace the `raise NotImplementedError` with your code).")
        return False
    _status[name] = "passed"
    print(f"✓ {name}: passed {n} checks.")
    return True


def _run_case(ex: Exercise, fn: Callable[..., Any], case: Case) -> None:
    args = [a.clone() if isinstance(a, torch.Tensor) else a for a in case.args]
    try:
        got = fn(*args)
    except NotImplementedError:
        raise
    except Exception as error:  # the learner's code crashed: say on which input
        _fail(ex, f"raised {type(error).__name__}: {error}\n  on input: {case.description}")
    for before, after in zip(case.args, args, strict=True):
        if isinstance(before, torch.Tensor) and not torch.equal(before, after):
            _fail(ex, f"your function changed its input in place\n  on input: {case.description}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's own explanations are not for this page
        expected = ex.reference(*case.args)
    problem = compare(got, expected, ex.atol, ex.rtol)
    if problem is None or any(
        compare(got, other(*case.args), ex.atol, ex.rtol) is None for other in ex.accepted
    ):
        return
    for mistake, meaning in ex.mistakes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrong = mistake(*case.args)
        if compare(got, wrong, ex.atol, ex.rtol) is None:
            problem += f"\n  Your result matches a known mistake: {meaning}"
            break
    inputs = ", ".join(describe(a) for a in case.args)
    _fail(ex, f"{problem}\n  on input: {case.description}\n  arguments: {inputs}")


def report(notebook: str | None = None) -> dict[str, str]:
    """Print and return the status of every exercise (of one notebook, if given)."""
    names = [n for n, ex in EXERCISES.items() if notebook is None or ex.notebook == notebook]
    marks = {"passed": "✓", "todo": "☐", "failed": "✗", "not run": "·"}
    result = {n: _status.get(n, "not run") for n in names}
    for n, state in result.items():
        print(f"{marks[state]} {n}: {state}")
    done = sum(s == "passed" for s in result.values())
    print(f"{done} of {len(result)} exercises passed.")
    return result
