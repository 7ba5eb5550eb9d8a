"""The samplers' shared interface: ``sample`` by name, one generator per row, the step callback,
and their errors. (Their arithmetic is checked against diffusers in test_samplers_parity.py.)"""

from __future__ import annotations

import pytest
import torch

from ldm_lib.noise import initial_noise, seeded_randn
from ldm_lib.samplers import MODEL_CALLS_PER_STEP, SAMPLERS, STOCHASTIC, WITH_ETA, sample
from ldm_lib.schedules import NoiseSchedule

SHAPE = (3, 2, 4, 4)
STEPS = 4


def toy_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Deterministic, nonlinear in x_t and dependent on t."""
    return torch.tanh(x_t) * (0.5 + t.float()[:, None, None, None] / 2000)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_name("scaled_linear", 1000)


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_generator_per_row_gives_each_row_its_own_stream() -> None:
    like = torch.zeros(SHAPE, dtype=torch.float16)
    noise = seeded_randn(SHAPE, like, gens([1, 2, 3]))
    assert noise.dtype == torch.float16 and noise.shape == SHAPE
    for row, seed in zip(noise, [1, 2, 3], strict=True):
        alone = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(row, alone.half(), rtol=0, atol=0)
    start = initial_noise(SHAPE, gens([2, 3, 1]))
    torch.testing.assert_close(start[2], noise[0].float(), rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        initial_noise(SHAPE, gens([1, 2]))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sample_by_name_equals_the_sampler_and_rows_do_not_depend_on_the_batch(name, schedule) -> None:
    kwargs = dict(prediction_type="v_prediction", spacing="trailing", progress=False)
    ours = sample(name, toy_model, SHAPE, schedule, STEPS, generator=gens([5, 6, 7]), **kwargs)
    direct = SAMPLERS[name](toy_model, SHAPE, schedule, STEPS, generator=gens([5, 6, 7]), **kwargs)
    torch.testing.assert_close(ours, direct, rtol=0, atol=0)
    # row 1 alone, from the same seed, is the same image: the batch does not leak into a row
    alone = sample(name, toy_model, (1, *SHAPE[1:]), schedule, STEPS, generator=gens([6]), **kwargs)
    torch.testing.assert_close(alone[0], ours[1], rtol=0, atol=1e-6)
    again = sample(name, toy_model, SHAPE, schedule, STEPS, generator=gens([5, 6, 7]), **kwargs)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_stochastic_samplers_differ_only_through_their_fresh_noise(name, schedule) -> None:
    """Same x_T, different generators for the later noise: only the stochastic samplers change."""
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    a = sample(name, toy_model, SHAPE, schedule, STEPS, x_T=x_T, generator=gens([1, 2, 3]), progress=False)
    b = sample(name, toy_model, SHAPE, schedule, STEPS, x_T=x_T, generator=gens([4, 5, 6]), progress=False)
    assert (name in STOCHASTIC) == (not torch.equal(a, b))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_sees_every_step_and_the_last_x0_is_the_sample(name, schedule) -> None:
    seen, calls = [], []

    def counting_model(x_t, t):
        calls.append(t[0].item())
        return toy_model(x_t, t)

    out = sample(
        name,
        counting_model,
        SHAPE,
        schedule,
        STEPS,
        prediction_type="v_prediction",
        generator=torch.Generator().manual_seed(0),
        progress=False,
        callback=lambda i, t, x0: seen.append((i, t, x0.clone())),
    )
    assert [i for i, _, _ in seen] == list(range(STEPS))
    assert [t for _, t, _ in seen] == sorted((t for _, t, _ in seen), reverse=True)
    assert all(x0.shape == SHAPE for _, _, x0 in seen)
    # Heun's last step has sigma_next = 0, so it calls the network once there
    assert len(calls) == STEPS * MODEL_CALLS_PER_STEP[name] - (1 if name == "heun" else 0)
    if name not in ("ddpm", "euler_ancestral"):  # deterministic last step: x0 estimate is the output
        torch.testing.assert_close(seen[-1][2], out, rtol=1e-5, atol=1e-5)


def test_eta_only_where_the_sampler_has_it(schedule) -> None:
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    run = dict(x_T=x_T, progress=False)
    for name in WITH_ETA:
        deterministic = sample(name, toy_model, SHAPE, schedule, STEPS, eta=0.0, **run)
        noisy = sample(name, toy_model, SHAPE, schedule, STEPS, eta=1.0, generator=gens([1, 2, 3]), **run)
        assert not torch.equal(deterministic, noisy)
    with pytest.raises(ValueError, match=r"eta=0.5 given for sampler 'heun'; eta applies only to"):
        sample("heun", toy_model, SHAPE, schedule, STEPS, eta=0.5)
    with pytest.raises(ValueError, match="sampler.*'plms'.*ddim"):
        sample("plms", toy_model, SHAPE, schedule, STEPS)
