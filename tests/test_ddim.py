import pytest
import torch

from ldm_lib.parameterization import training_target
from ldm_lib.samplers import ddim_sample, ddim_step
from ldm_lib.schedules import NoiseSchedule


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_with_perfect_prediction_lands_on_the_forward_process(kind):
    # If the model predicts exactly, a deterministic step from q(x_t | x0) lands on
    # alpha_s x0 + sigma_s eps: the same noise, less of it.
    s = NoiseSchedule.from_name("scaled_linear")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t, t_prev = 700, 400
    x_t = s.add_noise(x0, eps, t)
    pred = training_target(kind, x0, eps, s.alpha(t), s.sigma(t))
    x_prev, x0_pred = ddim_step(s, kind, pred, t, t_prev, x_t)
    torch.testing.assert_close(x0_pred, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_prev, s.add_noise(x0, eps, t_prev), rtol=1e-4, atol=1e-4)


def test_ddim_sample_recovers_a_point_mass_with_exact_eps():
    # Data = a single point c. The exact eps at (x_t, t) is (x_t - alpha c) / sigma.
    s = NoiseSchedule.from_name("scaled_linear", zero_terminal_snr=True)
    c = torch.tensor([0.5, -1.0])

    def model(x, t):
        a, sig = s.alpha(t).view(-1, 1), s.sigma(t).view(-1, 1)
        return a * (x - a * c) / sig - sig * c  # v = alpha eps - sigma x0

    out = ddim_sample(
        model,
        (16, 2),
        s,
        10,
        "v_prediction",
        "trailing",
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    torch.testing.assert_close(out, c.expand(16, 2), rtol=1e-4, atol=1e-4)


def test_ddim_is_deterministic_at_eta_zero_and_seeded_at_eta_one():
    s = NoiseSchedule.from_name("linear")

    def model(x, t):
        return 0.1 * x

    def run(eta, seed):
        return ddim_sample(
            model, (3, 2), s, 5, eta=eta, generator=torch.Generator().manual_seed(seed), progress=False
        )

    torch.testing.assert_close(run(0.0, 1), run(0.0, 1))
    torch.testing.assert_close(run(1.0, 1), run(1.0, 1))
    assert not torch.allclose(run(1.0, 1), run(1.0, 2))
