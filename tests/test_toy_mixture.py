"""The 2-D Gaussian mixture toy: exact densities, scores and epsilon of the diffused data."""

import math

import pytest
import torch

from ldm_lib.parameterization import x0_from_eps
from ldm_lib.samplers import ddim_sample
from ldm_lib.schedules import NoiseSchedule
from ldm_lib.toys.mixture import NULL_LABEL, GaussianMixture2D, default_mixture


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: on a busy machine, intra-op threads cost far more than they save.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _points(n=64, seed=0, scale=2.0):
    return scale * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _autograd_score(m, x, alpha, sigma, label):
    x = x.clone().requires_grad_(True)
    m.log_prob(x, alpha, sigma, label).sum().backward()
    return x.grad


@pytest.mark.parametrize("label", [None, 0, 2, "per-point"])
@pytest.mark.parametrize(
    ("alpha", "sigma"), [(1.0, 0.0), (0.9, 0.3), (0.2, 0.98), (0.0, 1.0), ("per-point", None)]
)
def test_score_is_the_gradient_of_log_prob(label, alpha, sigma):
    m = default_mixture()
    x = _points()
    if label == "per-point":  # mixed classes, with dropped captions (-1) among them
        label = torch.arange(64) % 4 - 1
    if alpha == "per-point":  # one (alpha, sigma) per point, as a sampler's batch of timesteps
        s = NoiseSchedule.from_name("scaled_linear")
        t = torch.arange(64) * 15
        alpha, sigma = s.alpha(t), s.sigma(t)
    torch.testing.assert_close(m.score(x, alpha, sigma, label), _autograd_score(m, x, alpha, sigma, label))


def test_eps_is_minus_sigma_times_score_and_denoise_is_tweedie():
    m = default_mixture()
    x = _points()
    for alpha, sigma in [(0.95, 0.3), (0.5, 0.8), (0.07, 0.99)]:
        for label in (None, 1, 2):
            eps = m.eps(x, alpha, sigma, label)
            torch.testing.assert_close(eps, -sigma * m.score(x, alpha, sigma, label))
            # Tweedie: E[x0 | x_t] = (x_t - sigma E[eps | x_t]) / alpha
            torch.testing.assert_close(m.denoise(x, alpha, sigma, label), x0_from_eps(x, eps, alpha, sigma))


def test_limits_of_eps_and_denoise():
    m = default_mixture()
    x = _points()
    # Pure noise (alpha = 0, sigma = 1): x_t is the noise itself, and E[x0 | x_t] is the data mean.
    torch.testing.assert_close(m.eps(x, 0.0, 1.0), x)
    torch.testing.assert_close(m.denoise(x, 0.0, 1.0), m.mean().expand(64, 2))
    torch.testing.assert_close(m.denoise(x, 0.0, 1.0, 2), m.mean(2).expand(64, 2))
    # No noise (alpha = 1, sigma -> 0): eps / sigma -> -(score of the data), x0_hat -> x.
    small = 1e-4
    torch.testing.assert_close(m.eps(x, 1.0, small) / small, -m.score(x, 1.0, 0.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.denoise(x, 1.0, small), x, rtol=0, atol=1e-6)
    assert torch.equal(m.eps(x, 1.0, 0.0), torch.zeros_like(x))


def test_class_weights_posterior_and_bayes():
    m = default_mixture()
    torch.testing.assert_close(m.class_weights(), torch.tensor([0.35, 0.35, 0.30], dtype=torch.float64))
    w2 = m.component_weights(2)
    torch.testing.assert_close(w2, torch.tensor([0, 0, 0.5, 0.5], dtype=torch.float64))
    assert m.component_weights(None).sum().item() == pytest.approx(1.0)
    x = _points()
    alpha, sigma = 0.6, 0.8
    post = m.class_posterior(x, alpha, sigma)
    torch.testing.assert_close(post.sum(1), torch.ones(64, dtype=torch.float64))
    # Bayes: p(c | x) = p(x | c) p(c) / p(x)
    for c in range(3):
        bayes = (
            m.log_prob(x, alpha, sigma, c) + m.class_weights()[c].log() - m.log_prob(x, alpha, sigma)
        ).exp()
        torch.testing.assert_close(post[:, c], bayes)
    # The unconditional eps is the posterior average of the conditional ones.
    mixed = sum(post[:, c : c + 1] * m.eps(x, alpha, sigma, c) for c in range(3))
    torch.testing.assert_close(m.eps(x, alpha, sigma), mixed)
    # NULL_LABEL is the unconditional density, per point as well as for the whole batch.
    torch.testing.assert_close(m.eps(x, alpha, sigma, NULL_LABEL), m.eps(x, alpha, sigma))
    torch.testing.assert_close(m.eps(x, alpha, sigma, torch.full((64,), NULL_LABEL)), m.eps(x, alpha, sigma))


def test_log_prob_is_normalised():
    m = default_mixture()
    xs = torch.linspace(-6, 6, 401, dtype=torch.float64)
    grid = torch.cartesian_prod(xs, xs)
    cell = (xs[1] - xs[0]) ** 2
    for label in (None, 0, 2):
        for alpha, sigma in [(1.0, 0.0), (0.5, 0.8)]:
            total = m.log_prob(grid, alpha, sigma, label).exp().sum() * cell
            assert total.item() == pytest.approx(1.0, abs=1e-4)
    # One isotropic Gaussian: the closed form.
    g = GaussianMixture2D(
        torch.tensor([[1.0, -2.0]]), torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([0])
    )
    x = _points(5)
    expected = -((x - torch.tensor([1.0, -2.0])) ** 2).sum(1) / (2 * 0.25) - math.log(2 * math.pi * 0.25)
    torch.testing.assert_close(g.log_prob(x), expected.double())


def test_sampling_and_diffused_moments():
    m = default_mixture()
    g = torch.Generator().manual_seed(0)
    x0, classes = m.sample(200_000, g)
    assert x0.dtype == torch.float64 and classes.dtype == torch.int64
    torch.testing.assert_close(x0.mean(0), m.mean(), atol=0.01, rtol=0)
    torch.testing.assert_close(x0.T.cov(), m.covariance(), atol=0.02, rtol=0)
    counts = torch.bincount(classes, minlength=3).double() / 200_000
    torch.testing.assert_close(counts, m.class_weights(), atol=0.005, rtol=0)
    x2, c2 = m.sample(50_000, g, label=2)
    assert (c2 == 2).all()
    torch.testing.assert_close(x2.mean(0), m.mean(2), atol=0.01, rtol=0)
    torch.testing.assert_close(x2.T.cov(), m.covariance(2), atol=0.02, rtol=0)
    # x_t = alpha x0 + sigma eps follows the diffused mixture.
    alpha, sigma = 0.6, 0.8
    x_t = alpha * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    d = m.diffused(alpha, sigma)
    torch.testing.assert_close(x_t.T.cov(), d.covariance(), atol=0.02, rtol=0)
    torch.testing.assert_close(d.log_prob(x0[:100]), m.log_prob(x0[:100], alpha, sigma))
    # Seeded: the same generator state gives the same points.
    a, _ = m.sample(10, torch.Generator().manual_seed(3))
    b, _ = m.sample(10, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_float32_in_float32_out():
    m = default_mixture()
    x = _points().float()
    for fn in (m.score, m.eps, m.denoise, m.responsibilities):
        assert fn(x, 0.6, 0.8).dtype == torch.float32
    assert m.log_prob(x).dtype == torch.float32
    torch.testing.assert_close(m.eps(x, 0.6, 0.8), m.eps(x.double(), 0.6, 0.8).float())


@pytest.mark.parametrize("label", [None, 0, 2])
def test_ddim_with_the_exact_eps_reproduces_the_mixture(label):
    # A perfect epsilon model: what is left is DDIM's discretisation error and the small mismatch
    # between N(0, I) and p_T (the SD schedule keeps alpha_T = 0.068).
    m = default_mixture()
    s = NoiseSchedule.from_name("scaled_linear")

    def model(x, t):
        return m.eps(x, s.alpha(t), s.sigma(t), label)

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(3000, 2, generator=g, dtype=torch.float64)
    out = ddim_sample(model, (3000, 2), s, 100, "epsilon", "linspace", x_T=x_T, progress=False)
    torch.testing.assert_close(out.mean(0), m.mean(label), atol=0.1, rtol=0)
    cov, ref = out.T.cov(), m.covariance(label)
    torch.testing.assert_close(cov, ref, atol=0.1 * ref.diagonal().max().item(), rtol=0)
    # Nearly every sample ends nearest a component of the right class.
    nearest = torch.cdist(out, m.means).argmin(1)
    if label is not None:
        assert (m.labels[nearest] == label).double().mean() > 0.98
    else:
        counts = torch.bincount(m.labels[nearest], minlength=3).double() / 3000
        torch.testing.assert_close(counts, m.class_weights(), atol=0.03, rtol=0)


def test_bad_inputs_raise_value_error():
    means, stds = torch.zeros(2, 2), torch.ones(2)
    weights, labels = torch.ones(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="means"):
        GaussianMixture2D(torch.zeros(2, 3), stds, weights, labels)
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture2D(means, torch.ones(3), weights, labels)
    with pytest.raises(ValueError, match="std"):
        GaussianMixture2D(means, torch.tensor([1.0, 0.0]), weights, labels)
    with pytest.raises(ValueError, match="weight"):
        GaussianMixture2D(means, stds, torch.tensor([1.0, -1.0]), labels)
    with pytest.raises(ValueError, match="integers"):
        GaussianMixture2D(means, stds, weights, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="no component"):
        GaussianMixture2D(means, stds, weights, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        GaussianMixture2D(torch.tensor([[0.0, math.nan], [0, 0]]), stds, weights, labels)
    m = default_mixture()
    x = _points(4)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        m.score(torch.zeros(4, 3), 0.5, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        m.eps(x, -0.5, 0.5)
    with pytest.raises(ValueError, match="sigma"):
        m.eps(x, 0.5, torch.ones(3))
    with pytest.raises(ValueError, match="both 0"):
        m.log_prob(x, 0.0, 0.0)
    with pytest.raises(ValueError, match="label"):
        m.eps(x, 0.5, 0.5, 3)
    with pytest.raises(ValueError, match="label"):
        m.eps(x, 0.5, 0.5, torch.tensor([0, 1, 5, 0]))
    with pytest.raises(ValueError, match="label"):
        m.eps(x, 0.5, 0.5, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="n="):
        m.sample(0)
    with pytest.raises(ValueError, match="alpha"):
        m.diffused(-1.0, 0.5)
