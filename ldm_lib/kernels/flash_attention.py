r"""Flash attention in Triton: softmax attention in tiles, never holding the ``(N, M)`` score matrix.

Attention (Vaswani et al. 2017, arXiv 1706.03762) is :math:`O = \mathrm{softmax}(s\,QK^\top)V`
for queries ``(B, heads, N, d)``, keys ``(B, heads, M, d)`` and values ``(B, heads, M, d_v)``. Written
out (the ``"math"`` backend) it stores the scores and probabilities, ``N * M`` numbers per head: for
the 4096 latent positions of a 512 px image that is 16.8 M numbers per head. FlashAttention (Dao et
al. 2022, arXiv 2205.14135; Dao 2023, "FlashAttention-2", arXiv 2307.08691) reads Q in blocks of
rows, streams K and V past them in blocks of columns, and keeps per row only a running maximum, a
running sum and a running output: memory :math:`O(N d)` instead of :math:`O(N M)`.

The online softmax (Milakov & Gimelshein 2018, arXiv 1805.02867). For one query row, after key
blocks :math:`1..j` with scores :math:`S^{(j)} = s\,q K_j^\top` (plus the mask), keep

.. math::
    m_j = \max\big(m_{j-1}, \max_c S^{(j)}_c\big),\qquad
    \ell_j = e^{m_{j-1} - m_j}\,\ell_{j-1} + \sum_c e^{S^{(j)}_c - m_j},\qquad
    a_j = e^{m_{j-1} - m_j}\,a_{j-1} + \sum_c e^{S^{(j)}_c - m_j}\,V_{j,c}

from :math:`m_0 = -\infty`, :math:`\ell_0 = 0`, :math:`a_0 = 0`. By induction
:math:`\ell_j = \sum_{c \le j} e^{S_c - m_j}` and :math:`a_j = \sum_{c \le j} e^{S_c - m_j} V_c`, so
after the last block :math:`o = a / \ell` is exactly the softmax-weighted average, and no exponent
is ever above 0 (no overflow). The factor :math:`e^{m_{j-1} - m_j} \le 1` rescales what was summed
against the old maximum. The kernel also stores the log-sum-exp :math:`L = m + \log \ell` of every
row (``lse``, float32), from which the backward pass rebuilds :math:`P = e^{S - L}` block by block.
It works in base 2 (``exp2`` is the hardware instruction): the scores are multiplied by
:math:`s \log_2 e` once, and ``lse`` is converted back to natural log units.

Backward (FlashAttention-2, Algorithm 2): with :math:`dP = dO\,V^\top`,
:math:`D_i = \sum_c dO_{ic} O_{ic}` (= :math:`\sum_c P_{ic}\,dP_{ic}`) and
:math:`dS = P \circ (dP - D)`,

.. math:: dV = P^\top dO,\qquad dK = s\,dS^\top Q,\qquad dQ = s\,dS\,K.

One kernel walks the query blocks for each key block (accumulating :math:`dK, dV`), another walks
the key blocks for each query block (accumulating :math:`dQ`); neither stores :math:`P`.
``backward="math"`` instead recomputes the forward through the math path and differentiates it with
autograd: simpler, equally exact, but it builds the ``(N, M)`` matrix during the backward.

What the kernels accept: ``N`` and ``M`` of any size (the last blocks are masked), head widths up to
512 (padded to a power of two, at least 16, the padding masked), float32 / float16 / bfloat16
(accumulation in float32), any strides (passed to the kernel: transposed views cost no copy), an
optional mask broadcastable to ``(B, heads, N, M)`` (bool: True = may attend; float: added to the
scores; broadcast dimensions get stride 0, so a ``(B, 1, 1, M)`` padding mask is never expanded in
memory). A query row with no allowed key gets output 0 and ``lse = -inf`` (the math path gives NaN
there; the attention API calls such rows undefined).

Triton compiles the kernels for CUDA GPUs. Without one they run in Triton's interpreter on CPU
tensors (numpy, hundreds of times slower than torch; for teaching and tests at small sizes), which
``TRITON_INTERPRET=1`` selects. Set it at the start of the process, before anything imports triton
(transformers does): ``@triton.jit`` decides when it decorates whether to compile or interpret, and
Triton's own helpers are decorated at ``import triton``. This module imports triton and builds its
kernels only when one first runs, so importing it (or the models) imports no triton;
:func:`unavailable_reason` says, without importing anything, why the kernels cannot run on a device.
In the interpreter, ``tl.dot`` on bfloat16 is wrong, so bfloat16 tiles are cast to float32 before
every product there.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
from types import SimpleNamespace

import torch

__all__ = [
    "FlashAttentionFunction",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_forward",
    "interpreted",
    "unavailable_reason",
]

LOG2E = 1.4426950408889634  # log2(e): e^x = 2^(x log2 e)
MAX_HEAD_DIM = 512  # the SD VAE attends with one 512-wide head
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ============================================================================================ kernels


@functools.cache
def _kernels() -> SimpleNamespace:
    """Import triton and build (decorate) the kernels, once, at their first use: importing this
    module never imports triton, and TRITON_INTERPRET is read then.

    ``forward``: one program per (block of BLOCK_M queries, batch x head), streaming the key blocks.
    ``backward_dkdv``: one program per (block of BLOCK_N keys, batch x head), streaming the query
    blocks. ``backward_dq``: one per query block, streaming the key blocks. Every tile is read through
    its tensor's strides and masked at the edges (``N``, ``M``, ``d`` need not fill a tile). The
    kernels call no helper functions of their own: the interpreter cannot see functions defined
    beside them here, and calls into nested jit functions are slow there."""
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    @triton.jit
    def forward(
        Q, K, V, Mask, Out, Lse,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_km, stride_kd,
        stride_vb, stride_vh, stride_vm, stride_vd,
        stride_mb, stride_mh, stride_mn, stride_mm,
        stride_ob, stride_oh, stride_on, stride_od,
        H, N, M, D, DV,
        qk_scale,  # s * log2(e): the kernels work in base 2
        MASK_KIND: tl.constexpr,  # 0: none, 1: bool (uint8, nonzero = may attend), 2: added to scores
        UPCAST: tl.constexpr,  # cast tiles to float32 before tl.dot (bf16 in the interpreter)
        PRECISION: tl.constexpr,  # tl.dot precision for float32: "ieee" or "tf32" (None: default)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)  # int64: batch * stride can pass 2**31 on big tensors
        h = (pid_bh % H).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dk = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        row_ok = rows < N
        q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dk[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (dk[None, :] < D), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        m_base = Mask + b * stride_mb + h * stride_mh

        # Running row maximum m, row sum l and output a: float32, base 2.
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for start in range(0, M, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < M
            ok = row_ok[:, None] & col_ok[None, :]
            # K^T (BLOCK_D, BLOCK_N) read through the strides: no transposed copy.
            kt_ptrs = k_base + cols[None, :] * stride_km + dk[:, None] * stride_kd
            kt = tl.load(kt_ptrs, mask=col_ok[None, :] & (dk[:, None] < D), other=0.0)
            v_ptrs = v_base + cols[:, None] * stride_vm + dv[None, :] * stride_vd
            v = tl.load(v_ptrs, mask=col_ok[:, None] & (dv[None, :] < DV), other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
                v = v.to(tl.float32)
            # S = s Q K^T + mask (base 2); -inf where the mask forbids and past the edges.
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            if MASK_KIND != 0:
                mask = tl.load(
                    m_base + rows[:, None] * stride_mn + cols[None, :] * stride_mm, mask=ok, other=0
                )
                if MASK_KIND == 1:
                    s = tl.where(mask != 0, s, float("-inf"))
                else:
                    s = s + mask.to(tl.float32) * 1.4426950408889634  # log2(e)
            s = tl.where(ok, s, float("-inf"))
            # m' = max(m, rowmax S);  l' = 2^(m - m') l + sum 2^(S - m');  a' likewise, with V.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row whose keys so far are all masked has m' = -inf: shift it by 0 instead, so that
            # 2^(-inf - (-inf)) = NaN never appears (its p and alpha are 0).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        # o = a / l; a row with no allowed key (l = 0) gets 0, and L = -inf.
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        o_ptrs = Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + dv[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
        # L = (m + log2 l) ln 2, natural log.
        lse = (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
        tl.store(Lse + pid_bh.to(tl.int64) * N + rows, tl.where(empty, float("-inf"), lse), mask=row_ok)

    @triton.jit
    def backward_dkdv(
        Q, K, V, Mask, DO, Lse, Delta, DK, DV_,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_km, stride_kd,
        stride_vb, stride_vh, stride_vm, stride_vd,
        stride_mb, stride_mh, stride_mn, stride_mm,
        stride_ob, stride_oh, stride_on, stride_od,  # of dO
        H, N, M, D, DV,
        qk_scale, scale,
        MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):  # fmt: skip
        # Transposed tiles (keys along rows), so that dK and dV come out as (BLOCK_N, d).
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # key indices
        dk = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        col_ok = cols < M
        k_ptrs = K + b * stride_kb + h * stride_kh + cols[:, None] * stride_km + dk[None, :] * stride_kd
        k = tl.load(k_ptrs, mask=col_ok[:, None] & (dk[None, :] < D), other=0.0)
        v_ptrs = V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vm + dv[None, :] * stride_vd
        v = tl.load(v_ptrs, mask=col_ok[:, None] & (dv[None, :] < DV), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_ob + h * stride_oh
        m_base = Mask + b * stride_mb + h * stride_mh
        stats = Lse + pid_bh.to(tl.int64) * N
        deltas = Delta + pid_bh.to(tl.int64) * N

        dk_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for start in range(0, N, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            ok = col_ok[:, None] & row_ok[None, :]
            qt_ptrs = q_base + rows[None, :] * stride_qn + dk[:, None] * stride_qd
            qt = tl.load(qt_ptrs, mask=row_ok[None, :] & (dk[:, None] < D), other=0.0)
            do_ptrs = do_base + rows[:, None] * stride_on + dv[None, :] * stride_od
            do = tl.load(do_ptrs, mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
            if UPCAST:
                qt = qt.to(tl.float32)
                do = do.to(tl.float32)
            # L in base 2; past the edge or for a row with no allowed key, +inf, so that P = 0 there.
            lse = tl.load(stats + rows, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
            delta = tl.load(deltas + rows, mask=row_ok, other=0.0)
            # S^T = s K Q^T + mask^T (BLOCK_N, BLOCK_M), masked as in the forward.
            st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale
            if MASK_KIND != 0:
                mask = tl.load(
                    m_base + cols[:, None] * stride_mm + rows[None, :] * stride_mn, mask=ok, other=0
                )
                if MASK_KIND == 1:
                    st = tl.where(mask != 0, st, float("-inf"))
                else:
                    st = st + mask.to(tl.float32) * 1.4426950408889634
            st = tl.where(ok, st, float("-inf"))
            pt = tl.math.exp2(st - lse[None, :])  # P^T = 2^(S^T - L)
            # dV += P^T dO
            dv_acc += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            # dP^T = V dO^T;  dS^T = P^T (dP^T - D);  dK += dS^T Q
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk_acc += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)

        dk_ptrs = DK + pid_bh.to(tl.int64) * M * D + cols[:, None] * D + dk[None, :]
        tl.store(dk_ptrs, (dk_acc * scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & (dk[None, :] < D))
        dv_ptrs = DV_ + pid_bh.to(tl.int64) * M * DV + cols[:, None] * DV + dv[None, :]
        tl.store(dv_ptrs, dv_acc.to(DV_.dtype.element_ty), mask=col_ok[:, None] & (dv[None, :] < DV))

    @triton.jit
    def backward_dq(
        Q, K, V, Mask, DO, Lse, Delta, DQ,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_km, stride_kd,
        stride_vb, stride_vh, stride_vm, stride_vd,
        stride_mb, stride_mh, stride_mn, stride_mm,
        stride_ob, stride_oh, stride_on, stride_od,  # of dO
        H, N, M, D, DV,
        qk_scale, scale,
        MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dk = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        row_ok = rows < N
        q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dk[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (dk[None, :] < D), other=0.0)
        do_ptrs = DO + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + dv[None, :] * stride_od
        do = tl.load(do_ptrs, mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(Lse + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(Delta + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        m_base = Mask + b * stride_mb + h * stride_mh

        dq_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start in range(0, M, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < M
            ok = row_ok[:, None] & col_ok[None, :]
            kt_ptrs = k_base + cols[None, :] * stride_km + dk[:, None] * stride_kd
            kt = tl.load(kt_ptrs, mask=col_ok[None, :] & (dk[:, None] < D), other=0.0)
            vt_ptrs = v_base + cols[None, :] * stride_vm + dv[:, None] * stride_vd
            vt = tl.load(vt_ptrs, mask=col_ok[None, :] & (dv[:, None] < DV), other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            if MASK_KIND != 0:
                mask = tl.load(
                    m_base + rows[:, None] * stride_mn + cols[None, :] * stride_mm, mask=ok, other=0
                )
                if MASK_KIND == 1:
                    s = tl.where(mask != 0, s, float("-inf"))
                else:
                    s = s + mask.to(tl.float32) * 1.4426950408889634
            s = tl.where(ok, s, float("-inf"))
            p = tl.math.exp2(s - lse[:, None])
            # dP = dO V^T;  dS = P (dP - D);  dQ += dS K
            dp = tl.dot(do, vt, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq_acc += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)

        dq_ptrs = DQ + pid_bh.to(tl.int64) * N * D + rows[:, None] * D + dk[None, :]
        tl.store(dq_ptrs, (dq_acc * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (dk[None, :] < D))

    # The interpreter needs both these kernels and Triton's own jit helpers (tl.zeros, tl.max: built
    # at `import triton`) to have been decorated with TRITON_INTERPRET=1.
    interpreted = isinstance(forward, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)
    return SimpleNamespace(
        forward=forward, backward_dkdv=backward_dkdv, backward_dq=backward_dq, interpreted=interpreted
    )


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the kernels cannot run on ``device`` in this process (a sentence), or None if they can.
    Imports nothing: it reads what the process has imported and its environment."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; it runs on CUDA GPUs)"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device.type != "cpu":
        return (
            f"Triton kernels run on CUDA tensors (or on CPU tensors in its interpreter), not on {device.type}"
        )
    # On the CPU only Triton's interpreter runs kernels; @triton.jit picks compile or interpret when
    # it decorates: Triton's own helpers at `import triton`, these kernels at their first use.
    if _kernels.cache_info().currsize:
        if _kernels().interpreted:
            return None
        return (
            "the kernels were built for GPUs (TRITON_INTERPRET=1 was not set, or set after triton was "
            "imported); set it at the start of the process to run them on the CPU in Triton's interpreter"
        )
    triton = sys.modules.get("triton")
    if triton is not None:
        standard = sys.modules.get("triton.language.standard")
        if type(getattr(standard, "zeros", None)).__name__ != "InterpretedFunction":
            return (
                "triton was imported in this process before TRITON_INTERPRET=1 was set (transformers "
                "imports it, for one), so it compiles for GPUs; set TRITON_INTERPRET=1 at the start of the "
                "process, before anything imports triton, to run its kernels on the CPU in its interpreter"
            )
        interpret = bool(triton.knobs.runtime.interpret)  # the variable, or an override set in-process
    else:
        interpret = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
    if not interpret:
        return (
            "on the CPU, Triton kernels run only in Triton's interpreter: set TRITON_INTERPRET=1 at "
            "the start of the process, before anything imports triton (slow: for small inputs)"
        )
    return None


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (builds them if they are not yet built)."""
    return _kernels().interpreted


# ============================================================================================ checks


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> float:
    """ValueError for anything the kernels cannot take, before any work; returns the scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be 4-D (B, heads, N, d); got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "q (B, H, N, d), k (B, H, M, d), v (B, H, M, d_v) disagree: got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if min(q.shape) == 0 or k.shape[2] == 0:
        raise ValueError(f"empty inputs: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    d, dv = q.shape[-1], v.shape[-1]
    if max(d, dv) > MAX_HEAD_DIM:
        raise ValueError(f"head width d={d}, d_v={dv}: the kernels take at most {MAX_HEAD_DIM}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        allowed = ", ".join(str(t) for t in DTYPES)
        raise ValueError(
            f"q, k, v must share one dtype out of {allowed}; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise ValueError(f"mask must be bool (True = may attend) or float (added), got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device}, q on {q.device}: they must be on one device")
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            torch.broadcast_shapes(mask.shape, target)
            ok = mask.ndim <= 4 and torch.broadcast_shapes(mask.shape, target) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to (B, H, N, M) = {target}"
            )
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"scale={scale!r} must be a finite number (or None for 1/sqrt(d))")
    reason = unavailable_reason(q.device)
    if reason is not None:
        raise ValueError(f"the Triton flash-attention kernels cannot run on {q.device}: {reason}")
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def _check_block(option: str, value: int | None) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1)
    ):
        raise ValueError(f"{option}={value!r} must be a power of two >= 16")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # tl.dot wants every block side >= 16


def _launch_config(d: int, dv: int, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): fixed choices (autotuning does not exist in the
    interpreter); smaller tiles for wider heads, so that they fit in registers and shared memory."""
    if _kernels().interpreted:
        return 32, 32, 1, 1  # numpy works a tile at a time: fewer, bigger tiles run faster
    width = max(_next_pow2(d), _next_pow2(dv))
    if width <= 64:
        return 64, 64, 4, 3
    if width <= 128:
        return (32, 32, 4, 2) if backward else (64, 32, 4, 2)
    if width <= 256:
        return 32, 32, 8, 2
    return 16, 16, 8, 1  # the VAE's single 512-wide head


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor, shape: tuple[int, int, int, int]):
    """(tensor, strides, kind) for the kernels: the mask broadcast by strides (0 on broadcast
    dimensions, no copy); bool viewed as uint8."""
    if mask is None:
        return q, (0, 0, 0, 0), 0
    mask = mask.expand(shape)
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), mask.stride(), 1
    return mask, mask.stride(), 2


def _precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input precision: float32 follows torch's switch for matmuls (off by default: IEEE
    products, not TF32); half types use Triton's default (it only concerns float32 operands)."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# ============================================================================================ forward


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The forward kernel alone (no autograd): returns ``out`` ``(B, H, N, d_v)`` in ``q``'s dtype and
    ``lse`` ``(B, H, N)`` float32, :math:`L_i = \log\sum_c e^{S_{ic}}` with
    :math:`S = s\,QK^\top + \text{mask}`.

    ``block_m``/``block_n`` (powers of two >= 16) override the tile sizes; tests use small tiles
    so that small inputs span several blocks and ragged last blocks.
    """
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    scale = _check_inputs(q, k, v, mask, scale)
    B, H, N, D = q.shape
    M, DV = k.shape[2], v.shape[-1]
    kernels = _kernels()
    bm, bn, warps, stages = _launch_config(D, DV, backward=False)
    bm, bn = block_m or bm, block_n or bn
    out = torch.empty(B, H, N, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    mask_t, ms, kind = _mask_args(mask, q, (B, H, N, M))
    grid = (_cdiv(N, bm), B * H)
    kernels.forward[grid](
        q, k, v, mask_t, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
        H, N, M, D, DV,
        scale * LOG2E,
        MASK_KIND=kind,
        UPCAST=kernels.interpreted and q.dtype == torch.bfloat16,
        PRECISION=_precision(q.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_next_pow2(D), BLOCK_DV=_next_pow2(DV),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


# =========================================================================================== backward


def flash_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The backward kernels (FlashAttention-2, Dao 2023, arXiv 2307.08691, Algorithm 2): from
    :math:`dO` and the forward's ``out`` and ``lse``, returns :math:`(dQ, dK, dV)`, contiguous, in
    ``q``'s dtype. :math:`D = \mathrm{rowsum}(dO \circ O)` is one elementwise product in torch."""
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    scale = _check_inputs(q, k, v, mask, scale)
    B, H, N, D = q.shape
    M, DV = k.shape[2], v.shape[-1]
    if dout.shape != (B, H, N, DV) or out.shape != (B, H, N, DV) or lse.shape != (B, H, N):
        raise ValueError(
            f"dout {tuple(dout.shape)}, out {tuple(out.shape)}, lse {tuple(lse.shape)} do not fit "
            f"q {tuple(q.shape)} and v {tuple(v.shape)}"
        )
    kernels = _kernels()
    bm, bn, warps, stages = _launch_config(D, DV, backward=True)
    bm, bn = block_m or bm, block_n or bn
    dout = dout.to(q.dtype)
    # D_i = sum_c dO_ic O_ic = sum_c P_ic dP_ic: O(N d) memory, no kernel needed.
    delta = (dout.float() * out.float()).sum(-1)
    lse = lse.float() if lse.is_contiguous() else lse.float().contiguous()  # the kernels index it flat
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, M, D, dtype=q.dtype, device=q.device)
    dv = torch.empty(B, H, M, DV, dtype=q.dtype, device=q.device)
    mask_t, ms, kind = _mask_args(mask, q, (B, H, N, M))
    common = dict(
        MASK_KIND=kind,
        UPCAST=kernels.interpreted and q.dtype == torch.bfloat16,
        PRECISION=_precision(q.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_next_pow2(D), BLOCK_DV=_next_pow2(DV),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    strides = (*q.stride(), *k.stride(), *v.stride(), *ms, *dout.stride())
    kernels.backward_dkdv[(_cdiv(M, bn), B * H)](
        q, k, v, mask_t, dout, lse, delta, dk, dv, *strides, H, N, M, D, DV, scale * LOG2E, scale, **common
    )
    kernels.backward_dq[(_cdiv(N, bm), B * H)](
        q, k, v, mask_t, dout, lse, delta, dq, *strides, H, N, M, D, DV, scale * LOG2E, scale, **common
    )
    return dq, dk, dv


def _math_reference(q, k, v, mask, scale):
    """softmax(s QK^T + mask) V through the math path (float32 softmax), for the math backward;
    rows with no allowed key give 0, as in the kernel (not NaN)."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    alive = (scores > float("-inf")).any(-1, keepdim=True)
    probs = torch.where(alive, scores, 0.0).softmax(dim=-1, dtype=torch.float32) * alive
    return probs.to(q.dtype) @ v


# ============================================================================================ autograd


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: the Triton forward, and either the Triton backward (``"triton"``) or a
    recomputation through the math path differentiated by autograd (``"math"``, builds the
    ``(N, M)`` matrix). The mask gets no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, block_m, block_n, backward):
        out, lse = flash_attention_forward(q, k, v, mask, scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale, ctx.blocks, ctx.backward = scale, (block_m, block_n), backward
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        if ctx.backward == "triton":
            dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse, mask, ctx.scale, *ctx.blocks)
        else:
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_() for t in (q, k, v)]
                recomputed = _math_reference(*inputs, mask, ctx.scale)
                dq, dk, dv = torch.autograd.grad(recomputed, inputs, dout)
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None) + (None,) * 5


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backward: str = "triton",
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    r""":math:`\mathrm{softmax}(s\,QK^\top + \text{mask})\,V` by the Triton flash-attention kernel,
    differentiable: q ``(B, H, N, d)``, k ``(B, H, M, d)``, v ``(B, H, M, d_v)`` -> ``(B, H, N, d_v)``.

    ``scale`` defaults to :math:`1/\sqrt d`. ``backward="triton"`` uses the FlashAttention-2
    backward kernels; ``"math"`` recomputes the forward through the math path and lets autograd
    differentiate it (the ``(N, M)`` matrix exists during the backward). The mask (bool or float,
    broadcastable to ``(B, H, N, M)``) gets no gradient; a mask that requires one is a ValueError.
    """
    if backward not in ("triton", "math"):
        raise ValueError(f"backward={backward!r} is not supported; expected one of 'triton', 'math'")
    if mask is not None and isinstance(mask, torch.Tensor) and mask.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "the triton attention backend gives the mask no gradient, and this mask requires one: "
            "use the 'math' or 'sdpa' backend for a learned attention bias"
        )
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    scale = _check_inputs(q, k, v, mask, scale)
    return FlashAttentionFunction.apply(q, k, v, mask, scale, block_m, block_n, backward)
