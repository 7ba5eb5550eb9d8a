r"""Exercises of notebook 09_unet_attention: the timestep embedding and scaled dot-product attention.

- ``timestep_embedding(timesteps, dim)``: timesteps ``(B,)`` -> ``(B, dim)`` float32, Stable
  Diffusion's sinusoidal embedding (Vaswani et al. 2017, arXiv 1706.03762, §3.5; Ho et al. 2020,
  arXiv 2006.11239, App. B) with ``flip_sin_to_cos=True`` and frequency shift 0:
  :math:`\omega_i = 10000^{-i/h}`, :math:`e(t) = [\cos(t\omega), \sin(t\omega)]`, :math:`h = \lfloor
  dim/2 \rfloor`, a zero last column for an odd ``dim``. Reference:
  :func:`ldm_lib.models.unet.timestep_embedding`.
- ``scaled_dot_product_attention(q, k, v)``: :math:`\mathrm{softmax}(QK^\top/\sqrt d)\,V` on
  ``(B, heads, N, d)`` queries and ``(B, heads, M, d)`` keys, ``(B, heads, M, d_v)`` values
  (Vaswani et al. 2017, eq. 1). Reference: :func:`ldm_lib.models.attention.attention` with the
  ``"math"`` backend.

Both library modules import only torch (no transformers), so importing this module stays cheap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.attention import attention
from ..models.unet import timestep_embedding
from .checker import Case, Exercise, register

MAX_PERIOD = 10000  # P: the longest period of the sinusoids, in steps


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- timestep_embedding


def _timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    r"""SD's embedding: :math:`[\cos(t\omega_i), \sin(t\omega_i)]`, :math:`\omega_i = P^{-i/h}`."""
    return timestep_embedding(
        timesteps, dim, max_period=MAX_PERIOD, flip_sin_to_cos=True, downscale_freq_shift=0
    )


def _embed(timesteps: torch.Tensor, dim: int, omega: torch.Tensor, layout: str = "cos_sin") -> torch.Tensor:
    """Sinusoids of ``timesteps`` at frequencies ``omega`` in a given layout, zero-padded to ``dim``."""
    args = timesteps[:, None].float() * omega[None, :].float()
    if layout == "cos_sin":
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    elif layout == "sin_cos":
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    else:  # interleaved: cos w0, sin w0, cos w1, sin w1, ...
        emb = torch.stack([torch.cos(args), torch.sin(args)], dim=-1).flatten(1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _omega(dim: int, divisor: float | None = None, sign: float = -1.0) -> torch.Tensor:
    half = dim // 2
    divisor = half if divisor is None else divisor
    return torch.exp(sign * math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / divisor)


def _timestep_cases() -> list[Case]:
    g = _gen(9)
    return [
        Case("t = 0 and t = 999 (both ends of SD's 1000 steps), dim = 320 (SD's model_channels)",
             (torch.tensor([0, 999]), 320)),
        Case("8 random integer timesteps, dim = 64 (course_small's model_channels)",
             (torch.randint(0, 1000, (8,), generator=g), 64)),
        Case("a batch of one, t = 0: the cosines are 1, the sines 0", (torch.tensor([0]), 16)),
        Case("a batch of one, t = 999, dim = 32 (course_tiny's model_channels)", (torch.tensor([999]), 32)),
        Case("fractional float timesteps (as continuous-time samplers pass them), dim = 128",
             (torch.tensor([0.5, 17.25, 500.0, 998.75]), 128)),
        Case("odd dim = 33: 16 cosines, 16 sines, then a zero column", (torch.tensor([0, 1, 500, 999]), 33)),
        Case("odd dim = 7, a batch of one", (torch.tensor([250]), 7)),
        Case("dim = 2: a single frequency, omega_0 = 1", (torch.tensor([0, 1, 2, 999]), 2)),
    ]  # fmt: skip


register(
    Exercise(
        name="timestep_embedding",
        notebook="09_unet_attention",
        hint=(
            "h = dim // 2; omega_i = 10000 ** (-i / h) for i = 0..h-1; args = t[:, None] * omega[None, :]; "
            "return torch.cat([cos(args), sin(args)], dim=1) as float32, with a zero column appended "
            "when dim is odd."
        ),
        reference=_timestep_embedding,
        cases=_timestep_cases,
        # float32 rounding of t * omega at t ~ 1000 differs by up to ~1e-4 between correct ways of
        # computing omega (exp/log, pow, float64): tolerate that, nothing more.
        atol=2e-4,
        rtol=1e-4,
        mistakes=[
            (
                lambda t, dim: _embed(t, dim, _omega(dim), "sin_cos"),
                "the halves are swapped: SD (flip_sin_to_cos=True) puts the cosines first, "
                "[cos(t omega), sin(t omega)]; [sin, cos] is DDPM's order",
            ),
            (
                lambda t, dim: _embed(t, dim, _omega(dim), "interleaved"),
                "cos and sin are interleaved per frequency; SD concatenates the halves: all cosines, "
                "then all sines",
            ),
            (
                lambda t, dim: _embed(t, dim, _omega(dim, divisor=dim // 2 - 1)),
                "the exponent is -i/(h - 1), DDPM's frequency shift of 1; SD uses -i/h (shift 0)",
            ),
            (
                lambda t, dim: _embed(t, dim, _omega(dim, divisor=dim)),
                "the exponent is -i/dim; it must be -i/h with h = dim // 2 (equivalently -2i/dim), so "
                "that the frequencies fall from 1 to about 1/10000, not only to 1/100",
            ),
            (
                lambda t, dim: _embed(t, dim, _omega(dim, sign=1.0)),
                "the frequencies grow; omega_i = 10000 ** (-i/h) needs the minus sign, so that they fall "
                "from 1 to about 1/10000",
            ),
            (
                lambda t, dim: _embed(t, dim, torch.linspace(1.0, 1.0 / MAX_PERIOD, dim // 2)),
                "the frequencies are evenly spaced; they must be geometric (exponentially spaced), "
                "omega_i = 10000 ** (-i/h): each one a fixed ratio below the previous",
            ),
        ],
    )
)


# ---------------------------------------------------------------- scaled_dot_product_attention


def _scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{softmax}(QK^\top/\sqrt d)\,V`, the library's equation-as-written backend."""
    return attention(q, k, v, backend="math")


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return q @ k.transpose(-2, -1)


def _naive_softmax_attention(q, k, v):
    e = torch.exp(_scores(q, k) / math.sqrt(q.shape[-1]))
    return (e / e.sum(dim=-1, keepdim=True)) @ v


def _attention_cases() -> list[Case]:
    g = _gen(10)

    def qkv(b, heads, n, m, d, dv=None, scale=1.0):
        q = scale * torch.randn(b, heads, n, d, generator=g)
        k = scale * torch.randn(b, heads, m, d, generator=g)
        return q, k, torch.randn(b, heads, m, dv or d, generator=g)

    return [
        Case("self-attention: B = 2, 4 heads, N = M = 16 tokens, d = 8", qkv(2, 4, 16, 16, 8)),
        Case("cross-attention: 64 pixel queries (8x8 latent), M = 77 text tokens, 8 heads, d = 40 (SD)",
             qkv(2, 8, 64, 77, 40)),
        Case("a batch of one, one head, N = 5 queries, M = 3 keys (N != M)", qkv(1, 1, 5, 3, 4)),
        Case("values of another width than the keys (d = 4, d_v = 6): scale by sqrt of q's width",
             qkv(1, 2, 6, 9, 4, dv=6)),
        Case("a single key (M = 1): every query must return that key's value", qkv(2, 2, 7, 1, 16)),
        Case("large scores (q, k entries about 10, so |q k^T| / sqrt(d) reaches hundreds)",
             qkv(1, 2, 12, 10, 16, scale=10.0)),
    ]  # fmt: skip


register(
    Exercise(
        name="scaled_dot_product_attention",
        notebook="09_unet_attention",
        hint=(
            "scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) has shape (B, heads, N, M); "
            "weights = scores.softmax(dim=-1) (each query's row over the M keys sums to 1); "
            "return weights @ v."
        ),
        reference=_scaled_dot_product_attention,
        cases=_attention_cases,
        # With scores in the hundreds, float32 rounding of the scores moves the weights by ~1e-5
        # between correct implementations (a float64 one included); the mistakes are off by > 0.1.
        atol=1e-4,
        rtol=1e-4,
        mistakes=[
            (
                lambda q, k, v: _scores(q, k).softmax(dim=-1) @ v,
                "the scale is missing: divide the scores by sqrt(d), d = q.shape[-1]",
            ),
            (
                lambda q, k, v: (_scores(q, k) / q.shape[-1]).softmax(dim=-1) @ v,
                "the scores are divided by d; divide by sqrt(d)",
            ),
            (
                lambda q, k, v: (_scores(q, k) / math.sqrt(q.shape[-1])).softmax(dim=-2) @ v,
                "the softmax runs over the queries (dim=-2); it must run over the keys (dim=-1), so "
                "that each query's weights sum to 1",
            ),
            (
                lambda q, k, v: (_scores(q, k) / math.sqrt(v.shape[-1])).softmax(dim=-1) @ v,
                "the scale uses the values' width; d is the width of q and k, q.shape[-1]",
            ),
            (
                _naive_softmax_attention,
                "exp of large scores overflows to inf (inf / inf = NaN): subtract each row's maximum "
                "before exp (the softmax does not change), or use torch.softmax, which does",
            ),
        ],
    )
)
