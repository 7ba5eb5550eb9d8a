r"""GroupNorm followed by SiLU in one Triton kernel, forward and backward.

Every ResNet block of the UNet and of the VAE, and their output layers, compute
:math:`\mathrm{SiLU}(\mathrm{GroupNorm}(x))`. Written with torch that is two kernels and a
full-size intermediate written to memory and read back (twice more in the backward); fused, the
normalised value never leaves the registers.

**GroupNorm** (Wu & He 2018, "Group Normalization", arXiv 1803.08494, eqs. 1-3 with the group set
of §3.1). The ``C`` channels are split into ``G`` groups of ``C/G`` consecutive channels. For
sample ``n`` and group ``g``, over its :math:`N = (C/G)\,H W` elements :math:`x_i`,

.. math::
    \mu = \frac1N \sum_i x_i,\qquad \sigma^2 = \frac1N \sum_i (x_i - \mu)^2,\qquad
    r = \frac{1}{\sqrt{\sigma^2 + \epsilon}},\qquad \hat x_i = (x_i - \mu)\,r,\qquad
    z_i = \gamma_c\,\hat x_i + \beta_c

(biased variance, as ``torch.nn.GroupNorm``; :math:`c` is the channel of element :math:`i`).

**SiLU**: :math:`y = z\,s(z)` with the logistic sigmoid :math:`s(z) = 1/(1 + e^{-z})` (named in
Hendrycks & Gimpel 2016, "Gaussian Error Linear Units", arXiv 1606.08415, whose GELU it approximates
as :math:`z\,s(1.702z)`; Elfwing et al. 2018, arXiv 1702.03118, used it in reinforcement learning;
Ramachandran et al. 2017, arXiv 1710.05941, call it Swish).

**Backward.** Given :math:`\bar y = \partial L/\partial y`:

1. through SiLU: :math:`y' = s + z\,s(1 - s) = s\,(1 + z(1 - s))`, so
   :math:`\bar z_i = \bar y_i\, s(z_i)\,(1 + z_i(1 - s(z_i)))`;
2. the affine map: :math:`\bar\beta_c = \sum_{n,h,w} \bar z`,
   :math:`\bar\gamma_c = \sum_{n,h,w} \bar z\,\hat x`, and :math:`\bar{\hat x}_i = \gamma_c\,\bar z_i`;
3. the normalisation. From :math:`\partial\mu/\partial x_j = 1/N`,
   :math:`\partial\sigma^2/\partial x_j = 2(x_j - \mu)/N` and
   :math:`\partial r/\partial x_j = -\tfrac12 r^3\,\partial\sigma^2/\partial x_j = -r\,\hat x_j/N`,

   .. math::
       \frac{\partial \hat x_i}{\partial x_j}
       = r\Big(\delta_{ij} - \frac1N - \frac{\hat x_i\,\hat x_j}{N}\Big)
       \quad\Longrightarrow\quad
       \bar x_j = r\Big(\bar{\hat x}_j - \frac1N\sum_i \bar{\hat x}_i
                  - \hat x_j\,\frac1N \sum_i \bar{\hat x}_i\,\hat x_i\Big).

   Both sums come from the per-channel sums of step 2 restricted to one sample,
   :math:`\sum_i \bar{\hat x}_i = \sum_c \gamma_c \sum_{h,w} \bar z` and
   :math:`\sum_i \bar{\hat x}_i \hat x_i = \sum_c \gamma_c \sum_{h,w} \bar z\,\hat x`, so one pass over
   the group yields them and the parameter gradients, a second pass writes :math:`\bar x`.

**Kernels.** One program per (sample, group), walking the group in tiles of ``BLOCK_C`` channels x
``BLOCK_S`` positions (the last tiles masked, so any ``C/G`` and ``H x W`` work). Forward: a pass for
:math:`\mu` (summing :math:`x - K` for a pivot :math:`K`, the group's first element, so that float32
adds numbers of the size of :math:`\sigma`), a pass for :math:`\sigma^2` from the centred squares (not
:math:`E[x^2] - \mu^2`, which cancels catastrophically when :math:`|\mu| \gg \sigma`), a pass that
writes :math:`y` from :math:`z = (x - \mu)\,\gamma_c r + \beta_c` (not
:math:`x\,\gamma_c r + (\beta_c - \mu\gamma_c r)`, which cancels too). :math:`\mu` and :math:`r` are
stored (float32) for the backward, which recomputes :math:`\hat x`, :math:`z` and :math:`s(z)` from
:math:`x` instead of storing them. Backward: the pass of step 2 (per-sample, per-channel partial
:math:`\bar\gamma, \bar\beta`, summed over the batch by torch afterwards), then the pass that writes
:math:`\bar x`. Statistics and arithmetic are float32 whatever the input dtype (float32, float16 or
bfloat16); results are rounded to it once, on store. Every tensor is addressed through its own
strides: channels_last or sliced inputs cost no copy. Inputs ``(N, C)``, ``(N, C, L)`` and
``(N, C, H, W)`` are viewed as 4-D; more spatial dimensions are flattened into ``H`` (a copy when
their strides do not allow a view).

**Where it runs.** Triton compiles for CUDA GPUs; without one, the kernels run in Triton's
interpreter on CPU tensors (numpy, hundreds of times slower than torch: for tests and teaching at
small sizes). ``TRITON_INTERPRET=1`` selects it, and must be set before triton is first imported in
the process, by anything (transformers and diffusers import it through ``torch._dynamo``), because
``triton.language`` decorates its own helpers at import. This module imports triton only when a
kernel is first called, and builds (decorates) the kernels then, so importing the models never
imports triton. Where the kernels cannot run, :class:`GroupNormSiLU` with ``fused=True`` raises a
``ValueError`` saying why and what to do; ``fused=False`` (the default) is torch's
``F.silu(F.group_norm(...))``, bit for bit.

Not measured on a GPU yet (the tile sizes are a simple rule, not tuned); one program per (sample,
group) gives ``N * G`` programs, 64 for SD's 32 groups at batch 2, fewer than an H100's 132 SMs: a
split of each group over several programs would be the next step for speed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "DTYPES",
    "GroupNormSiLU",
    "GroupNormSiLUFunction",
    "fused_unavailable_reason",
    "group_norm_silu",
    "group_norm_silu_reference",
    "set_fused",
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRUE = ("1", "true", "on", "yes", "y")  # what Triton's getenv_bool accepts for TRITON_INTERPRET
_TILE = 2048  # elements per tile on a GPU (float32 registers of a few accumulators per thread)
_TILE_INTERPRETED = 16384  # numpy does one tile per op: bigger tiles, fewer Python steps


def group_norm_silu_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r""":math:`\mathrm{SiLU}(\mathrm{GroupNorm}(x))` with torch's own ops: what the kernel must equal."""
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


# ====================================================================================== availability


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def _compiled_for_gpu() -> bool:
    """Whether triton, or these kernels, were set up without the interpreter in this process: then
    CPU tensors cannot run even with TRITON_INTERPRET=1 set now (triton's own ``tl`` helpers are
    decorated when ``triton.language`` is imported)."""
    if _kernels.cache_info().currsize and not _kernels().interpreted:
        return True
    lang = sys.modules.get("triton.language")
    return type(getattr(lang, "zeros", None)).__name__ == "JITFunction"


def fused_unavailable_reason(device: torch.device | str) -> str | None:
    """Why the fused kernel cannot run on tensors on ``device`` (a sentence that says what to do), or
    ``None`` when it can: CUDA with triton installed, or CPU with triton imported under
    ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    if not _triton_installed():
        return (
            "triton is not installed (pip install triton; the Linux CUDA builds of torch ship it); "
            "or switch fused_groupnorm_silu off to use torch's GroupNorm and SiLU"
        )
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return (
            f"Triton kernels run on CUDA tensors (or on CPU ones with TRITON_INTERPRET=1), not on "
            f"{device.type}; switch fused_groupnorm_silu off"
        )
    if not _interpreting():
        return (
            "Triton kernels run on CUDA tensors, and on CPU tensors only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 in the environment before triton is imported (slow: for tests and "
            "teaching), run on a GPU, or switch fused_groupnorm_silu off"
        )
    if _compiled_for_gpu():
        return (
            "triton was imported before TRITON_INTERPRET=1 was set (importing transformers, diffusers or "
            "torch._dynamo imports it), so it cannot interpret; set the variable before any import, e.g. "
            "in the shell"
        )
    return None


def _check_inputs(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> None:
    reason = fused_unavailable_reason(x.device)
    if reason is not None:
        raise ValueError(f"the fused GroupNorm+SiLU kernel cannot run on {x.device}: {reason}")
    if x.dtype not in DTYPES:
        allowed = ", ".join(str(d) for d in DTYPES)
        raise ValueError(
            f"x.dtype={x.dtype} is not supported by the fused GroupNorm+SiLU kernel; allowed: {allowed}"
        )
    if x.ndim < 2:
        raise ValueError(f"x must be (N, C, *), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups={num_groups!r} must be a positive divisor of the {C} channels of x")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.shape != (C,) or p.device != x.device or p.dtype not in DTYPES:
            raise ValueError(
                f"{name} must be a float32/float16/bfloat16 tensor of shape ({C},) on {x.device}; got "
                f"{p.dtype}, shape {tuple(p.shape)} on {p.device}"
            )


# =========================================================================================== kernels


@functools.cache
def _kernels() -> SimpleNamespace:
    """Import triton and build the two kernels (once). Decorating here, not at module level, keeps
    triton out of ``import ldm_lib``.

    Both kernels run one program per (sample ``n``, group ``g``) and walk the group's ``Cg = C/G``
    channels x ``S = H*W`` positions in ``BLOCK_C x BLOCK_S`` tiles, masked at the edges. Position
    ``s`` is at ``(s // W) * stride_h + (s % W) * stride_w``; ``FLAT`` (every tensor's H and W merge
    into one stride, as for contiguous and channels_last tensors) skips that division. The sigmoid is
    written out: ``tl.sigmoid`` is a nested jit function, which the interpreter calls slowly. Masked
    lanes read ``x = mu`` where it is normalised, so no exponential there overflows."""
    import triton
    import triton.language as tl

    @triton.jit
    def group_norm_silu_fwd(
        X, Y, W, B, Mean, Rstd,
        Cg, H, Wd, G, eps,
        sxn, sxc, sxh, sxw, syn, syc, syh, syw,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, FLAT: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        n = (pid // G).to(tl.int64)  # int64: n * stride can pass 2^31 in big batches
        g = pid % G
        S = H * Wd
        count = Cg * 1.0 * S  # N = Cg*H*W, as a float (no int32 overflow; Cg, S may be constexpr 1)
        x0 = X + n * sxn + (g * Cg).to(tl.int64) * sxc  # element (n, first channel of g, 0, 0)
        y0 = Y + n * syn + (g * Cg).to(tl.int64) * syc
        cs = tl.arange(0, BLOCK_C)
        ss = tl.arange(0, BLOCK_S)

        # pass 1: mu = K + sum(x - K) / N, with K the group's first element (a pivot): the sum adds
        # numbers of the size of sigma, not of mu (float32 sums of values near 1000 lose the digits
        # that tell them apart; x - K is exact for values that close).
        pivot = tl.load(x0).to(tl.float32)
        acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for c_start in range(0, Cg, BLOCK_C):
            c = c_start + cs
            xc = x0 + c[:, None] * sxc
            for s_start in range(0, S, BLOCK_S):
                s = s_start + ss
                mask = (c < Cg)[:, None] & (s < S)[None, :]
                xs = s * sxw if FLAT else (s // Wd) * sxh + (s % Wd) * sxw
                acc += tl.load(xc + xs[None, :], mask=mask, other=pivot).to(tl.float32) - pivot
        mean = pivot + tl.sum(acc) / count

        # pass 2: sigma^2 = sum((x - mu)^2) / N from centred values; r = 1 / sqrt(sigma^2 + eps)
        acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for c_start in range(0, Cg, BLOCK_C):
            c = c_start + cs
            xc = x0 + c[:, None] * sxc
            for s_start in range(0, S, BLOCK_S):
                s = s_start + ss
                mask = (c < Cg)[:, None] & (s < S)[None, :]
                xs = s * sxw if FLAT else (s // Wd) * sxh + (s % Wd) * sxw
                x = tl.load(xc + xs[None, :], mask=mask, other=0.0).to(tl.float32)
                d = tl.where(mask, x - mean, 0.0)
                acc += d * d
        rstd = 1.0 / tl.sqrt(tl.sum(acc) / count + eps)
        tl.store(Mean + pid, mean)
        tl.store(Rstd + pid, rstd)

        # pass 3: z = gamma_c * (x - mu) * r + beta_c, y = z * sigmoid(z)
        for c_start in range(0, Cg, BLOCK_C):
            c = c_start + cs
            w = tl.load(W + g * Cg + c, mask=c < Cg, other=1.0).to(tl.float32) if HAS_W else 1.0
            b = tl.load(B + g * Cg + c, mask=c < Cg, other=0.0).to(tl.float32) if HAS_B else 0.0
            scale = (w * rstd)[:, None] if HAS_W else rstd  # gamma_c * r
            beta = b[:, None] if HAS_B else b
            xc = x0 + c[:, None] * sxc
            yc = y0 + c[:, None] * syc
            for s_start in range(0, S, BLOCK_S):
                s = s_start + ss
                mask = (c < Cg)[:, None] & (s < S)[None, :]
                xs = s * sxw if FLAT else (s // Wd) * sxh + (s % Wd) * sxw
                ys = s * syw if FLAT else (s // Wd) * syh + (s % Wd) * syw
                x = tl.load(xc + xs[None, :], mask=mask, other=mean).to(tl.float32)
                z = (x - mean) * scale + beta  # not x * scale + (beta - mu * scale): that cancels
                y = z / (1.0 + tl.exp(-z))
                tl.store(yc + ys[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def group_norm_silu_bwd(
        X, DY, DX, W, B, Mean, Rstd, DWp, DBp,
        C, Cg, H, Wd, G,
        sxn, sxc, sxh, sxw, sdyn, sdyc, sdyh, sdyw, sdxn, sdxc, sdxh, sdxw,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, FLAT: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        n = (pid // G).to(tl.int64)
        g = pid % G
        S = H * Wd
        count = Cg * 1.0 * S
        ch0 = (g * Cg).to(tl.int64)
        x0 = X + n * sxn + ch0 * sxc
        dy0 = DY + n * sdyn + ch0 * sdyc
        dx0 = DX + n * sdxn + ch0 * sdxc
        cs = tl.arange(0, BLOCK_C)
        ss = tl.arange(0, BLOCK_S)
        mean = tl.load(Mean + pid)
        rstd = tl.load(Rstd + pid)

        # pass 1: per channel, sum(zbar) and sum(zbar * xhat) over this sample's positions: the
        # partial beta and gamma gradients, and (times gamma) the two sums of the dx formula.
        sum_dxhat = tl.zeros([BLOCK_C], dtype=tl.float32)
        sum_dxhat_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c_start in range(0, Cg, BLOCK_C):
            c = c_start + cs
            w = tl.load(W + g * Cg + c, mask=c < Cg, other=0.0).to(tl.float32) if HAS_W else 1.0
            b = tl.load(B + g * Cg + c, mask=c < Cg, other=0.0).to(tl.float32) if HAS_B else 0.0
            w2 = w[:, None] if HAS_W else w
            b2 = b[:, None] if HAS_B else b
            xc = x0 + c[:, None] * sxc
            dyc = dy0 + c[:, None] * sdyc
            acc_dz = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
            acc_dzx = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
            for s_start in range(0, S, BLOCK_S):
                s = s_start + ss
                mask = (c < Cg)[:, None] & (s < S)[None, :]
                xs = s * sxw if FLAT else (s // Wd) * sxh + (s % Wd) * sxw
                dys = s * sdyw if FLAT else (s // Wd) * sdyh + (s % Wd) * sdyw
                xhat = (tl.load(xc + xs[None, :], mask=mask, other=mean).to(tl.float32) - mean) * rstd
                dy = tl.load(dyc + dys[None, :], mask=mask, other=0.0).to(tl.float32)
                z = xhat * w2 + b2
                sig = 1.0 / (1.0 + tl.exp(-z))
                dz = dy * sig * (1.0 + z * (1.0 - sig))  # zbar; 0 where masked, since dy is
                acc_dz += dz
                acc_dzx += dz * xhat
            dbeta = tl.sum(acc_dz, axis=1)
            dgamma = tl.sum(acc_dzx, axis=1)
            part = n * C + g * Cg + c  # row n of the (N, C) float32 partial sums
            tl.store(DBp + part, dbeta, mask=c < Cg)
            tl.store(DWp + part, dgamma, mask=c < Cg)
            sum_dxhat += tl.where(c < Cg, w * dbeta, 0.0)
            sum_dxhat_xhat += tl.where(c < Cg, w * dgamma, 0.0)
        mean_dxhat = tl.sum(sum_dxhat) / count
        mean_dxhat_xhat = tl.sum(sum_dxhat_xhat) / count

        # pass 2: xbar = r * (gamma * zbar - mean(xhatbar) - xhat * mean(xhatbar * xhat))
        for c_start in range(0, Cg, BLOCK_C):
            c = c_start + cs
            w = tl.load(W + g * Cg + c, mask=c < Cg, other=0.0).to(tl.float32) if HAS_W else 1.0
            b = tl.load(B + g * Cg + c, mask=c < Cg, other=0.0).to(tl.float32) if HAS_B else 0.0
            w2 = w[:, None] if HAS_W else w
            b2 = b[:, None] if HAS_B else b
            xc = x0 + c[:, None] * sxc
            dyc = dy0 + c[:, None] * sdyc
            dxc = dx0 + c[:, None] * sdxc
            for s_start in range(0, S, BLOCK_S):
                s = s_start + ss
                mask = (c < Cg)[:, None] & (s < S)[None, :]
                xs = s * sxw if FLAT else (s // Wd) * sxh + (s % Wd) * sxw
                dys = s * sdyw if FLAT else (s // Wd) * sdyh + (s % Wd) * sdyw
                dxs = s * sdxw if FLAT else (s // Wd) * sdxh + (s % Wd) * sdxw
                xhat = (tl.load(xc + xs[None, :], mask=mask, other=mean).to(tl.float32) - mean) * rstd
                dy = tl.load(dyc + dys[None, :], mask=mask, other=0.0).to(tl.float32)
                z = xhat * w2 + b2
                sig = 1.0 / (1.0 + tl.exp(-z))
                dz = dy * sig * (1.0 + z * (1.0 - sig))
                dx = rstd * (w2 * dz - mean_dxhat - xhat * mean_dxhat_xhat)
                tl.store(dxc + dxs[None, :], dx.to(DX.dtype.element_ty), mask=mask)

    interpreted = type(group_norm_silu_fwd).__name__ == "InterpretedFunction"
    return SimpleNamespace(fwd=group_norm_silu_fwd, bwd=group_norm_silu_bwd, interpreted=interpreted)


# =========================================================================================== launches


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, *spatial)`` as ``(N, C, H, W)``: a view for 2, 3 and 4 dimensions; beyond, the leading
    spatial dimensions flattened into H (a copy if their strides do not allow a view)."""
    if t.ndim == 2:
        return t[:, :, None, None]
    if t.ndim == 3:
        return t[:, :, None, :]
    if t.ndim == 4:
        return t
    return t.reshape(t.shape[0], t.shape[1], -1, t.shape[-1])


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _blocks(cg: int, s: int, block_c: int | None, block_s: int | None) -> tuple[int, int]:
    """Tile sides (powers of two): all of a group's channels if they fit in the tile (else chunks of
    them), and as many positions as the tile has room for. ``block_c``/``block_s`` override them."""
    tile = _TILE_INTERPRETED if _kernels().interpreted else _TILE
    bc = block_c or min(_pow2(cg), tile)
    bs = block_s or min(_pow2(s), max(1, tile // bc))
    for name, value in (("block_c", bc), ("block_s", bs)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name}={value!r} must be a power of two")
    return bc, bs


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device), nothing on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _strides(*tensors: torch.Tensor) -> tuple[bool, list[int]]:
    """``(flat, strides)``: the (n, c, h, w) strides of every 4-D tensor, and whether each one's H x W
    positions are equally spaced (one stride, put in the w slot), which spares the kernels a division
    per element. True for contiguous, channels_last and broadcast (stride 0) tensors, false for a
    crop along W (rows no longer equally spaced) or a transpose of H and W."""
    flat, out = True, []
    for t in tensors:
        H, W = t.shape[2:]
        sn, sc, sh, sw = t.stride()
        step = sw if H == 1 or sh == W * sw else sh if W == 1 else None
        flat = flat and step is not None
        out.append((sn, sc, sh, sw, step))
    if flat:
        return True, [s for sn, sc, sh, sw, step in out for s in (sn, sc, 0, step)]
    return False, [s for sn, sc, sh, sw, step in out for s in (sn, sc, sh, sw)]


def _forward(x, weight, bias, num_groups, eps, block_c, block_s):
    k = _kernels()
    # Same shape and, for dense inputs, the same strides as x: channels_last stays channels_last.
    y = torch.empty_like(x) if x.ndim <= 4 else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x4, y4 = _as_4d(x), _as_4d(y)
    Nb, C, H, Wd = x4.shape
    cg = C // num_groups
    mean = torch.empty(Nb * num_groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    bc, bs = _blocks(cg, H * Wd, block_c, block_s)
    flat, strides = _strides(x4, y4)
    with _device_guard(x):
        k.fwd[(Nb * num_groups,)](
            x4, y4, weight if weight is not None else x4, bias if bias is not None else x4, mean, rstd,
            cg, H, Wd, num_groups, float(eps), *strides,
            HAS_W=weight is not None, HAS_B=bias is not None, FLAT=flat, BLOCK_C=bc, BLOCK_S=bs,
            num_warps=4 if bc * bs <= 1024 else 8,
        )  # fmt: skip
    return y, mean, rstd


def _backward(dy, x, weight, bias, mean, rstd, num_groups, block_c, block_s):
    k = _kernels()
    dx = torch.empty_like(x) if x.ndim <= 4 else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x4, dy4, dx4 = _as_4d(x), _as_4d(dy), _as_4d(dx)
    Nb, C, H, Wd = x4.shape
    cg = C // num_groups
    dw_part = torch.empty(Nb, C, dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part)
    bc, bs = _blocks(cg, H * Wd, block_c, block_s)
    flat, strides = _strides(x4, dy4, dx4)
    with _device_guard(x):
        k.bwd[(Nb * num_groups,)](
            x4, dy4, dx4, weight if weight is not None else x4, bias if bias is not None else x4,
            mean, rstd, dw_part, db_part,
            C, cg, H, Wd, num_groups, *strides,
            HAS_W=weight is not None, HAS_B=bias is not None, FLAT=flat, BLOCK_C=bc, BLOCK_S=bs,
            num_warps=4 if bc * bs <= 1024 else 8,
        )  # fmt: skip
    # The per-sample partial sums, summed over the batch (float32), in the parameters' dtype.
    dw = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    db = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db


class GroupNormSiLUFunction(torch.autograd.Function):
    """Autograd wrapper of the two kernels (Triton kernels have no autograd of their own). Saves
    ``x``, the parameters and the float32 ``mean``/``rstd`` per (sample, group); the backward
    recomputes the rest. Not twice differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, block_c, block_s):
        y, mean, rstd = _forward(x, weight, bias, num_groups, eps, block_c, block_s)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.blocks = num_groups, (block_c, block_s)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = _backward(dy, x, weight, bias, mean, rstd, ctx.num_groups, *ctx.blocks)
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            dw if need[1] else None,
            db if need[2] else None,
            None,
            None,
            None,
            None,
        )


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    block_c: int | None = None,
    block_s: int | None = None,
) -> torch.Tensor:
    r""":math:`\mathrm{SiLU}(\mathrm{GroupNorm}(x))` by the fused Triton kernels, differentiable in
    ``x``, ``weight`` and ``bias`` (the equations are in the module docstring).

    ``x`` is ``(N, C, *)`` float32/float16/bfloat16 with any strides, on CUDA (or on CPU with
    ``TRITON_INTERPRET=1``); ``weight``/``bias`` ``(C,)`` or ``None``. The output has ``x``'s dtype,
    shape and (for dense inputs) memory format. ``block_c``/``block_s`` (powers of two) override the
    tile sides; the tests use small tiles so that small inputs cross several tiles and ragged edges.
    A ``ValueError`` says why when the kernel cannot run on these tensors.
    """
    _check_inputs(x, num_groups, weight, bias)
    if x.numel() == 0:
        return group_norm_silu_reference(x, num_groups, weight, bias, eps)
    return GroupNormSiLUFunction.apply(x, weight, bias, num_groups, float(eps), block_c, block_s)


# ============================================================================================ module


class GroupNormSiLU(nn.GroupNorm):
    r""":math:`\mathrm{SiLU}(\mathrm{GroupNorm}(x))` as one module: ``torch.nn.GroupNorm`` (same
    ``weight``, ``bias``, ``num_groups``, ``eps``, hence the same state-dict keys) whose output goes
    through SiLU.

    ``fused=False`` computes ``F.silu(F.group_norm(...))`` with torch; ``fused=True`` calls the Triton
    kernels (:func:`group_norm_silu`) and raises ``ValueError`` with the reason when they cannot run
    on the input (not CUDA, CPU without ``TRITON_INTERPRET=1``, triton missing, float64). The switch
    changes how, not what, so a state dict saved with either setting loads with the other.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        fused: bool = False,
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.fused = bool(fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fused={self.fused}"


def set_fused(module: nn.Module, enabled: bool) -> int:
    """Switch every :class:`GroupNormSiLU` inside ``module`` to the kernel (``True``) or to torch's ops;
    returns how many were switched. What the models' ``set_fused_groupnorm_silu`` call."""
    if not isinstance(enabled, bool):
        raise ValueError(f"fused_groupnorm_silu={enabled!r} must be True or False")
    count = 0
    for m in module.modules():
        if isinstance(m, GroupNormSiLU):
            m.fused = enabled
            count += 1
    return count
