import numpy as np
import pytest
import torch

from ldm_lib.schedules import (
    NoiseSchedule,
    inference_timesteps,
    make_betas,
    rescale_zero_terminal_snr,
)


def test_scaled_linear_is_stable_diffusions_published_schedule():
    betas = make_betas("scaled_linear")
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert betas.dtype == torch.float32 and betas.shape == (1000,)
    torch.testing.assert_close(betas, expected.float(), rtol=0, atol=1e-9)
    ac = NoiseSchedule(betas).alphas_cumprod
    assert abs(ac[-1].item() - 0.0047) < 1e-4  # the signal is never fully destroyed
    assert abs(ac[0].item() - (1 - 0.00085)) < 1e-7


def test_linear_and_cosine():
    lin = make_betas("linear")
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    cos = NoiseSchedule(make_betas("cosine"))
    t = np.arange(1, 1001) / 1000
    abar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    # Unclipped steps follow the closed form exactly; clipping at 0.999 only touches the last ones.
    torch.testing.assert_close(
        cos.alphas_cumprod[:990].double(), torch.from_numpy(abar[:990]), rtol=1e-5, atol=1e-7
    )
    assert cos.betas.max().item() == pytest.approx(0.999)


def test_alphas_cumprod_alpha_sigma_snr():
    s = NoiseSchedule.from_name("scaled_linear")
    t = torch.tensor([0, 10, 500, 999])
    ac = torch.cumprod(1 - s.betas.double(), 0).float()[t]
    torch.testing.assert_close(s.alpha(t), ac.sqrt())
    torch.testing.assert_close(s.sigma(t), (1 - ac).sqrt())
    torch.testing.assert_close(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones(4))
    torch.testing.assert_close(s.snr(t), ac / (1 - ac))
    assert torch.all(s.snr(torch.arange(1000)).diff() < 0)  # SNR decreases monotonically


def test_add_noise_is_closed_form_and_broadcasts():
    s = NoiseSchedule.from_name("linear")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 300, 999])
    x_t = s.add_noise(x0, eps, t)
    for i in range(3):
        torch.testing.assert_close(x_t[i], s.alpha(t[i]) * x0[i] + s.sigma(t[i]) * eps[i])
    torch.testing.assert_close(s.add_noise(x0, eps, 300), s.add_noise(x0, eps, torch.full((3,), 300)))
    assert s.add_noise(x0.double(), eps.double(), t).dtype == torch.float64


def test_closed_form_matches_markov_chain():
    s = NoiseSchedule(make_betas("linear", 50, 1e-3, 0.2))
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((20000,), 0.7)
    x = x0.clone()
    for beta in s.betas:
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g)
    assert abs(x.mean().item() - s.alpha(49).item() * 0.7) < 0.02
    assert abs(x.std().item() - s.sigma(49).item()) < 0.02


def test_zero_terminal_snr():
    betas = make_betas("scaled_linear")
    rescaled = rescale_zero_terminal_snr(betas)
    s, z = NoiseSchedule(betas), NoiseSchedule(rescaled)
    assert z.alphas_cumprod[-1].item() == 0.0
    assert z.snr(999).item() == 0.0
    assert rescaled[-1].item() == 1.0
    torch.testing.assert_close(z.alphas_cumprod[0], s.alphas_cumprod[0], rtol=0, atol=1e-7)
    assert torch.all(z.alphas_cumprod[:-1] > 0)
    assert torch.all(z.alphas_cumprod.diff() < 0)


@pytest.mark.parametrize(
    ("spacing", "offset", "expected"),
    [
        ("leading", 0, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        ("leading", 1, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
        ("trailing", 0, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        ("linspace", 0, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    ],
)
def test_inference_timesteps_lin_et_al_table_2(spacing, offset, expected):
    steps = inference_timesteps(10, 1000, spacing, offset)
    assert steps.dtype == torch.long
    assert steps.tolist() == expected


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 50, 999, 1000])
def test_inference_timesteps_are_descending_and_in_range(spacing, n):
    steps = inference_timesteps(n, 1000, spacing)
    assert len(steps) == n
    assert torch.all(steps.diff() < 0) and steps.min() >= 0 and steps.max() <= 999


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: make_betas("quadratic"), ["schedule", "quadratic", "scaled_linear"]),
        (lambda: make_betas("linear", beta_start=0.0), ["beta_start", "0.0", "(0.0, 1.0)"]),
        (lambda: make_betas("linear", beta_end=1.5), ["beta_end", "1.5"]),
        (lambda: make_betas("cosine", beta_start=0.1), ["cosine", "beta_start"]),
        (lambda: make_betas("linear", 1), ["num_train_timesteps", "1"]),
        (lambda: NoiseSchedule(torch.tensor([0.1, 0.0, 0.2])), ["betas[1]", "(0, 1)"]),
        (lambda: NoiseSchedule(torch.tensor([0.1, 1.0, 0.2])), ["betas[1]"]),
        (lambda: NoiseSchedule(torch.tensor([0.1, 0.2, 1.2])), ["betas[2]", "1.2"]),
        (lambda: inference_timesteps(0), ["num_inference_steps", "0"]),
        (lambda: inference_timesteps(10, spacing="uniform"), ["spacing", "uniform", "trailing"]),
        (lambda: inference_timesteps(10, steps_offset=200), ["steps_offset", "200"]),
        (lambda: inference_timesteps(10, spacing="trailing", steps_offset=1), ["steps_offset", "leading"]),
        (lambda: NoiseSchedule.from_name().alpha(1000), ["t=", "999"]),
        (lambda: NoiseSchedule.from_name().alpha(torch.tensor([0.5])), ["integer"]),
    ],
)
def test_bad_input_names_option_value_and_allowed(call, words):
    with pytest.raises(ValueError) as info:
        call()
    for word in words:
        assert word in str(info.value)
