"""The checker grades, explains without revealing, and the committed exercises are generated."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from ldm_lib.exercises import EXERCISES, ExerciseFailure, check, report
from ldm_lib.exercises.checker import Case, Exercise, compare
from ldm_lib.weighting import min_snr_weight

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_exercises  # noqa: E402


def _todo(*args):
    raise NotImplementedError


def test_every_exercise_accepts_its_reference_and_reports_todo(capsys):
    for name, ex in EXERCISES.items():
        if ex.reference is not None:
            assert check(name, ex.reference) is True
        assert check(name, _todo) is False
    out = capsys.readouterr().out
    assert "still to do" in out
    assert report()  # every exercise listed


@pytest.mark.filterwarnings("ignore:min_snr_weight")  # mistakes run as learner code, unsilenced
def test_each_known_mistake_is_caught_and_named():
    for name, ex in EXERCISES.items():
        for mistake, meaning in ex.mistakes:
            with pytest.raises(ExerciseFailure) as info:
                check(name, mistake)
            message = str(info.value)
            assert "on input:" in message and "Hint:" in message, name
            assert meaning in message, (name, meaning)


@pytest.mark.parametrize(
    ("name", "wrong", "words"),
    [
        ("offset_noise", lambda like, s, g: torch.randn(like.shape, generator=g), ["strength"]),
        (
            "offset_noise",
            lambda like, s, g: (
                torch.randn(like.shape, generator=g) + s * torch.randn(like.shape[0], 1, 1, 1, generator=g)
            ),
            ["(B, C, 1, 1)"],
        ),
        ("offset_noise", lambda like, s, g: like + torch.randn(like.shape, generator=g), ["like + noise"]),
        (
            "perturbed_training_pair",
            lambda x0, n, a, s, r, g: (a * x0 + s * (n + r * torch.randn(n.shape, generator=g)),) * 2,
            ["unperturbed"],
        ),
        (
            "min_snr_weight",
            lambda snr, gamma, kind: (
                snr.clamp(max=gamma) / snr if kind == "epsilon" else min_snr_weight(snr, gamma, kind)
            ),
            ["NaN", "zero terminal SNR"],
        ),
        ("q_sample", lambda x, n, ac, t: x, ["values differ"]),
        ("alphas_cumprod", lambda b: 1 - b, ["values differ", "alphas_cumprod[t]"]),
    ],
)
def test_property_failures_explain_themselves(name, wrong, words):
    with pytest.raises(ExerciseFailure) as info:
        check(name, wrong)
    for word in words:
        assert word in str(info.value)


def test_crashing_or_mutating_function_is_reported_with_its_input():
    with pytest.raises(ExerciseFailure, match="(?s)raised ZeroDivisionError.*on input"):
        check("snr", lambda ac: 1 / 0)

    def in_place(ac):
        return ac.add_(1)

    with pytest.raises(ExerciseFailure, match="changed its input in place"):
        check("snr", in_place)


def test_compare_messages():
    a = torch.zeros(2, 3)
    assert compare(a, a, 1e-6, 0) is None
    assert "shape" in compare(torch.zeros(3), a, 1e-6, 0)
    assert "dtype" in compare(a.double(), a, 1e-6, 0)
    assert "index (1, 2)" in compare(torch.tensor([[0.0, 0, 0], [0, 0, 1]]), a, 1e-6, 0)
    assert compare(1.0, 1.0, 1e-6, 0) is None


def test_unknown_exercise_and_non_callable():
    with pytest.raises(ValueError, match="name='nope' is not an exercise"):
        check("nope", _todo)
    with pytest.raises(ValueError, match="needs your function"):
        check("snr", 3)


def test_checker_does_not_reveal_reference_source():
    ex = Exercise(
        "demo", "none", "think", reference=lambda x: x * 2, cases=lambda: [Case("x", (torch.ones(2),))]
    )
    from ldm_lib.exercises import checker

    checker.EXERCISES["demo"] = ex
    try:
        with pytest.raises(ExerciseFailure) as info:
            check("demo", lambda x: x)
        assert "lambda" not in str(info.value) and "* 2" not in str(info.value)
    finally:
        del checker.EXERCISES["demo"]


def test_generator_replaces_solutions_with_stubs():
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell(
                "Intro\n<!-- BEGIN SOLUTION -->\nsecret\n<!-- END SOLUTION -->\nend"
            ),
            nbformat.v4.new_code_cell(
                "def f(x):\n    # BEGIN SOLUTION\n    return 2 * x\n    # END SOLUTION\n\ncheck('f', f)"
            ),
        ]
    )
    out = make_exercises.exercise_from_solution(nb, "demo")
    assert out.cells[0].source == "Intro\nend"
    code = out.cells[1].source
    assert "return 2 * x" not in code
    assert '    raise NotImplementedError("your code here")' in code and "check('f', f)" in code
    bad = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("# BEGIN SOLUTION\nx = 1")])
    with pytest.raises(ValueError, match="never closed"):
        make_exercises.exercise_from_solution(bad, "bad")


def test_committed_exercises_are_what_the_script_generates():
    solutions = sorted(p.name for p in (ROOT / "solutions").glob("*.ipynb"))
    exercises = sorted(p.name for p in (ROOT / "exercises").glob("*.ipynb"))
    assert solutions == exercises, "every solution has its exercise and vice versa"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_exercises.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_solution_marks_learner_code_and_checks_it():
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        text = path.read_text()
        assert "# BEGIN SOLUTION" in text and "check(" in text, path.name
        assert "report(" in text, path.name
        notebook = path.stem
        assert notebook in {ex.notebook for ex in EXERCISES.values()}, (
            f"{path.name} has no registered exercise"
        )


def test_each_lecture_notebook_has_exercises():
    lectures = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(p.stem for p in (ROOT / "solutions").glob("*.ipynb")) == lectures
