r"""Exercises of notebook 12_cfg_experiments: the guided model output a sampler calls, in one batch.

- ``cfg_model_output(unet, x_t, t, cond, uncond, w, phi)``: what
  :meth:`ldm_lib.pipeline.LatentDiffusion.guided_model` hands a sampler at each step. The
  unconditional and conditional passes run as **one** UNet call on a batch of :math:`2B` (the
  empty prompt's embedding ``uncond`` expanded to the batch, then the prompts' ``cond``); its two
  halves are combined by classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) and
  guidance rescale (Lin et al. 2023, arXiv 2305.08891, §3.4):

  .. math:: \hat y = y_u + w\,(y_c - y_u),\qquad
            y = \phi\,\hat y\,\frac{\mathrm{std}(y_c)}{\mathrm{std}(\hat y)} + (1 - \phi)\,\hat y

  with the std per sample over (C, H, W), and ``w`` a number or one scale per sample ``(B,)``.
  Reference: :func:`ldm_lib.guidance.classifier_free_guidance` and
  :func:`ldm_lib.guidance.rescale_guidance` on the halves of one call.

The UNet of the cases is :class:`ToyUNet`, a small per-sample function of ``(x_t, t, context)``
that counts its calls, so the checker can tell two passes from one batch; it raises a clear error
when ``t`` or the context does not have one row per row of ``x_t``.

Every exercise notebook imports this module (through ``ldm_lib.exercises``): it imports only
torch-level code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..guidance import classifier_free_guidance, rescale_guidance
from .checker import Case, Exercise, compare, describe, register

T = 1000  # training timesteps the toy UNet's t is scaled by
LATENT = (4, 8, 8)  # (C, H, W): batch sizes below are never 8, so a (B,) scale that is not reshaped
TOKENS, WIDTH = 5, 6  # a short context: 5 tokens of 6 channels (the real one is 77 x 64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ToyUNet:
    r"""A stand-in for the UNet, ``unet(x_t, t, context)``: per sample,

    .. math:: f = (W x_t)\,(1 + \tfrac12 s) + \tfrac{t}{T}\,b + s,\qquad s = \tanh(P^\top \bar c)

    with :math:`\bar c` the context averaged over its tokens. It depends on all three inputs, works
    on each row of the batch alone (like GroupNorm and attention in the real UNet), and counts its
    calls in ``calls``.
    """

    def __init__(self, seed: int = 0) -> None:
        g = _gen(seed)
        c = LATENT[0]
        self.weight = 0.6 * torch.randn(c, c, generator=g)
        self.bias = torch.randn(c, generator=g)
        self.project = torch.randn(WIDTH, c, generator=g)
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b = x_t.shape[0]
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != LATENT:
            raise ValueError(
                f"x_t must have shape (batch, {', '.join(map(str, LATENT))}), got {tuple(x_t.shape)}"
            )
        if tuple(t.shape) != (b,):
            raise ValueError(
                f"t has shape {tuple(t.shape)} but x_t has {b} rows: the UNet needs one timestep per row "
                "(the batch of 2B needs t twice)"
            )
        if context.ndim != 3 or context.shape[0] != b:
            raise ValueError(
                f"context has shape {tuple(context.shape)} but x_t has {b} rows: the UNet needs one "
                "context per row (expand uncond to B rows before concatenating it with cond)"
            )
        self.calls += 1
        s = torch.tanh(context.mean(dim=1) @ self.project)[:, :, None, None]  # (B, C, 1, 1)
        mixed = torch.einsum("oc,bchw->bohw", self.weight, x_t)
        return (
            mixed * (1 + 0.5 * s) + (t.float() / T)[:, None, None, None] * self.bias[None, :, None, None] + s
        )

    def __repr__(self) -> str:
        return "ToyUNet(x_t, t, context)"


def _expand(uncond: torch.Tensor, b: int) -> torch.Tensor:
    return uncond.expand(b, -1, -1)


def _halves(unet, x_t, t, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
    """(unconditional, conditional) outputs from one call on the batch of 2B."""
    b = x_t.shape[0]
    out = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([_expand(uncond, b), cond]))
    return out.chunk(2)


def _per_sample(w, like: torch.Tensor):
    return w.to(like).reshape(-1, 1, 1, 1) if isinstance(w, torch.Tensor) else w


def _cfg_model_output(unet, x_t, t, cond, uncond, w, phi):
    """The reference: one call, then the library's guidance and rescale."""
    out_uncond, out_cond = _halves(unet, x_t, t, cond, uncond)
    guided = classifier_free_guidance(out_uncond, out_cond, w)
    return rescale_guidance(guided, out_cond, phi)


def _cfg_cases() -> list[Case]:
    g = _gen(12)
    unet = ToyUNet()

    def draw(b: int, spread: bool = True):
        scale = torch.linspace(0.5, 2.0, b).reshape(-1, 1, 1, 1) if spread else 1.0
        x_t = torch.randn(b, *LATENT, generator=g) * scale  # samples of different std
        t = torch.randint(0, T, (b,), generator=g)
        cond = torch.randn(b, TOKENS, WIDTH, generator=g)
        uncond = 0.3 * torch.randn(1, TOKENS, WIDTH, generator=g)
        return x_t, t, cond, uncond

    cases = []
    x_t, t, cond, uncond = draw(3)
    cases.append(
        Case(
            "B = 3, w = 7.5, phi = 0 (CFG alone), uncond of shape (1, 5, 6)",
            (unet, x_t, t, cond, uncond, 7.5, 0.0),
        )
    )
    cases.append(Case("B = 3, w = 1: the conditional output alone", (unet, x_t, t, cond, uncond, 1.0, 0.0)))
    cases.append(Case("B = 3, w = 0: the unconditional output alone", (unet, x_t, t, cond, uncond, 0.0, 0.0)))
    x_t, t, cond, uncond = draw(3)
    w = torch.tensor([0.0, 1.0, 7.5])
    cases.append(
        Case(
            "B = 3, one scale per sample w = tensor([0, 1, 7.5]), phi = 0",
            (unet, x_t, t, cond, uncond, w, 0.0),
        )
    )
    x_t, t, cond, uncond = draw(5)
    cases.append(Case("B = 5, w = 7.5 with rescale phi = 0.7", (unet, x_t, t, cond, uncond, 7.5, 0.7)))
    cases.append(Case("B = 5, w = 10, full rescale phi = 1", (unet, x_t, t, cond, uncond, 10.0, 1.0)))
    x_t, t, cond, uncond = draw(4)
    w = torch.tensor([2.0, 5.0, 10.0, 15.0])
    cases.append(
        Case(
            "B = 4, w = tensor([2, 5, 10, 15]), phi = 0.7, uncond already expanded to (4, 5, 6)",
            (unet, x_t, t, cond, uncond.expand(4, -1, -1).clone(), w, 0.7),
        )
    )
    x_t, t, cond, uncond = draw(1, spread=False)
    cases.append(Case("a batch of one, w = 3, phi = 0.5", (unet, x_t, t, cond, uncond, 3.0, 0.5)))
    return cases  # fmt: skip


# ---------------------------------------------------------------- known mistakes


def _swapped_halves(unet, x_t, t, cond, uncond, w, phi):
    out_cond, out_uncond = _halves(unet, x_t, t, cond, uncond)  # read in the wrong order
    guided = out_uncond + _per_sample(w, x_t) * (out_cond - out_uncond)
    return rescale_guidance(guided, out_cond, phi)


def _from_cond(unet, x_t, t, cond, uncond, w, phi):
    out_uncond, out_cond = _halves(unet, x_t, t, cond, uncond)
    guided = out_cond + _per_sample(w, x_t) * (out_cond - out_uncond)
    return rescale_guidance(guided, out_cond, phi)


def _rescaled_with(std_of: Callable, mix: Callable | None = None):
    """CFG right, the rescale wrong: ``std_of(guided, out_uncond, out_cond)`` gives the
    (numerator, denominator) stds; ``mix(rescaled, guided, phi)`` the blend."""

    def fn(unet, x_t, t, cond, uncond, w, phi):
        out_uncond, out_cond = _halves(unet, x_t, t, cond, uncond)
        guided = classifier_free_guidance(out_uncond, out_cond, _per_sample(w, x_t))
        top, bottom = std_of(guided, out_uncond, out_cond)
        rescaled = guided * top / bottom
        return (mix or (lambda r, g, p: p * r + (1 - p) * g))(rescaled, guided, phi)

    return fn


def _std(x: torch.Tensor) -> torch.Tensor:
    return x.std(dim=(1, 2, 3), keepdim=True)


def _two_passes(unet, x_t, t, cond, uncond, w, phi):
    """Right values, but two UNet calls."""
    out_uncond = unet(x_t, t, _expand(uncond, x_t.shape[0]))
    out_cond = unet(x_t, t, cond)
    guided = classifier_free_guidance(out_uncond, out_cond, _per_sample(w, x_t))
    return rescale_guidance(guided, out_cond, phi)


TWO_PASSES = (
    "the UNet ran once per half: run both halves as ONE call on a batch of 2B, "
    "unet(cat([x_t, x_t]), cat([t, t]), cat([uncond expanded to B rows, cond])), then .chunk(2)"
)

CFG_MISTAKES = [
    (
        _swapped_halves,
        "the two halves of the output are swapped: the first B rows belong to the first B rows of the "
        "context, so with cat([uncond, cond]) chunk(2) gives (unconditional, conditional) in that order",
    ),
    (
        _from_cond,
        "guidance starts from the unconditional output: y_u + w * (y_c - y_u), so that w = 1 gives the "
        "conditional output and w = 0 the unconditional one",
    ),
    (
        _rescaled_with(lambda g, u, c: (c.std(), g.std())),
        "the rescale's std must be per sample, over (C, H, W) (dim=(1, 2, 3), keepdim=True), not over "
        "the whole batch",
    ),
    (
        _rescaled_with(lambda g, u, c: (_std(u), _std(g))),
        "the rescale brings the guided output back to the std of the CONDITIONAL output, std(y_c), not "
        "of the unconditional one",
    ),
    (
        _rescaled_with(lambda g, u, c: (_std(g), _std(c))),
        "the rescale ratio is upside down: multiply by std(y_c) / std(guided), which shrinks a guided "
        "output that grew",
    ),
    (
        _rescaled_with(lambda g, u, c: (_std(c), _std(g)), mix=lambda r, g, p: (1 - p) * r + p * g),
        "phi weights the rescaled output: phi * rescaled + (1 - phi) * guided (phi = 0 is plain CFG)",
    ),
    (_two_passes, TWO_PASSES),
]


def _verify_cfg_model_output(fn) -> str | None:
    """Compare with the reference on every case, name known mistakes, and count the UNet calls."""
    ex = EXERCISE
    for case in ex.cases():
        unet = case.args[0]
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in case.args]
        where = f"\n  on input: {case.description}"
        unet.calls = 0
        try:
            got = fn(*args)
        except NotImplementedError:
            raise
        except Exception as error:  # the learner's code crashed: say on which input
            note = ""
            if isinstance(case.args[5], torch.Tensor) and isinstance(error, RuntimeError):
                note = (
                    "\n  Note: here w is a tensor of one scale per sample, shape (B,); reshape it to "
                    "(B, 1, 1, 1) so that it broadcasts over (C, H, W)"
                )
            return f"raised {type(error).__name__}: {error}{note}{where}"
        calls = unet.calls
        for before, after in zip(case.args, args, strict=True):
            if isinstance(before, torch.Tensor) and not torch.equal(before, after):
                return f"your function changed its input in place{where}"
        expected = ex.reference(*case.args)
        problem = compare(got, expected, ex.atol, ex.rtol)
        if problem is not None:
            for mistake, meaning in ex.mistakes:
                if compare(got, mistake(*case.args), ex.atol, ex.rtol) is None:
                    problem += f"\n  Your result matches a known mistake: {meaning}"
                    break
            inputs = ", ".join(describe(a) for a in case.args)
            return f"{problem}{where}\n  arguments: {inputs}"
        if calls != 1:
            return (
                f"the values are right, but the UNet was called {calls} times for one call of your "
                f"function\n  Your result matches a known mistake: {TWO_PASSES}{where}"
            )
    return None


EXERCISE = register(
    Exercise(
        name="cfg_model_output",
        notebook="12_cfg_experiments",
        hint=(
            "b = x_t.shape[0]; out = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), "
            "torch.cat([uncond.expand(b, -1, -1), cond])); y_u, y_c = out.chunk(2); w as a tensor is "
            "reshaped to (B, 1, 1, 1); guided = y_u + w * (y_c - y_u); std per sample over dim=(1, 2, 3) "
            "with keepdim=True; return phi * guided * std(y_c) / std(guided) + (1 - phi) * guided."
        ),
        reference=_cfg_model_output,
        cases=_cfg_cases,
        mistakes=CFG_MISTAKES,
        verify=_verify_cfg_model_output,
    )
)
