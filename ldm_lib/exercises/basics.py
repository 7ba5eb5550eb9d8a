"""Exercises of notebooks 01-06: the forward process, the parameterizations, offset noise, input
perturbation, min-SNR weights and classifier-free guidance.

Each case names the situation it tests (t near 0 or T, SNR = 0, broadcasting, alpha and sigma
outside the variance-preserving circle) because that is where the usual mistakes show.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import guidance, parameterization, weighting
from ..schedules import NoiseSchedule, make_betas, rescale_zero_terminal_snr
from .checker import Case, Exercise, register


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- 01 forward process


def _alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1 - betas, dim=0)


def _alphas_cumprod_cases() -> list[Case]:
    g = _gen(1)
    return [
        Case("a 10-step schedule of random betas", (torch.rand(10, generator=g) * 0.5 + 0.01,)),
        Case("the linear schedule (DDPM), T = 1000", (make_betas("linear"),)),
        Case("Stable Diffusion's scaled_linear schedule", (make_betas("scaled_linear"),)),
        Case("the cosine schedule (betas up to 0.999)", (make_betas("cosine"),)),
        Case(
            "zero terminal SNR: the last beta is exactly 1",
            (rescale_zero_terminal_snr(make_betas("scaled_linear")),),
        ),
    ]


register(
    Exercise(
        name="alphas_cumprod",
        notebook="01_forward_process",
        hint="alphas_cumprod[t] is the product of (1 - beta_s) for s = 0..t: one cumulative product.",
        reference=_alphas_cumprod,
        cases=_alphas_cumprod_cases,
        mistakes=[
            (lambda b: torch.cumprod(b, 0), "you multiplied the betas; alpha_t = 1 - beta_t"),
            (lambda b: torch.cumprod(1 - b, 0).sqrt(), "that is alpha_t = sqrt(alphas_cumprod)"),
            (lambda b: 1 - torch.cumsum(b, 0), "a sum of betas is only a first-order approximation"),
        ],
    )
)


def _snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return alphas_cumprod / (1 - alphas_cumprod)


def _snr_cases() -> list[Case]:
    sd = NoiseSchedule.from_name("scaled_linear").alphas_cumprod
    zt = NoiseSchedule.from_name("scaled_linear", zero_terminal_snr=True).alphas_cumprod
    return [
        Case("Stable Diffusion's alphas_cumprod", (sd,)),
        Case(
            "the cosine schedule, alphas_cumprod near 0 at the end",
            (NoiseSchedule.from_name("cosine").alphas_cumprod,),
        ),
        Case("zero terminal SNR: alphas_cumprod[-1] = 0, so SNR must be exactly 0", (zt,)),
    ]


register(
    Exercise(
        name="snr",
        notebook="01_forward_process",
        hint="SNR(t) = alpha_t**2 / sigma_t**2, with alpha_t**2 = alphas_cumprod and sigma_t**2 = 1 - it.",
        reference=_snr,
        cases=_snr_cases,
        mistakes=[
            (lambda ac: ac.sqrt() / (1 - ac).sqrt(), "that is alpha/sigma; SNR is a ratio of variances"),
            (lambda ac: (1 - ac) / ac, "that is the noise-to-signal ratio, 1/SNR"),
        ],
    )
)


def _q_sample(x0, noise, alphas_cumprod, t):
    shape = (-1,) + (1,) * (x0.ndim - 1)
    ac = alphas_cumprod[t].reshape(shape).to(x0.dtype)
    return ac.sqrt() * x0 + (1 - ac).sqrt() * noise


def _q_sample_cases() -> list[Case]:
    g = _gen(2)
    ac = NoiseSchedule.from_name("scaled_linear").alphas_cumprod
    zt = NoiseSchedule.from_name("scaled_linear", zero_terminal_snr=True).alphas_cumprod

    def imgs(*shape):
        return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)

    x, n = imgs(4, 3, 8, 8)
    x1, n1 = imgs(1, 3, 8, 8)
    p, pn = imgs(5, 2)
    return [
        Case("4 images at random timesteps", (x, n, ac, torch.randint(0, 1000, (4,), generator=g))),
        Case("t = 0 for every image (almost no noise)", (x, n, ac, torch.zeros(4, dtype=torch.long))),
        Case("t = T - 1 for every image (almost pure noise)", (x, n, ac, torch.full((4,), 999))),
        Case("a batch mixing t = 0 and t = T - 1", (x, n, ac, torch.tensor([0, 999, 0, 999]))),
        Case("a batch of one image", (x1, n1, ac, torch.tensor([500]))),
        Case(
            "2-D points (B, 2) instead of images: broadcast over any number of axes",
            (p, pn, ac, torch.arange(5) * 200),
        ),
        Case(
            "zero terminal SNR at t = T - 1: x_t must be exactly the noise", (x, n, zt, torch.full((4,), 999))
        ),
    ]


register(
    Exercise(
        name="q_sample",
        notebook="01_forward_process",
        hint=(
            "x_t = sqrt(alphas_cumprod[t]) * x0 + sqrt(1 - alphas_cumprod[t]) * noise, with "
            "alphas_cumprod[t] reshaped to (B, 1, ..., 1) so each sample gets its own timestep."
        ),
        reference=_q_sample,
        cases=_q_sample_cases,
        mistakes=[
            (
                lambda x, n, ac, t: (
                    ac[t].reshape((-1,) + (1,) * (x.ndim - 1)) * x
                    + (1 - ac[t].reshape((-1,) + (1,) * (x.ndim - 1))) * n
                ),
                "the scales of x0 and noise are square roots: sqrt(alphas_cumprod), sqrt(1 - alphas_cumprod)",
            ),
            (
                lambda x, n, ac, t: _q_sample(n, x, ac, t),
                "x0 and noise are swapped: the signal gets sqrt(alphas_cumprod)",
            ),
        ],
    )
)


# ---------------------------------------------------------------- 02 epsilon, x0 and v


def _conversion_cases(allow_alpha_zero: bool) -> Callable[[], list[Case]]:
    def cases() -> list[Case]:
        g = _gen(3)
        sched = NoiseSchedule.from_name("scaled_linear")
        t = torch.tensor([0, 10, 500, 999])
        a, s = sched.alpha(t).reshape(-1, 1, 1, 1), sched.sigma(t).reshape(-1, 1, 1, 1)
        u, w = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
        out = [
            Case("VP alpha, sigma of shape (4, 1, 1, 1) at t = 0, 10, 500, 999", (u, w, a, s)),
            Case("float alpha = 0.8, sigma = 0.6 (one timestep for the batch)", (u, w, 0.8, 0.6)),
            Case("t near 0: alpha = 0.9996, sigma = 0.0292", (u, w, 0.9996, 0.0292)),
            Case("t near T: alpha = 0.0683, sigma = 0.9977", (u, w, 0.0683, 0.9977)),
            Case(
                "alpha = 2.0, sigma = 0.5: not variance preserving (alpha**2 + sigma**2 != 1)",
                (u, w, 2.0, 0.5),
            ),
        ]
        if allow_alpha_zero:
            out.append(Case("alpha = 0, sigma = 1: zero terminal SNR", (u, w, 0.0, 1.0)))
        return out

    return cases


_NOT_VP = (
    "correct only when alpha**2 + sigma**2 = 1; divide by alpha**2 + sigma**2 to hold for any alpha, sigma"
)

register(
    Exercise(
        name="x0_from_eps",
        notebook="02_eps_vs_v",
        hint="Solve x_t = alpha * x0 + sigma * eps for x0.",
        reference=parameterization.x0_from_eps,
        cases=_conversion_cases(allow_alpha_zero=False),
        mistakes=[(lambda x, e, a, s: (x + s * e) / a, "the noise term must be subtracted")],
    )
)
register(
    Exercise(
        name="v_from_x0_eps",
        notebook="02_eps_vs_v",
        hint="v = alpha * eps - sigma * x0 (Salimans & Ho 2022).",
        reference=parameterization.v_from_x0_eps,
        cases=_conversion_cases(allow_alpha_zero=True),
        mistakes=[
            (lambda x0, e, a, s: s * x0 - a * e, "the sign is flipped: v = alpha * eps - sigma * x0"),
            (lambda x0, e, a, s: a * x0 - s * e, "eps and x0 are swapped: alpha multiplies eps"),
        ],
    )
)
register(
    Exercise(
        name="x0_from_v",
        notebook="02_eps_vs_v",
        hint="Combine alpha * x_t - sigma * v and simplify: the eps terms cancel.",
        reference=parameterization.x0_from_v,
        cases=_conversion_cases(allow_alpha_zero=True),
        mistakes=[(lambda x, v, a, s: a * x - s * v, _NOT_VP)],
    )
)
register(
    Exercise(
        name="eps_from_v",
        notebook="02_eps_vs_v",
        hint="Combine sigma * x_t + alpha * v and simplify: the x0 terms cancel.",
        reference=parameterization.eps_from_v,
        cases=_conversion_cases(allow_alpha_zero=True),
        mistakes=[(lambda x, v, a, s: s * x + a * v, _NOT_VP)],
    )
)


# ---------------------------------------------------------------- 03 offset noise


def _verify_offset_noise(fn) -> str | None:
    like = torch.zeros(8, 4, 16, 16)
    out = fn(like, 0.1, _gen(0))
    if not isinstance(out, torch.Tensor) or out.shape != like.shape:
        return f"expected a tensor shaped like `like` {tuple(like.shape)}, got {_shape(out)}"
    if out.dtype != like.dtype or out.device != like.device:
        return f"expected dtype {like.dtype} on {like.device}, got {out.dtype} on {out.device}"
    like64 = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    out64 = fn(like64, 0.1, _gen(0))
    if out64.dtype != torch.float64:
        return f"for a float64 `like` expected float64 noise, got {out64.dtype}: create it with like's dtype"
    if not torch.equal(fn(like, 0.1, _gen(5)), fn(like, 0.1, _gen(5))):
        return "two calls with generators seeded alike gave different noise: draw all noise from `generator`"
    if not torch.equal(fn(torch.ones_like(like), 0.1, _gen(5)), fn(like, 0.1, _gen(5))):
        return "the result depends on the values of `like`: return noise shaped like it, not like + noise"
    big = torch.zeros(512, 4, 16, 16)
    hw = 16 * 16
    for strength in (0.0, 0.5):
        noise = fn(big, strength, _gen(7))
        means = noise.mean(dim=(2, 3))  # (B, C): the per-sample, per-channel offsets
        var_means = means.var(dim=0).mean().item()
        want = strength**2 + 1 / hw
        if not 0.8 * want < var_means < 1.25 * want:
            return (
                f"with strength={strength} the per-(sample, channel) spatial means should have variance "
                f"strength**2 + 1/(H*W) = {want:.4f}, got {var_means:.4f}: the offset must be drawn "
                "once per sample and channel, shape (B, C, 1, 1), and scaled by strength"
            )
        residual = (noise - means[..., None, None]).var().item()
        if not 0.95 < residual < 1.05:
            return f"within each channel the noise should have variance 1, got {residual:.3f}"
        if strength:
            corr = torch.corrcoef(means[:, :2].T)[0, 1].item()
            if abs(corr) > 0.3:
                return (
                    f"the offsets of channels 0 and 1 are correlated ({corr:.2f}): draw one offset per "
                    "channel, shape (B, C, 1, 1), not one per sample (B, 1, 1, 1)"
                )
    return None


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


register(
    Exercise(
        name="offset_noise",
        notebook="03_offset_noise",
        hint=(
            "randn with like's shape, plus strength * randn of shape (B, C, 1, 1); pass "
            "generator=generator, device=like.device, dtype=like.dtype to torch.randn."
        ),
        verify=_verify_offset_noise,
    )
)


# ---------------------------------------------------------------- 04 input perturbation


def _verify_perturbed_pair(fn) -> str | None:
    g = _gen(11)
    x0 = torch.randn(256, 4, 8, 8, generator=g)
    noise = torch.randn(256, 4, 8, 8, generator=g)
    alpha, sigma = 0.8, 0.6
    out = fn(x0, noise, alpha, sigma, 0.0, _gen(1))
    if not (isinstance(out, tuple) and len(out) == 2):
        return f"expected a tuple (x_t, target), got {type(out).__name__}"
    x_t, target = out
    if not torch.allclose(x_t, alpha * x0 + sigma * noise, atol=1e-6):
        return "with strength=0, x_t must be exactly alpha * x0 + sigma * noise"
    x_t, target = fn(x0, noise, alpha, sigma, 0.1, _gen(1))
    if not torch.equal(target, noise):
        return (
            "the target must be the original, unperturbed noise: the network still learns to "
            "predict eps, only its input sees the perturbed noise"
        )
    residual = (x_t - alpha * x0) / sigma - noise  # = strength * xi if done right
    std = residual.std().item()
    if std < 1e-6:
        return "with strength=0.1, x_t did not change: build x_t from noise + strength * randn"
    if abs(std - 0.1 / sigma) < 0.02 and abs(std - 0.1) > 0.02:
        return (
            "x_t was perturbed directly; perturb the noise instead, so the extra noise is scaled by "
            "sigma like the rest: x_t = alpha * x0 + sigma * (noise + strength * xi)"
        )
    if not 0.09 < std < 0.11:
        return f"the perturbation of the noise should have std = strength = 0.1, got {std:.3f}"
    return None


register(
    Exercise(
        name="perturbed_training_pair",
        notebook="04_input_perturbation",
        hint=(
            "perturbed = noise + strength * randn_like(noise); x_t = alpha * x0 + sigma * perturbed; "
            "target = noise (the unperturbed one)."
        ),
        verify=_verify_perturbed_pair,
    )
)


# ---------------------------------------------------------------- 05 min-SNR


def _min_snr_cases() -> list[Case]:
    snr = NoiseSchedule.from_name("scaled_linear").snr(torch.arange(1000))
    zt = NoiseSchedule.from_name("scaled_linear", zero_terminal_snr=True).snr(torch.arange(1000))
    cases = []
    for kind in ("sample", "epsilon", "v_prediction"):
        for gamma in (1.0, 5.0, 20.0):
            cases.append(Case(f"SD schedule, every t, gamma = {gamma}, {kind!r}", (snr, gamma, kind)))
        cases.append(Case(f"zero terminal SNR (SNR = 0 at t = T), gamma = 5, {kind!r}", (zt, 5.0, kind)))
    return cases


def _min_snr_mistake_v_plus_one(snr, gamma, kind):
    if kind != "v_prediction":
        return weighting.min_snr_weight(snr, gamma, kind)
    return (snr + 1).clamp(max=gamma) / (snr + 1)


def _min_snr_mistake_v_no_division(snr, gamma, kind):
    if kind != "v_prediction":
        return weighting.min_snr_weight(snr, gamma, kind)
    return snr.clamp(max=gamma)


def _min_snr_mistake_eps_as_v(snr, gamma, kind):
    if kind != "v_prediction":
        return weighting.min_snr_weight(snr, gamma, kind)
    return weighting.min_snr_weight(snr, gamma, "epsilon")


register(
    Exercise(
        name="min_snr_weight",
        notebook="05_min_snr",
        hint=(
            "In x0-space the weight is min(SNR, gamma). The epsilon loss is SNR times the x0 loss, "
            "the v loss (SNR + 1) times: divide by that factor. At SNR = 0 the epsilon weight is "
            "0/0; return its limit, 1 (the value it has for every SNR < gamma)."
        ),
        reference=weighting.min_snr_weight,
        cases=_min_snr_cases,
        mistakes=[
            (_min_snr_mistake_v_plus_one, "min(SNR + 1, gamma) / (SNR + 1) clips SNR + 1, not SNR"),
            (_min_snr_mistake_v_no_division, "for v the x0-space weight must be divided by SNR + 1"),
            (_min_snr_mistake_eps_as_v, "for v divide by SNR + 1, not by SNR"),
        ],
    )
)


# ---------------------------------------------------------------- 06 classifier-free guidance


def _cfg_cases() -> list[Case]:
    g = _gen(6)
    u, c = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    return [Case(f"guidance scale {w}", (u, c, w)) for w in (3.0, 1.0, 0.0, 7.5, 15.0)]


register(
    Exercise(
        name="classifier_free_guidance",
        notebook="06_classifier_free_guidance",
        hint="Start at the unconditional prediction and move `scale` times the way to the conditional one.",
        reference=guidance.classifier_free_guidance,
        cases=_cfg_cases,
        mistakes=[
            (
                lambda u, c, w: c + w * (c - u),
                "that starts from cond: scale 1 must give cond, scale 0 uncond",
            ),
            (lambda u, c, w: c + w * (u - c), "cond and uncond are swapped"),
        ],
    )
)


def _rescale_cases() -> list[Case]:
    g = _gen(8)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0]).reshape(-1, 1, 1, 1)  # samples of different std
    cond = torch.randn(4, 4, 8, 8, generator=g) * scale
    guided = guidance.classifier_free_guidance(torch.randn(4, 4, 8, 8, generator=g), cond, 7.5)
    return [Case(f"phi = {phi}, samples of different std", (guided, cond, phi)) for phi in (0.0, 0.7, 1.0)]


def _rescale_population_std(guided, cond, phi):
    dims = tuple(range(1, cond.ndim))
    ratio = cond.std(dim=dims, keepdim=True, correction=0) / guided.std(dim=dims, keepdim=True, correction=0)
    return phi * guided * ratio + (1 - phi) * guided


def _rescale_global_std(guided, cond, phi):
    return phi * guided * cond.std() / guided.std() + (1 - phi) * guided


register(
    Exercise(
        name="rescale_guidance",
        notebook="06_classifier_free_guidance",
        hint=(
            "Scale `guided` by std(cond) / std(guided), each std per sample over all axes but the "
            "batch (keepdim=True), then mix: phi * rescaled + (1 - phi) * guided."
        ),
        reference=guidance.rescale_guidance,
        cases=_rescale_cases,
        accepted=[_rescale_population_std],
        mistakes=[
            (
                _rescale_global_std,
                "the std must be taken per sample (dim=(1, 2, 3)), not over the whole batch",
            ),
            (
                lambda g, c, phi: (1 - phi) * guidance.rescale_guidance(g, c, 1.0) + phi * g,
                "phi weights the rescaled prediction: phi * rescaled + (1 - phi) * guided",
            ),
        ],
    )
)
