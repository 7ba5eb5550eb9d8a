"""Exercises of notebook 10_training_loop: the references are the library's, the cases cover the
edges (t near 0 and T, both prediction types, min-SNR on and off, perturbation on and off, zero
terminal SNR), right answers written another way pass, and known mistakes get their hint."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import ldm_lib.exercises.training as ex10  # registers the exercises (also when __init__ does not)
from ldm_lib.exercises import EXERCISES, ExerciseFailure, check
from ldm_lib.parameterization import v_from_x0_eps
from ldm_lib.schedules import NoiseSchedule
from ldm_lib.training import EMA, diffusion_loss, ema_decay
from ldm_lib.weighting import min_snr_weight

NAMES = ("training_loss", "ema_update")


def _todo(*args):
    raise NotImplementedError


def _by_hand(model, schedule, x0, t, noise, xi, rho, kind, gamma):
    """The loss written from the equations, in float64, without the library's loss."""
    ac = schedule.alphas_cumprod.double()[t]
    alpha, sigma = ac.sqrt()[:, None, None, None], (1 - ac).sqrt()[:, None, None, None]
    x0, noise, xi = x0.double(), noise.double(), xi.double()
    x_t = alpha * x0 + sigma * (noise + rho * xi)
    target = noise if kind == "epsilon" else alpha * noise - sigma * x0
    mse = (model(x_t.float(), t).double() - target).pow(2).mean(dim=(1, 2, 3))
    if gamma is None:
        return mse.float()
    snr = ac / (1 - ac)
    if kind == "epsilon":
        weight = torch.where(snr == 0, 1.0, snr.clamp(max=gamma) / snr)
    else:
        weight = snr.clamp(max=gamma) / (snr + 1)
    return (mse * weight).float()


def test_registered_for_notebook_10_and_reference_passes(capsys):
    for name in NAMES:
        ex = EXERCISES[name]
        assert ex.notebook == "10_training_loop"
        assert check(name, ex.reference) is True
        assert check(name, _todo) is False
    assert "still to do" in capsys.readouterr().out


def test_training_loss_reference_is_the_librarys_and_the_equations():
    ex = EXERCISES["training_loss"]
    for case in ex.cases():
        model, schedule, x0, t, noise, xi, rho, kind, gamma = case.args
        got = ex.reference(*case.args)
        assert got.shape == (x0.shape[0],) and got.dtype == torch.float32
        library = diffusion_loss(
            model, schedule, x0, t, noise, kind, noisy_input_noise=noise + rho * xi, min_snr_gamma=gamma
        )
        torch.testing.assert_close(got, library)
        torch.testing.assert_close(got, _by_hand(*case.args), rtol=1e-4, atol=1e-5)


def test_training_loss_cases_cover_the_edges():
    cases = EXERCISES["training_loss"].cases()
    kinds = {c.args[7] for c in cases}
    gammas = {c.args[8] for c in cases}
    rhos = {c.args[6] for c in cases}
    assert kinds == {"epsilon", "v_prediction"}
    assert None in gammas and 5.0 in gammas
    assert 0.0 in rhos and max(rhos) > 0
    for kind in kinds:  # each prediction type at both ends of the schedule, with and without min-SNR
        ts = [set(c.args[3].tolist()) for c in cases if c.args[7] == kind]
        assert any({0, 999} <= t for t in ts), kind
        assert {c.args[8] for c in cases if c.args[7] == kind} >= {None, 5.0}
        assert {c.args[6] > 0 for c in cases if c.args[7] == kind} == {True, False}
    zero_terminal = [c for c in cases if float(c.args[1].snr(999)) == 0.0]
    assert zero_terminal and all(c.args[7] == "v_prediction" and 999 in c.args[3] for c in zero_terminal)
    assert any("offset noise" in c.description for c in cases)  # `noise` includes the offset there
    # every case's draws are distinct (the perturbation is not the noise itself)
    assert all(not torch.equal(c.args[4], c.args[5]) for c in cases)


def test_training_loss_cases_are_deterministic():
    a, b = EXERCISES["training_loss"].cases(), EXERCISES["training_loss"].cases()
    for ca, cb in zip(a, b, strict=True):
        for x, y in zip(ca.args, cb.args, strict=True):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y)


@pytest.mark.parametrize("name", NAMES)
def test_each_known_mistake_fails_with_its_hint(name):
    for mistake, meaning in EXERCISES[name].mistakes:
        with pytest.raises(ExerciseFailure) as info:
            check(name, mistake)
        message = str(info.value)
        assert "on input:" in message and "Hint:" in message
        assert f"Your result matches a known mistake: {meaning}" in message, (meaning, message)


def test_right_answers_written_another_way_pass():
    def with_library_pieces(model, schedule, x0, t, noise, xi, rho, kind, gamma):
        x_t = schedule.add_noise(x0, noise + rho * xi, t)
        alpha = schedule.alpha(t).reshape(-1, 1, 1, 1)
        sigma = schedule.sigma(t).reshape(-1, 1, 1, 1)
        target = noise if kind == "epsilon" else v_from_x0_eps(x0, noise, alpha, sigma)
        loss = torch.nn.functional.mse_loss(model(x_t, t), target, reduction="none").mean(dim=[1, 2, 3])
        if gamma is not None:
            loss = loss * min_snr_weight(schedule.snr(t), gamma, kind)
        return loss

    def from_alphas_cumprod(model, schedule, x0, t, noise, xi, rho, kind, gamma):
        ac = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
        x_t = alpha * x0 + sigma * noise + sigma * rho * xi
        target = noise if kind == "epsilon" else alpha * noise - sigma * x0
        loss = ((model(x_t, t) - target) ** 2).flatten(1).mean(1)
        if gamma is None:
            return loss
        snr = (ac / (1 - ac)).flatten()
        weight = torch.minimum(snr, torch.tensor(gamma)) / (snr + 1 if kind == "v_prediction" else snr)
        return loss * weight

    assert check("training_loss", with_library_pieces) is True
    assert check("training_loss", from_alphas_cumprod) is True

    def ema_lerp(average, weights, step, decay):
        return average.lerp(weights, 1 - min(decay, (1 + step) / (10 + step)))

    assert check("ema_update", ema_lerp) is True


def test_other_wrong_answers_are_explained():
    def batch_mean(model, schedule, x0, t, noise, xi, rho, kind, gamma):  # a scalar, not (B,)
        return (
            EXERCISES["training_loss"].reference(model, schedule, x0, t, noise, xi, rho, kind, gamma).mean()
        )

    with pytest.raises(ExerciseFailure, match=r"expected shape \(6,\), got \(\)"):
        check("training_loss", batch_mean)

    def unshaped_alpha(model, schedule, x0, t, noise, xi, rho, kind, gamma):  # (B,) * (B, C, H, W)
        return ((model(schedule.alpha(t) * x0, t) - noise) ** 2).mean(dim=(1, 2, 3))

    with pytest.raises(ExerciseFailure, match="raised RuntimeError"):
        check("training_loss", unshaped_alpha)

    def in_place(average, weights, step, decay):
        return average.mul_(ema_decay(step, decay)).add_((1 - ema_decay(step, decay)) * weights)

    with pytest.raises(ExerciseFailure, match="changed its input in place"):
        check("ema_update", in_place)


def test_ema_update_reference_is_the_ema_class():
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.99)
    average = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ema.update(model)
        for name, p in model.named_parameters():
            average[name] = EXERCISES["ema_update"].reference(average[name], p.detach(), step, 0.99)
    for name, value in ema.state_dict().items():
        torch.testing.assert_close(average[name], value)


def test_toy_denoiser_depends_on_x_t_and_t():
    model = ex10.ToyDenoiser()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 999])
    assert not torch.allclose(model(x, t), model(1.1 * x, t))
    assert not torch.allclose(model(x, t), model(x, torch.tensor([500, 500])))
    assert "ToyDenoiser" in repr(model)
    assert repr(ex10.NamedSchedule("scaled_linear")) == "NoiseSchedule('scaled_linear')"
    torch.testing.assert_close(
        ex10.NamedSchedule("cosine", zero_terminal_snr=True).alphas_cumprod,
        NoiseSchedule.from_name("cosine", zero_terminal_snr=True).alphas_cumprod,
    )


def test_exercise_module_is_cheap_to_import():
    """Every exercise notebook imports the registry: it must not pull in the trainer, matplotlib
    or transformers."""
    code = (
        "import sys, ldm_lib.exercises.training; "
        "heavy = ('ldm_lib.training', 'matplotlib', 'transformers', 'yaml'); "
        "heavy = [m for m in heavy if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
