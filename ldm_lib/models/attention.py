r"""Scaled dot-product attention with selectable backends, and the multi-head attention layer.

Attention (Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762, eq. 1) lets every
query read a weighted average of the values, weighted by how well the query matches each key:

.. math:: \mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\Big(\frac{QK^\top}{\sqrt d}\Big)\,V

All backends compute this same function on tensors shaped ``(B, heads, N, d)`` (queries) and
``(B, heads, M, d)`` (keys, values); they differ only in how:

- ``"math"``: the equation written out, for teaching. It builds the full ``(N, M)`` matrix of
  attention probabilities, so memory grows with :math:`N M`.
- ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention`, which picks a fused kernel
  (FlashAttention, memory-efficient, or math) for the device and dtype.
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (Rabe & Staats 2021, arXiv 2112.05682),
  only when xformers is installed and the tensors are on CUDA.
- ``"triton"``: the course's own flash-attention kernel, :mod:`ldm_lib.kernels.flash_attention`
  (Dao 2023, arXiv 2307.08691): on CUDA, or on the CPU in Triton's interpreter when
  ``TRITON_INTERPRET=1`` was set before triton was imported (slow: for teaching and tests).

``backend="auto"`` takes xformers where it can run and sdpa otherwise. A backend asked for by name
that cannot run here is a ``ValueError`` that says why and which backends can. A new backend (a
Triton kernel, say) is one function plus :func:`register_backend`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice

# fn(q, k, v, mask, scale) -> out: q (B, H, N, d), k and v (B, H, M, d), mask None or broadcastable
# to (B, H, N, M) (bool: True = may attend; float: added to the scores), scale a float.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    """A registered backend: its function, and a check that returns why it cannot run on a device
    (``None`` when it can)."""

    name: str
    fn: AttentionFn
    unavailable_reason: Callable[[torch.device], str | None]


_BACKENDS: dict[str, AttentionBackend] = {}
# What "auto" tries, in order: the first backend that can run on the tensors' device wins.
AUTO_ORDER: tuple[str, ...] = ("xformers", "sdpa")


def register_backend(
    name: str, fn: AttentionFn, unavailable_reason: Callable[[torch.device], str | None] | None = None
) -> None:
    r"""Make ``fn`` available as ``attention(..., backend=name)``.

    ``fn(q, k, v, mask, scale)`` must return :math:`\mathrm{softmax}(QK^\top s + \text{mask})V`
    shaped like ``q``; ``unavailable_reason(device)`` returns a sentence saying why it cannot run on
    ``device``, or ``None`` if it can (the default: runs everywhere).
    """
    if name == "auto":
        raise ValueError("backend name 'auto' is reserved for automatic selection")
    _BACKENDS[name] = AttentionBackend(name, fn, unavailable_reason or (lambda device: None))


def backend_names() -> tuple[str, ...]:
    """Every registered backend name, whether or not it can run here."""
    return tuple(_BACKENDS)


def available_backends(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The registered backends that can run on ``device``."""
    device = torch.device(device)
    return tuple(n for n, b in _BACKENDS.items() if b.unavailable_reason(device) is None)


def resolve_backend(name: str = "auto", device: torch.device | str = "cpu") -> str:
    """The backend that ``attention(..., backend=name)`` uses for tensors on ``device``.

    ``"auto"`` gives the first usable backend of :data:`AUTO_ORDER` (xformers on CUDA when it is
    installed, else sdpa). A named backend is returned as is if it can run, otherwise this raises
    ``ValueError`` naming it, the reason, and the backends that can run.
    """
    check_choice("backend", name, ("auto", *_BACKENDS))
    device = torch.device(device)
    if name == "auto":
        for candidate in AUTO_ORDER:
            if candidate in _BACKENDS and _BACKENDS[candidate].unavailable_reason(device) is None:
                return candidate
        return "math"
    reason = _BACKENDS[name].unavailable_reason(device)
    if reason is not None:
        usable = ", ".join(repr(n) for n in available_backends(device))
        raise ValueError(
            f"attention backend {name!r} cannot run on {device}: {reason}. "
            f"Usable here: {usable} (or 'auto', which picks one)"
        )
    return name


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "auto",
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    r""":math:`\mathrm{softmax}(QK^\top/\sqrt d + \text{mask})\,V` on ``(B, heads, N, d)`` queries
    and ``(B, heads, M, d)`` keys and values (Vaswani et al. 2017, arXiv 1706.03762, eq. 1).

    ``mask`` broadcasts to ``(B, heads, N, M)``: a bool mask is True where a query may attend to a
    key (as in torch's SDPA); a float mask is added to the scores (``-inf`` forbids). A query row
    with no allowed key has no defined output. ``scale`` defaults to :math:`1/\sqrt d`.
    ``backend`` is ``"auto"`` or a name from :func:`backend_names`; see :func:`resolve_backend`.
    """
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
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = resolve_backend(backend, q.device)
    return _BACKENDS[name].fn(q, k, v, mask, scale)


# ------------------------------------------------------------------------------------------- backends


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""The attention probabilities :math:`P = \mathrm{softmax}(QK^\top/\sqrt d + \text{mask})`,
    shaped ``(B, heads, N, M)``; each row sums to 1 (Vaswani et al. 2017, arXiv 1706.03762, eq. 1).

    Row ``i`` says how much query ``i`` reads from each key: for the UNet's cross-attention, how much
    image position ``i`` looks at each text token (the maps of Hertz et al. 2022, "Prompt-to-Prompt",
    arXiv 2208.01626). The softmax runs in float32 (low-precision scores overflow its exponentials)
    and the result is cast back to ``q``'s dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # S = Q K^T / sqrt(d): how well each query matches each key.
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    # P = softmax(S) over the keys.
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)


def _math_attention(q, k, v, mask, scale):
    r"""The equation written out: :math:`P = \mathrm{softmax}(QK^\top s)`, then :math:`PV`."""
    return attention_probs(q, k, scale, mask) @ v


def _sdpa_attention(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@functools.cache
def _xformers_import_error() -> str | None:
    try:
        import xformers.ops  # noqa: F401
    except Exception as error:  # ImportError, or a broken build raising anything else
        return f"xformers cannot be imported ({type(error).__name__}: {error})"
    return None


def _xformers_unavailable(device: torch.device) -> str | None:
    # The device first: importing xformers beside a CPU torch prints a long warning, for nothing.
    if device.type != "cuda":
        return f"xformers' memory-efficient attention runs only on CUDA tensors, and these are on {device}"
    return _xformers_import_error()


def _xformers_attention(q, k, v, mask, scale):
    import xformers.ops as xops

    B, H, N, M = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    bias = None
    if mask is not None:
        # xformers takes an additive float bias whose last dimension is padded to a multiple of 8
        # (an alignment its kernels require); we fill a padded buffer and pass a view of it.
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        padded = torch.empty(B, H, N, (M + 7) // 8 * 8, dtype=q.dtype, device=q.device)
        bias = padded[..., :M]
        bias.copy_(mask.expand(B, H, N, M))
    # xformers wants (B, N, heads, d), the transpose of our layout.
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    )
    return out.transpose(1, 2)


def _triton_unavailable(device: torch.device) -> str | None:
    # The kernels' module imports triton only when a kernel first runs: importing ldm_lib must not
    # import triton (on a CPU, triton must be imported only after TRITON_INTERPRET=1 is set).
    from ..kernels.flash_attention import unavailable_reason

    return unavailable_reason(device)


def _triton_attention(q, k, v, mask, scale):
    from ..kernels.flash_attention import flash_attention

    return flash_attention(q, k, v, mask, scale)


register_backend("math", _math_attention)
register_backend("sdpa", _sdpa_attention)
register_backend("xformers", _xformers_attention, _xformers_unavailable)
register_backend("triton", _triton_attention, _triton_unavailable)


# ----------------------------------------------------------------------------------------- the layer


class Attention(nn.Module):
    r"""Multi-head attention (Vaswani et al. 2017, arXiv 1706.03762, §3.2.2): self-attention when
    ``context`` is None, cross-attention to ``context`` otherwise (Rombach et al. 2022,
    arXiv 2112.10752, §3.3: :math:`Q = W_Q x`, :math:`K = W_K\,\tau(y)`, :math:`V = W_V\,\tau(y)`).

    .. math:: \mathrm{MultiHead}(x, c) = W_O\,[\mathrm{head}_1; \dots; \mathrm{head}_h],\quad
              \mathrm{head}_i = \mathrm{Attention}(x W_Q^i, c W_K^i, c W_V^i)

    Parameters ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (names as in diffusers' checkpoints).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        head_dim: int = 64,
        bias: bool = False,
        out_bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_choice("attention backend", backend, ("auto", *_BACKENDS))
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.head_dim, self.backend = heads, head_dim, backend
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, heads * d) -> (B, heads, N, d)."""
        B, N, _ = x.shape
        return x.view(B, N, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` (B, N, query_dim), ``context`` (B, M, context_dim) or None -> (B, N, query_dim)."""
        context = x if context is None else context
        q = self.split_heads(self.to_q(x))
        k = self.split_heads(self.to_k(context))
        v = self.split_heads(self.to_v(context))
        out = attention(q, k, v, backend=self.backend, mask=mask)
        B, _, N, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))
