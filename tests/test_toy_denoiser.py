import pytest
import torch

from ldm_lib.noise import offset_noise, perturb_noise
from ldm_lib.parameterization import v_from_x0_eps
from ldm_lib.samplers import ddim_sample
from ldm_lib.schedules import NoiseSchedule
from ldm_lib.toys import denoiser
from ldm_lib.toys.denoiser import TinyDenoiser, timestep_embedding, toy_blobs, train_denoiser, training_pair

SCHED = NoiseSchedule.from_name("scaled_linear")


def small_data(n: int = 64) -> torch.Tensor:
    return toy_blobs(n, 8, brightness="uniform", seed=0)


def test_model_output_has_the_input_shape_and_accepts_scalar_t():
    model = TinyDenoiser((2, 4, 4), hidden=16, depth=1)
    x = torch.randn(5, 2, 4, 4)
    assert model(x, torch.arange(5)).shape == (5, 2, 4, 4)
    assert model(x, 7).shape == (5, 2, 4, 4)
    flat = TinyDenoiser((6,), hidden=8)
    assert flat(torch.randn(3, 6), torch.zeros(3, dtype=torch.long)).shape == (3, 6)


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 5]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    # the first frequency is 1: cos(5), sin(5)
    five = torch.tensor(5.0)
    torch.testing.assert_close(emb[1, [0, 4]], torch.stack([five.cos(), five.sin()]))


def test_train_returns_model_and_one_loss_per_step_and_samples_with_ddim():
    model, losses = train_denoiser(small_data(), SCHED, steps=5, batch_size=8, hidden=16, progress=False)
    assert len(losses) == 5 and all(isinstance(v, float) for v in losses)
    assert not model.training
    out = ddim_sample(
        model,
        (3, 1, 8, 8),
        SCHED,
        4,
        "epsilon",
        "trailing",
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()


def test_training_is_deterministic_given_the_seed_and_leaves_global_rng_alone():
    kwargs = dict(
        steps=5, batch_size=8, hidden=16, progress=False, offset_noise_strength=0.1, input_perturbation=0.1
    )
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    m1, l1 = train_denoiser(small_data(), SCHED, seed=3, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), before)
    m2, l2 = train_denoiser(small_data(), SCHED, seed=3, **kwargs)
    m3, l3 = train_denoiser(small_data(), SCHED, seed=4, **kwargs)
    assert l1 == l2 and l1 != l3
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_num_threads_is_restored():
    before = torch.get_num_threads()
    train_denoiser(small_data(), SCHED, steps=1, batch_size=4, hidden=8, progress=False, num_threads=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_decreases(prediction_type):
    _, losses = train_denoiser(
        small_data(256), SCHED, prediction_type, steps=150, batch_size=32, hidden=64, progress=False
    )
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first


def test_training_pair_perturbs_only_the_input_and_keeps_offset_in_the_target():
    x0 = small_data(16)
    t = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(1))
    x_t, target = training_pair(x0, SCHED, t, "v_prediction", 0.2, 0.3, torch.Generator().manual_seed(2))
    replay = torch.Generator().manual_seed(2)
    noise = offset_noise(x0, 0.2, replay)  # offset first ...
    noise_hat = perturb_noise(noise, 0.3, replay)  # ... then the perturbation
    alpha, sigma = SCHED.alpha(t).view(-1, 1, 1, 1), SCHED.sigma(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, alpha * x0 + sigma * noise_hat)
    # the target uses the unperturbed noise, offset included
    torch.testing.assert_close(target, v_from_x0_eps(x0, noise, alpha, sigma))
    assert not torch.allclose(target, v_from_x0_eps(x0, noise_hat, alpha, sigma))


def test_options_reach_the_noise_used_in_training(monkeypatch):
    calls = {"offset": [], "perturb": []}

    def spy_offset(like, strength, generator=None):
        calls["offset"].append(strength)
        return offset_noise(like, strength, generator)

    def spy_perturb(noise, strength, generator=None):
        calls["perturb"].append(strength)
        return perturb_noise(noise, strength, generator)

    monkeypatch.setattr(denoiser, "offset_noise", spy_offset)
    monkeypatch.setattr(denoiser, "perturb_noise", spy_perturb)
    train_denoiser(
        small_data(),
        SCHED,
        offset_noise_strength=0.15,
        input_perturbation=0.05,
        steps=3,
        batch_size=4,
        hidden=8,
        progress=False,
    )
    assert calls == {"offset": [0.15] * 3, "perturb": [0.05] * 3}


def test_offset_noise_statistics_in_the_epsilon_target():
    # With epsilon prediction the target is the noise: its channel means have variance s^2 + 1/HW.
    x0 = torch.zeros(4000, 1, 8, 8)
    t = torch.full((4000,), 500)
    for s in (0.0, 0.5):
        _, target = training_pair(x0, SCHED, t, "epsilon", s, 0.0, torch.Generator().manual_seed(0))
        var = target.mean(dim=(1, 2, 3)).var().item()
        assert abs(var / (s**2 + 1 / 64) - 1) < 0.1


def test_toy_blobs():
    x = toy_blobs(200, 16, "extremes", contrast=0.5, seed=1)
    assert x.shape == (200, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert (x.mean(dim=(1, 2, 3)).abs() > 0.9).all()
    assert torch.equal(x, toy_blobs(200, 16, "extremes", contrast=0.5, seed=1))
    u = toy_blobs(500, 16, "uniform", seed=1).mean(dim=(1, 2, 3))
    assert u.min() < -0.6 and u.max() > 0.6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data=torch.zeros(0, 1, 4, 4)), "empty"),
        (dict(data=torch.zeros(4, 4, dtype=torch.long)), "floating-point"),
        (dict(data=torch.zeros(4)), "floating-point"),
        (dict(data=torch.full((2, 1, 4, 4), float("nan"))), "NaN"),
        (dict(schedule="scaled_linear"), "NoiseSchedule"),
        (dict(prediction_type="eps"), "prediction_type"),
        (dict(offset_noise_strength=-0.1), "offset_noise_strength"),
        (dict(input_perturbation=-0.1), "input_perturbation"),
        (dict(steps=0), "steps"),
        (dict(batch_size=1.5), "batch_size"),
        (dict(lr=0.0), "lr"),
        (dict(seed=-1), "seed"),
        (dict(num_threads=0), "num_threads"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(data=torch.zeros(4, 1, 4, 4), schedule=SCHED, steps=1, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        train_denoiser(**args)


def test_bad_model_inputs_raise_value_error():
    model = TinyDenoiser((1, 4, 4), hidden=8)
    with pytest.raises(ValueError, match="expected"):
        model(torch.zeros(2, 1, 5, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one per sample"):
        model(torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="sample_shape"):
        TinyDenoiser((0, 4))
    with pytest.raises(ValueError, match="even"):
        timestep_embedding(torch.zeros(2), 7)
    with pytest.raises(ValueError, match="brightness"):
        toy_blobs(4, 8, brightness="dark")
