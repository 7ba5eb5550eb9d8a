import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm_lib import parameterization as P
from ldm_lib.schedules import NoiseSchedule

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)
scales = st.floats(0.05, 3.0)


def _draw(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(
        shape, generator=g, dtype=torch.float64
    )


@settings(max_examples=60, deadline=None)
@given(shape=shapes, alpha=scales, sigma=scales, seed=st.integers(0, 2**16))
def test_every_conversion_round_trips_for_any_alpha_sigma(shape, alpha, sigma, seed):
    x0, eps = _draw(shape, seed)
    x_t = alpha * x0 + sigma * eps
    v = P.v_from_x0_eps(x0, eps, alpha, sigma)
    close = torch.testing.assert_close
    close(P.x0_from_eps(x_t, eps, alpha, sigma), x0)
    close(P.eps_from_x0(x_t, x0, alpha, sigma), eps)
    close(P.x0_from_v(x_t, v, alpha, sigma), x0)
    close(P.eps_from_v(x_t, v, alpha, sigma), eps)
    close(P.v_from_eps(x_t, eps, alpha, sigma), v)
    close(P.v_from_x0(x_t, x0, alpha, sigma), v)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_eps_and_v_routes_agree_on_x0_with_per_sample_alpha_sigma(batch, seed):
    s = NoiseSchedule.from_name("scaled_linear")
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (batch,), generator=g)
    alpha, sigma = s.alpha(t).double().view(-1, 1, 1, 1), s.sigma(t).double().view(-1, 1, 1, 1)
    x0 = torch.randn(batch, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(batch, 3, 4, 4, generator=g, dtype=torch.float64)
    x_t = alpha * x0 + sigma * eps
    via_eps = P.x0_from_eps(x_t, eps, alpha, sigma)
    via_v = P.x0_from_v(x_t, P.v_from_x0_eps(x0, eps, alpha, sigma), alpha, sigma)
    torch.testing.assert_close(via_eps, via_v, rtol=1e-6, atol=1e-6)


def test_v_is_a_rotation_of_x0_and_eps():
    phi = torch.tensor(0.3, dtype=torch.float64)
    alpha, sigma = phi.cos(), phi.sin()
    x0, eps = _draw((10,), 0)
    rot = torch.stack([torch.stack([alpha, sigma]), torch.stack([-sigma, alpha])])
    x_t, v = rot @ torch.stack([x0, eps])
    torch.testing.assert_close(x_t, alpha * x0 + sigma * eps)
    torch.testing.assert_close(v, P.v_from_x0_eps(x0, eps, alpha, sigma))


def test_zero_terminal_snr_v_still_gives_x0_but_eps_cannot():
    x0, eps = _draw((8,), 1)
    x_t = 0.0 * x0 + 1.0 * eps  # alpha = 0: pure noise
    v = P.v_from_x0_eps(x0, eps, 0.0, 1.0)
    torch.testing.assert_close(P.x0_from_v(x_t, v, 0.0, 1.0), x0)
    assert not torch.isfinite(P.x0_from_eps(x_t, eps, 0.0, 1.0)).all()


@pytest.mark.parametrize("kind", P.PREDICTION_TYPES)
def test_prediction_helpers(kind):
    x0, eps = _draw((2, 3), 2)
    alpha, sigma = 0.6, 0.8
    x_t = alpha * x0 + sigma * eps
    target = P.training_target(kind, x0, eps, alpha, sigma)
    torch.testing.assert_close(P.x0_from_prediction(kind, x_t, target, alpha, sigma), x0)
    torch.testing.assert_close(P.eps_from_prediction(kind, x_t, target, alpha, sigma), eps)


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction_type='x_start'.*v_prediction"):
        P.training_target("x_start", torch.zeros(1), torch.zeros(1), 1.0, 0.0)
