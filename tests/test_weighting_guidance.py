import warnings

import pytest
import torch

from ldm_lib.guidance import classifier_free_guidance, rescale_guidance
from ldm_lib.schedules import NoiseSchedule
from ldm_lib.weighting import min_snr_weight

SNR = NoiseSchedule.from_name("scaled_linear").snr(torch.arange(1000))


@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_closed_forms(gamma):
    clipped = torch.minimum(SNR, torch.tensor(gamma))
    torch.testing.assert_close(min_snr_weight(SNR, gamma, "sample"), clipped)
    torch.testing.assert_close(min_snr_weight(SNR, gamma, "epsilon"), clipped / SNR)
    torch.testing.assert_close(min_snr_weight(SNR, gamma, "v_prediction"), clipped / (SNR + 1))
    # In x0-space every parameterization carries the same weight, min(SNR, gamma).
    torch.testing.assert_close(min_snr_weight(SNR, gamma, "epsilon") * SNR, clipped)
    torch.testing.assert_close(min_snr_weight(SNR, gamma, "v_prediction") * (SNR + 1), clipped)


def test_min_snr_v_is_not_the_widely_copied_form():
    wrong = torch.minimum(SNR + 1, torch.tensor(5.0)) / (SNR + 1)
    assert (min_snr_weight(SNR, 5.0, "v_prediction") - wrong).abs().max() > 0.1


def test_zero_snr_guard_never_nan_and_explains():
    snr = NoiseSchedule.from_name("scaled_linear", zero_terminal_snr=True).snr(torch.arange(1000))
    assert snr[-1] == 0
    with pytest.warns(UserWarning, match="0/0.*v_prediction"):
        w = min_snr_weight(snr, 5.0, "epsilon")
    assert torch.isfinite(w).all() and w[-1] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # v and x0 have no 0/0: no warning
        assert min_snr_weight(snr, 5.0, "v_prediction")[-1] == 0
        assert min_snr_weight(snr, 5.0, "sample")[-1] == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((SNR, 0.0, "epsilon"), ["gamma=0.0", "(0.0, inf]"]),
        ((SNR, -1.0, "epsilon"), ["gamma=-1.0"]),
        ((SNR, 5.0, "x0"), ["prediction_type='x0'", "'sample'"]),
        ((-SNR, 5.0, "epsilon"), ["snr", ">= 0"]),
    ],
)
def test_min_snr_bad_input(args, words):
    with pytest.raises(ValueError) as info:
        min_snr_weight(*args)
    for word in words:
        assert word in str(info.value)


def test_cfg_interpolates_and_extrapolates():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    torch.testing.assert_close(classifier_free_guidance(u, c, 0.0), u)
    torch.testing.assert_close(classifier_free_guidance(u, c, 1.0), c)
    torch.testing.assert_close(classifier_free_guidance(u, c, 7.5), u + 7.5 * (c - u))
    per_sample = classifier_free_guidance(u, c, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(per_sample[1], u[1] + 3 * (c[1] - u[1]))


def test_rescale_guidance_matches_cond_std_per_sample():
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(3, 4, 8, 8, generator=g) * torch.tensor([0.5, 1.0, 2.0]).view(-1, 1, 1, 1)
    guided = classifier_free_guidance(torch.randn(3, 4, 8, 8, generator=g), cond, 7.5)
    full = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.0), guided)
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.7), 0.7 * full + 0.3 * guided)


def test_guidance_bad_input():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"phi=1.5 is out of range; allowed: \[0.0, 1.0\]"):
        rescale_guidance(x, x, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        classifier_free_guidance(x, torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match="scale=nan"):
        classifier_free_guidance(x, x, float("nan"))


def test_rescale_guidance_leaves_a_constant_prediction_alone():
    guided, cond = torch.full((2, 3, 4, 4), 0.5), torch.randn(2, 3, 4, 4)
    out = rescale_guidance(guided, cond, 0.7)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, guided)
