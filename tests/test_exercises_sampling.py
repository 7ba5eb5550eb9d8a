"""Exercises of notebook 11 (euler_step, dpmpp_2m_step): the references are the library's steps, the
cases cover epsilon and v, the last step to sigma = 0, zero terminal SNR's sigma = 4096 and the
first (historyless) DPM++ step; right answers written another way pass, and each known mistake is
caught with its hint."""

import math
import subprocess
import sys

import pytest
import torch

import ldm_lib.exercises.sampling as ex11  # registers the exercises (also when __init__ does not)
from ldm_lib.exercises import EXERCISES, ExerciseFailure, check
from ldm_lib.parameterization import x0_from_prediction
from ldm_lib.samplers import ddim_step, dpmpp_2m_step, euler_step, karras_sigmas
from ldm_lib.samplers.euler import MIN_ALPHAS_CUMPROD
from ldm_lib.schedules import NoiseSchedule

NAMES = ("euler_step", "dpmpp_2m_step")


def _todo(*args):
    raise NotImplementedError


def test_registered_for_notebook_11_and_reference_passes(capsys):
    for name in NAMES:
        ex = EXERCISES[name]
        assert ex.notebook == "11_samplers"
        assert check(name, ex.reference) is True
        assert check(name, _todo) is False
    assert "still to do" in capsys.readouterr().out


def test_references_are_the_librarys_steps():
    for case in EXERCISES["euler_step"].cases():
        got = EXERCISES["euler_step"].reference(*case.args)
        for a, b in zip(got, euler_step(*case.args), strict=True):
            assert torch.equal(a, b)
    for case in EXERCISES["dpmpp_2m_step"].cases():
        got = EXERCISES["dpmpp_2m_step"].reference(*case.args)
        for a, b in zip(got, dpmpp_2m_step(*case.args), strict=True):
            assert torch.equal(a, b)


def _euler_by_hand(kind, out, x, sigma, sigma_next):
    """Karras et al. 2022: D from the VP conversion on x_t = x / sqrt(sigma^2 + 1), in float64."""
    s, s_next = float(sigma), float(sigma_next)
    alpha = 1 / math.sqrt(s**2 + 1)
    x64 = x.double()
    x0 = x0_from_prediction(kind, x64 * alpha, out.double(), alpha, s * alpha)
    return (x0 + s_next * (x64 - x0) / s).to(x.dtype), x0.to(x.dtype)


def test_euler_reference_matches_the_equations():
    for case in EXERCISES["euler_step"].cases():
        got = EXERCISES["euler_step"].reference(*case.args)
        expected = _euler_by_hand(*case.args)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_euler_cases_cover_the_edges():
    cases = EXERCISES["euler_step"].cases()
    kinds = {c.args[0] for c in cases}
    assert kinds == {"epsilon", "v_prediction"}
    for kind in kinds:  # each prediction type takes a last step, to sigma = 0
        assert any(float(c.args[4]) == 0 and c.args[0] == kind for c in cases)
    large = [c for c in cases if float(c.args[3]) == 4096.0]
    assert large and all(c.args[0] == "v_prediction" and c.args[2].dtype == torch.float64 for c in large)
    assert any(isinstance(c.args[3], torch.Tensor) for c in cases)  # sigmas as karras_sigmas gives them
    assert all(float(c.args[4]) < float(c.args[3]) for c in cases)


def test_dpmpp_cases_cover_the_edges():
    cases = EXERCISES["dpmpp_2m_step"].cases()
    assert {c.args[0] for c in cases} == {"epsilon", "v_prediction"}
    for kind in ("epsilon", "v_prediction"):
        mine = [c for c in cases if c.args[0] == kind]
        assert any(c.args[5] is None for c in mine)  # first order, no history
        assert any(c.args[5] is not None and c.args[4] > 0 for c in mine)  # second order
        assert any(c.args[4] == 0 for c in mine)  # the last step
    assert any(c.args[3] == 4096.0 for c in cases) and any(c.args[6] == 4096.0 for c in cases)
    for c in cases:  # the history is consistent: sigma_prev > sigma > sigma_next
        assert (c.args[5] is None) == (c.args[6] is None)
        assert c.args[4] < c.args[3] and (c.args[6] is None or c.args[6] > c.args[3])


def test_case_sigmas_are_the_schedules():
    """The named sigmas are Karras sigmas of SD's schedule at trailing timesteps (and of its
    zero-terminal-SNR version), so the cases are steps a real sampler takes."""
    sd = NoiseSchedule.from_name("scaled_linear")
    got = karras_sigmas(sd, torch.tensor([999, 899, 599, 299, 99]))[:-1]
    named = torch.tensor([ex11.SIGMA_999, ex11.SIGMA_899, ex11.SIGMA_599, ex11.SIGMA_299, ex11.SIGMA_99])
    torch.testing.assert_close(got, named, rtol=1e-4, atol=0)
    zt = NoiseSchedule.from_name("scaled_linear", zero_terminal_snr=True)
    assert karras_sigmas(zt, torch.tensor([999]))[0] == ex11.SIGMA_ZTSNR_999
    assert abs(float(karras_sigmas(zt, torch.tensor([899]))[0]) - ex11.SIGMA_ZTSNR_899) < 0.01
    assert ((1 - MIN_ALPHAS_CUMPROD) / MIN_ALPHAS_CUMPROD) ** 0.5 == pytest.approx(4096, abs=1e-3)


def test_dpmpp_first_order_is_ddim():
    """Without history the reference is DDIM (eta = 0) from t to t_next: the identity the notebook derives."""
    sd = NoiseSchedule.from_name("scaled_linear")
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sigmas = karras_sigmas(sd, torch.tensor([899, 599]))
    for kind in ("epsilon", "v_prediction"):
        x_next, _ = EXERCISES["dpmpp_2m_step"].reference(
            kind, out, x_t, float(sigmas[0]), float(sigmas[1]), None, None
        )
        torch.testing.assert_close(x_next, ddim_step(sd, kind, out, 899, 599, x_t)[0])


@pytest.mark.parametrize("name", NAMES)
def test_each_known_mistake_fails_with_its_hint(name):
    for mistake, meaning in EXERCISES[name].mistakes:
        with pytest.raises(ExerciseFailure) as info:
            check(name, mistake)
        message = str(info.value)
        assert "on input:" in message and "Hint:" in message
        assert f"Your result matches a known mistake: {meaning}" in message, (meaning, message)


def test_right_answers_written_another_way_pass():
    def euler_denoised_plus(kind, out, x, sigma, sigma_next):  # x_next = D + sigma_next * d
        alpha = 1 / (sigma**2 + 1) ** 0.5
        x_t = x * alpha
        x0 = x_t / alpha - sigma * out if kind == "epsilon" else alpha * x_t - sigma * alpha * out
        return x0 + sigma_next * (x - x0) / sigma, x0

    def euler_float64(kind, out, x, sigma, sigma_next):  # python floats, c_skip / c_out
        s, s_next = float(sigma), float(sigma_next)
        if kind == "epsilon":
            c_skip, c_out = 1.0, -s
        else:
            c_skip, c_out = 1 / (s**2 + 1), -s / math.sqrt(s**2 + 1)
        denoised = c_skip * x + c_out * out
        return x + (s_next - s) * (x - denoised) / s, denoised

    assert check("euler_step", euler_denoised_plus) is True
    assert check("euler_step", euler_float64) is True

    def dpmpp_ddim_form(kind, out, x_t, sigma, sigma_next, x0_prev, sigma_prev):
        """x_next = alpha_next * D + (sigma_t_next / sigma_t) * (x_t - alpha * D), in float64 scalars."""

        def vp(s):
            return 1 / math.sqrt(s * s + 1), s / math.sqrt(s * s + 1)

        a, s = vp(sigma)
        x0 = (x_t - s * out) / a if kind == "epsilon" else a * x_t - s * out
        if sigma_next == 0:
            return x0, x0
        a_n, s_n = vp(sigma_next)
        lam, lam_n = math.log(a / s), math.log(a_n / s_n)
        D = x0
        if x0_prev is not None:
            a_p, s_p = vp(sigma_prev)
            r = (lam - math.log(a_p / s_p)) / (lam_n - lam)
            D = (1 + 1 / (2 * r)) * x0 - x0_prev / (2 * r)
        return a_n * D + (s_n / s) * (x_t - a * D), x0

    assert check("dpmpp_2m_step", dpmpp_ddim_form) is True


def test_other_wrong_answers_are_explained():
    def only_x_next(kind, out, x, sigma, sigma_next):
        return euler_step(kind, out, x, sigma, sigma_next)[0]

    with pytest.raises(ExerciseFailure, match="expected a tuple of 2 values"):
        check("euler_step", only_x_next)

    def in_place(kind, out, x, sigma, sigma_next):
        x_next, denoised = euler_step(kind, out, x, sigma, sigma_next)
        x.copy_(x_next)
        return x_next, denoised

    with pytest.raises(ExerciseFailure, match="changed its input in place"):
        check("euler_step", in_place)

    def crashes_without_history(kind, out, x_t, sigma, sigma_next, x0_prev, sigma_prev):
        return x0_prev * 2, x0_prev  # TypeError on the first, historyless step

    with pytest.raises(ExerciseFailure, match="raised TypeError"):
        check("dpmpp_2m_step", crashes_without_history)


def test_exercise_module_is_cheap_to_import():
    """Every exercise notebook imports the registry: this module leaves the samplers (and the
    trainer, matplotlib, transformers) to the checks, which import them when a reference runs."""
    code = (
        "import sys, ldm_lib.exercises.sampling; "
        "heavy = ('ldm_lib.samplers', 'ldm_lib.training', 'matplotlib', 'transformers'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
