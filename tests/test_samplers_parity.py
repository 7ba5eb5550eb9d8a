"""Parity of the samplers with diffusers' schedulers (test-only dependency), plus their own contracts.

Both sides get the same alphas_cumprod (ours: float64 cumprod rounded to float32; diffusers': float32
cumprod, ~1e-6 apart, checked separately) so that the test measures the samplers, not the rounding of
the schedule. The fake network is deterministic and nonlinear in its input; each side records what
the network sees (its VP input and timestep) at every call, which must agree call by call.
"""

import math

import pytest
import torch

from ldm_lib.parameterization import eps_from_v
from ldm_lib.samplers.ddpm import ddpm_sample, ddpm_step
from ldm_lib.samplers.dpmpp_2m import dpmpp_2m_sample, dpmpp_2m_step, dpmpp_2m_timesteps
from ldm_lib.samplers.euler import euler_sample, euler_step, karras_sigmas
from ldm_lib.samplers.euler_ancestral import euler_ancestral_sample, euler_ancestral_step
from ldm_lib.samplers.heun import heun_sample
from ldm_lib.schedules import NoiseSchedule, inference_timesteps

diffusers = pytest.importorskip("diffusers")
# diffusers 0.42 with numpy 2 warns on np.array(tensor); not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (2, 3, 4, 4)
N = 10
TOL = dict(rtol=1e-5, atol=1e-5)

SAMPLERS = {
    # name: (our sample function, diffusers class, x_T scaled to x-space?, supports zero-SNR flag)
    "ddpm": (ddpm_sample, "DDPMScheduler", False, True),
    "euler": (euler_sample, "EulerDiscreteScheduler", True, True),
    "euler_ancestral": (euler_ancestral_sample, "EulerAncestralDiscreteScheduler", True, True),
    "heun": (heun_sample, "HeunDiscreteScheduler", True, False),
    "dpmpp_2m": (dpmpp_2m_sample, "DPMSolverMultistepScheduler", False, True),
}
STOCHASTIC = {"ddpm", "euler_ancestral"}


def fake_net(x, t):
    """A deterministic, input-dependent stand-in for the network; ``t`` a scalar or (B,) tensor."""
    tt = float(t.reshape(-1)[0])
    return (
        0.3 * x
        + 0.2 * torch.tanh(x) * math.cos(tt / 150)
        + 0.1 * torch.sin(tt / 100 + 0.37 * torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape))
    )


def recording(log):
    def net(x, t):
        log.append((x.clone(), float(t.reshape(-1)[0])))
        return fake_net(x, t)

    return net


def ours_schedule(zero_snr):
    return NoiseSchedule.from_name("scaled_linear", zero_terminal_snr=zero_snr)


def make_diffusers(name, prediction_type, spacing, offset, zero_snr):
    cls = getattr(diffusers, SAMPLERS[name][1])
    kwargs = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=offset,
    )
    if SAMPLERS[name][3]:
        kwargs["rescale_betas_zero_snr"] = zero_snr
    if name == "ddpm":
        kwargs.update(clip_sample=False, variance_type="fixed_small")
    if name == "dpmpp_2m":
        kwargs.update(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True)
    sched = cls(**kwargs)
    ac = ours_schedule(zero_snr).alphas_cumprod.clone()
    if name != "ddpm":
        ac = ac.clamp(min=2.0**-24)  # diffusers sets alphas_cumprod[-1] = 2**-24 at zero SNR
    sched.alphas_cumprod = ac
    sched.set_timesteps(N)
    return sched


def run_diffusers(sched, x_T, scale_x_T, seed, stochastic):
    kw = dict(generator=torch.Generator().manual_seed(seed)) if stochastic else {}
    x = x_T * (float(sched.sigmas[0]) ** 2 + 1) ** 0.5 if scale_x_T else x_T.clone()
    log = []
    net = recording(log)
    for t in sched.timesteps:
        x = sched.step(net(sched.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return x, log


CASES = [
    (pt, spacing, offset, zsnr)
    for pt in ("epsilon", "v_prediction")
    for spacing, offset in (("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0))
    for zsnr in (False, True)
    # zero SNR is paired with the spacings that reach t = T - 1 (leading never does).
    if not (zsnr and spacing == "leading")
]


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("pt,spacing,offset,zsnr", CASES)
def test_trajectory_matches_diffusers(name, pt, spacing, offset, zsnr):
    if name == "ddpm" and zsnr and pt == "epsilon":
        pytest.skip("epsilon is undefined at alphas_cumprod = 0 without the 2**-24 clamp (tested below)")
    sample_fn, _, scale_x_T, _ = SAMPLERS[name]
    sched = make_diffusers(name, pt, spacing, offset, zsnr)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    theirs, their_log = run_diffusers(sched, x_T, scale_x_T, seed=7, stochastic=name in STOCHASTIC)
    our_log = []
    ours = sample_fn(
        recording(our_log),
        SHAPE,
        ours_schedule(zsnr),
        N,
        pt,
        spacing,
        generator=torch.Generator().manual_seed(7),
        x_T=x_T,
        progress=False,
        steps_offset=offset,
    )
    # Same network calls: the same timesteps, in order, and the same inputs at each call.
    assert [t for _, t in our_log] == [t for _, t in their_log]
    for (a, _), (b, _) in zip(our_log, their_log, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(ours, theirs, **TOL)
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("name", ["euler", "heun", "euler_ancestral", "dpmpp_2m"])
@pytest.mark.parametrize(
    "spacing,offset,zsnr", [("leading", 1, False), ("trailing", 0, True), ("linspace", 0, False)]
)
def test_sigmas_and_timesteps_match_diffusers(name, spacing, offset, zsnr):
    sched = make_diffusers(name, "epsilon", spacing, offset, zsnr)
    s = ours_schedule(zsnr)
    if name == "dpmpp_2m":
        timesteps = dpmpp_2m_timesteps(N, 1000, spacing, offset)
    else:
        timesteps = inference_timesteps(N, 1000, spacing, offset)
    sigmas = karras_sigmas(s, timesteps)
    if name == "heun":  # diffusers interleaves the corrector's (timestep, sigma)
        their_t = torch.cat([sched.timesteps[:1], sched.timesteps[1::2]])
        their_sigmas = torch.cat([sched.sigmas[:1], sched.sigmas[1:-1:2], sched.sigmas[-1:]])
    else:
        their_t, their_sigmas = sched.timesteps, sched.sigmas
    assert timesteps.tolist() == their_t.tolist()
    torch.testing.assert_close(sigmas, their_sigmas.float(), rtol=1e-6, atol=0)
    if zsnr:
        assert sigmas[0] == pytest.approx(4096, rel=1e-3)  # 2**-24 clamp: finite sigma_T


def test_alphas_cumprod_close_to_diffusers_own():
    # The override above changes alphas_cumprod by float32 rounding only.
    for zsnr in (False, True):
        sched = diffusers.DDPMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=zsnr
        )
        torch.testing.assert_close(
            ours_schedule(zsnr).alphas_cumprod, sched.alphas_cumprod, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_seeded_reproducible_and_stochastic_only_where_expected(name):
    fn = SAMPLERS[name][0]
    s = ours_schedule(False)

    def run(seed):
        return fn(
            fake_net,
            (2, 3),
            s,
            6,
            "epsilon",
            "trailing",
            generator=torch.Generator().manual_seed(seed),
            progress=False,
        )

    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    a = fn(
        fake_net,
        (2, 3),
        s,
        6,
        "epsilon",
        "trailing",
        generator=torch.Generator().manual_seed(1),
        x_T=x_T,
        progress=False,
    )
    b = fn(
        fake_net,
        (2, 3),
        s,
        6,
        "epsilon",
        "trailing",
        generator=torch.Generator().manual_seed(2),
        x_T=x_T,
        progress=False,
    )
    assert torch.allclose(a, b) == (name not in STOCHASTIC)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("zsnr", [False, True])
def test_epsilon_and_v_give_the_same_trajectory(name, zsnr):
    # A v-network and the epsilon-network it implies (eps = sigma x_t + alpha v) must sample alike.
    fn = SAMPLERS[name][0]
    s = ours_schedule(zsnr)
    ac = s.alphas_cumprod if name == "ddpm" else s.alphas_cumprod.clamp(min=2.0**-24)

    def eps_net(x, t):
        a, sig = ac[t].sqrt().view(-1, 1, 1, 1), (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
        return eps_from_v(x.double(), fake_net(x, t).double(), a.double(), sig.double()).float()

    kw = dict(x_T=torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)), progress=False)
    # DDPM's epsilon cannot start at alphas_cumprod = 0: "leading" starts below T - 1.
    spacing = "leading" if (zsnr and name == "ddpm") else "trailing"
    v = fn(fake_net, SHAPE, s, 8, "v_prediction", spacing, generator=torch.Generator().manual_seed(4), **kw)
    e = fn(eps_net, SHAPE, s, 8, "epsilon", spacing, generator=torch.Generator().manual_seed(4), **kw)
    tol = 2e-4 if zsnr else 1e-5  # at sigma = 4096 the epsilon form loses ~12 bits of float32 (4e-5 seen)
    torch.testing.assert_close(e, v, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_are_kept(name, dtype):
    x_T = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = SAMPLERS[name][0](
        fake_net,
        (3, 2, 5),
        ours_schedule(False),
        4,
        "v_prediction",
        "trailing",
        generator=torch.Generator().manual_seed(0),
        x_T=x_T,
        progress=False,
    )
    assert out.shape == (3, 2, 5) and out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prediction_type="x0"), "prediction_type"),
        (dict(spacing="uniform"), "spacing"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=2.5), "num_inference_steps"),
        (dict(spacing="trailing", steps_offset=1), "steps_offset"),
    ],
)
def test_bad_arguments_raise_before_any_work(name, kwargs, match):
    calls = []

    def net(x, t):
        calls.append(t)
        return x

    with pytest.raises(ValueError, match=match):
        SAMPLERS[name][0](
            net, (1, 2), ours_schedule(False), **{"num_inference_steps": 4, **kwargs}, progress=False
        )
    assert calls == []


def test_step_argument_checks():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="sigma"):
        euler_step("epsilon", x, x, 0.0, 0.0)
    with pytest.raises(ValueError, match="eta"):
        euler_ancestral_step("epsilon", x, x, 1.0, 0.5, eta=-1.0)
    with pytest.raises(ValueError, match="sigma_next"):
        dpmpp_2m_step("epsilon", x, x, 1.0, 2.0)
    with pytest.raises(ValueError, match="x0_prev"):
        dpmpp_2m_step("epsilon", x, x, 1.0, 0.5, x0_prev=x)
    with pytest.raises(ValueError, match="t_prev"):
        ddpm_step(ours_schedule(False), "epsilon", x, 10, 10, x)
    with pytest.raises(ValueError, match="epsilon"):
        ddpm_sample(fake_net, (1, 2), ours_schedule(True), 4, "epsilon", "trailing", progress=False)


def test_exact_denoiser_recovers_a_point_mass():
    # Data = one point c: the exact network output makes every deterministic sampler land on c.
    s = ours_schedule(True)
    ac = s.alphas_cumprod.clamp(min=2.0**-24)
    c = torch.tensor([0.5, -1.0])

    def net(x, t):  # exact v for x_t = a c + sig eps
        a, sig = ac[t].sqrt().view(-1, 1), (1 - ac[t]).sqrt().view(-1, 1)
        return a * (x - a * c) / sig - sig * c

    for fn in (euler_sample, heun_sample, dpmpp_2m_sample):
        out = fn(
            net,
            (8, 2),
            s,
            6,
            "v_prediction",
            "trailing",
            generator=torch.Generator().manual_seed(0),
            progress=False,
        )
        torch.testing.assert_close(out, c.expand(8, 2), rtol=1e-4, atol=1e-4)
