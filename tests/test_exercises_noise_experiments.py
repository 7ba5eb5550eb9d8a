"""Exercises of notebook 13_noise_experiments: the references agree with the library and with the
equations written out, the cases cover the edges (overshooting decoders, non-square images, wide
borders, zero terminal SNR, SD-size latents), right answers written another way pass, and each known
mistake gets its hint."""

import subprocess
import sys

import pytest
import torch

import ldm_lib.exercises.noise_experiments  # noqa: F401  (registers the exercises)
from ldm_lib.eval import border_brightness, brightness
from ldm_lib.exercises import EXERCISES, ExerciseFailure, check
from ldm_lib.schedules import NoiseSchedule

NAMES = ("background_luma", "mean_snr")


def _todo(*args):
    raise NotImplementedError


def test_registered_for_notebook_13_and_reference_passes(capsys):
    for name in NAMES:
        ex = EXERCISES[name]
        assert ex.notebook == "13_noise_experiments"
        assert check(name, ex.reference) is True
        assert check(name, _todo) is False
    assert "still to do" in capsys.readouterr().out


def test_background_luma_reference_is_the_library_and_the_equation():
    ex = EXERCISES["background_luma"]
    for case in ex.cases():
        images, border = case.args
        got = ex.reference(images, border)
        torch.testing.assert_close(got, border_brightness(images, border))
        # by hand, in float64, pixel by pixel over the ring
        rgb = ((images.double() + 1) / 2).clamp(0, 1)
        y = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
        h, w = y.shape[1:]
        ring = [(i, j) for i in range(h) for j in range(w)
                if i < border or j < border or i >= h - border or j >= w - border]  # fmt: skip
        expected = torch.stack([y[:, i, j] for i, j in ring], dim=1).mean(dim=1)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_background_luma_cases_cover_the_edges():
    cases = EXERCISES["background_luma"].cases()
    shapes = [tuple(c.args[0].shape) for c in cases]
    borders = {c.args[1] for c in cases}
    assert any(s[2] != s[3] for s in shapes)  # not square
    assert {1, 2, 3} <= borders
    assert any(c.args[0].abs().max() > 1 for c in cases)  # clamping matters
    flat = next(c for c in cases if "gray square" in c.description)
    torch.testing.assert_close(EXERCISES["background_luma"].reference(*flat.args), torch.tensor([0.0, 1.0]))
    # the ring differs from the whole image there: the "whole image" mistake is caught
    assert not torch.allclose(brightness(flat.args[0]), torch.tensor([0.0, 1.0]))


def test_mean_snr_reference_is_the_equation():
    ex = EXERCISES["mean_snr"]
    for case in ex.cases():
        a, n, v, s = case.args
        got = ex.reference(*case.args)
        assert got.shape == a.shape and got.dtype == a.dtype
        alpha2, sigma2 = a.double(), 1 - a.double()
        torch.testing.assert_close(got.double(), alpha2 * v / (sigma2 * (1 / n + s * s)), rtol=1e-5, atol=0)


def test_mean_snr_is_the_snr_of_a_measured_mean():
    """Monte Carlo: the spatial mean of x_t = alpha x0 + sigma (z + s delta), with x0 a per-sample
    constant of variance v, has the variance split the reference predicts."""
    g = torch.Generator().manual_seed(0)
    a = NoiseSchedule.from_name("scaled_linear").alphas_cumprod[[999, 700]]
    n_side, v, s, trials = 8, 0.5, 0.1, 40_000
    for ab in a.tolist():
        m0 = torch.randn(trials, generator=g) * v**0.5
        noise = torch.randn(trials, n_side, n_side, generator=g) + s * torch.randn(trials, 1, 1, generator=g)
        signal_part = ab**0.5 * m0
        noise_part = (1 - ab) ** 0.5 * noise.mean(dim=(1, 2))
        measured = signal_part.var() / noise_part.var()
        predicted = EXERCISES["mean_snr"].reference(torch.tensor(ab), n_side**2, v, s)
        assert abs(measured / predicted - 1) < 0.05


def test_mean_snr_cases_cover_the_edges():
    cases = EXERCISES["mean_snr"].cases()
    assert any(c.args[0].min() == 0 for c in cases)  # zero terminal SNR
    assert {c.args[3] == 0 for c in cases} == {True, False}  # with and without offset
    assert {64, 4096} <= {c.args[1] for c in cases}
    assert any(c.args[0].ndim == 2 for c in cases)
    zero = next(c for c in cases if c.args[0].min() == 0)
    assert EXERCISES["mean_snr"].reference(*zero.args)[0] == 0


@pytest.mark.parametrize("name", NAMES)
def test_each_known_mistake_fails_with_its_hint(name):
    for mistake, meaning in EXERCISES[name].mistakes:
        with pytest.raises(ExerciseFailure) as info:
            check(name, mistake)
        message = str(info.value)
        assert "on input:" in message and "Hint:" in message
        assert f"Your result matches a known mistake: {meaning}" in message, (meaning, message)


def test_right_answers_written_another_way_pass():
    def with_weights_tensor(images, border):
        rgb = (images * 0.5 + 0.5).clamp(min=0.0, max=1.0)
        y = torch.einsum("bchw,c->bhw", rgb, torch.tensor([0.299, 0.587, 0.114]))
        inner = y[:, border:-border, border:-border]
        total = y.sum(dim=(1, 2)) - inner.sum(dim=(1, 2))
        return total / (y[0].numel() - inner[0].numel())

    def from_alpha_sigma(alphas_cumprod, num_pixels, mean_var, offset):
        alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
        return (alpha**2 * mean_var) / (sigma**2 * (1.0 / num_pixels + offset * offset))

    assert check("background_luma", with_weights_tensor) is True
    assert check("mean_snr", from_alpha_sigma) is True


def test_other_wrong_answers_are_explained():
    def keeps_channels(images, border):  # (B, 3): a mean per channel
        rgb = ((images + 1) / 2).clamp(0, 1)
        mask = torch.ones(images.shape[2:], dtype=torch.bool)
        mask[border:-border, border:-border] = False
        return rgb[:, :, mask].mean(dim=2)

    with pytest.raises(ExerciseFailure, match=r"expected shape \(4,\), got \(4, 3\)"):
        check("background_luma", keeps_channels)

    def in_place(alphas_cumprod, num_pixels, mean_var, offset):
        return alphas_cumprod.mul_(mean_var) / ((1 - alphas_cumprod) * (1 / num_pixels + offset**2))

    with pytest.raises(ExerciseFailure, match="changed its input in place"):
        check("mean_snr", in_place)


def test_cases_are_deterministic():
    for name in NAMES:
        for a, b in zip(EXERCISES[name].cases(), EXERCISES[name].cases(), strict=True):
            for x, y in zip(a.args, b.args, strict=True):
                if isinstance(x, torch.Tensor):
                    assert torch.equal(x, y)


def test_exercise_module_is_cheap_to_import():
    """Every exercise notebook imports the registry: it must not pull in the trainer, matplotlib,
    transformers or the evaluation's classifier."""
    code = (
        "import sys, ldm_lib.exercises.noise_experiments; "
        "heavy = ('ldm_lib.training', 'ldm_lib.eval', 'matplotlib', 'transformers', 'yaml'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
