import math

import pytest
import torch

import ldm_lib.models.attention as attn_mod
from ldm_lib.models.attention import (
    Attention,
    attention,
    attention_probs,
    available_backends,
    backend_names,
    register_backend,
    resolve_backend,
)


def qkv(B=2, H=3, N=10, M=7, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, d, generator=g).to(dtype)
    k = torch.randn(B, H, M, d, generator=g).to(dtype)
    v = torch.randn(B, H, M, d + 4, generator=g).to(dtype)  # value width may differ from d
    return q, k, v


def masks(B=2, H=3, N=10, M=7):
    g = torch.Generator().manual_seed(1)
    padding = torch.ones(B, 1, 1, M, dtype=torch.bool)
    padding[0, ..., 4:] = False  # key padding: sample 0 has 4 real tokens
    random = torch.rand(B, H, N, M, generator=g) > 0.3
    random[..., 0] = True  # every query keeps one key, so every row is defined
    additive = torch.randn(N, M, generator=g)  # a float bias, broadcast over batch and heads
    return {"none": None, "padding": padding, "random": random, "additive": additive}


def reference(q, k, v, mask=None):
    """softmax(QK^T / sqrt(d) + mask) V written out in float64."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("mask_kind", ["none", "padding", "random", "additive"])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_backends_match_the_equation_fp32(backend, mask_kind):
    q, k, v = qkv()
    mask = masks()[mask_kind]
    out = attention(q, k, v, backend=backend, mask=mask)
    assert out.shape == (2, 3, 10, 20) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "additive"])
def test_math_and_sdpa_agree_in_bf16(mask_kind):
    q, k, v = qkv(dtype=torch.bfloat16)
    mask = masks()[mask_kind]
    a = attention(q, k, v, backend="math", mask=mask)
    b = attention(q, k, v, backend="sdpa", mask=mask)
    assert a.dtype == b.dtype == torch.bfloat16
    exact = reference(q, k, v, mask)
    # bf16 keeps 8 bits of mantissa: outputs of size ~1 are good to a few 1e-2.
    torch.testing.assert_close(a.double(), exact, rtol=0, atol=3e-2)
    torch.testing.assert_close(b.double(), exact, rtol=0, atol=3e-2)
    torch.testing.assert_close(a, b, rtol=0, atol=3e-2)


def test_gradients_agree_between_math_and_sdpa():
    grads = {}
    for backend in ("math", "sdpa"):
        q, k, v = (t.requires_grad_() for t in qkv())
        attention(q, k, v, backend=backend, mask=masks()["padding"]).square().sum().backward()
        grads[backend] = (q.grad, k.grad, v.grad)
    for a, b in zip(grads["math"], grads["sdpa"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_attention_probs_are_rows_of_a_softmax():
    q, k, _ = qkv()
    mask = masks()["padding"]
    p = attention_probs(q, k, mask=mask)
    assert p.shape == (2, 3, 10, 7)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 10))
    assert (p[0, ..., 4:] == 0).all()  # padded keys get no attention
    # A constant shift of the scores does not change the softmax.
    torch.testing.assert_close(attention_probs(q, k, mask=torch.full((10, 7), 5.0)), attention_probs(q, k))
    torch.testing.assert_close(attention_probs(q, k, scale=0.0), torch.full_like(p, 1 / 7))


def test_auto_is_sdpa_on_cpu_and_explicit_scale_is_used():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert {"math", "sdpa"} <= set(available_backends("cpu"))
    q, k, v = qkv()
    torch.testing.assert_close(
        attention(q, k, v, backend="math", scale=0.3), attention(q, k, v, backend="sdpa", scale=0.3)
    )


def test_unknown_backend_is_a_value_error_listing_the_choices():
    with pytest.raises(ValueError, match=r"backend='flash' is not supported.*'math'.*'sdpa'"):
        attention(*qkv(), backend="flash")
    with pytest.raises(ValueError, match="attention backend"):
        Attention(16, backend="flash")


def test_xformers_on_cpu_is_a_clear_error():
    # On CPU tensors xformers can never run, installed or not: the error names it, says why,
    # and lists what can run.
    assert "xformers" in backend_names()
    assert "xformers" not in available_backends("cpu")
    with pytest.raises(ValueError, match=r"'xformers' cannot run on cpu: .*Usable here: 'math', 'sdpa'"):
        attention(*qkv(), backend="xformers")


@pytest.mark.parametrize("mask_kind", ["none", "padding", "random", "additive"])
def test_xformers_agrees_with_sdpa_on_cuda(mask_kind):
    reason = attn_mod._xformers_unavailable(torch.device("cuda"))
    if reason is None and not torch.cuda.is_available():
        reason = "no CUDA device on this machine"
    if reason is not None:
        pytest.skip(f"xformers backend cannot run here: {reason}")
    mask = masks()[mask_kind]
    q, k, v = (t.cuda() for t in qkv(d=16))  # xformers wants equal q/k/v widths on some kernels
    v = v[..., :16].contiguous()
    mask = None if mask is None else mask.cuda()
    torch.testing.assert_close(
        attention(q, k, v, "xformers", mask), attention(q, k, v, "sdpa", mask), rtol=1e-4, atol=1e-4
    )


def test_a_registered_backend_is_used(monkeypatch):
    monkeypatch.setattr(attn_mod, "_BACKENDS", dict(attn_mod._BACKENDS))
    calls = []

    def counted(q, k, v, mask, scale):
        calls.append(scale)
        return attn_mod._math_attention(q, k, v, mask, scale)

    register_backend("counted", counted, lambda device: None if device.type == "cpu" else "CPU only")
    q, k, v = qkv()
    torch.testing.assert_close(attention(q, k, v, backend="counted"), attention(q, k, v, backend="sdpa"))
    assert calls == [pytest.approx(1 / 4)]
    assert "counted" in available_backends("cpu") and "counted" not in available_backends("meta")
    with pytest.raises(ValueError, match="reserved"):
        register_backend("auto", counted)


def test_shape_errors_name_the_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="disagree"):
        attention(q, k[..., :8], v)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_attention_layer_self_and_cross(backend):
    torch.manual_seed(0)
    layer = Attention(query_dim=24, context_dim=12, heads=4, head_dim=8, backend=backend)
    x, c = torch.randn(2, 9, 24), torch.randn(2, 5, 12)
    out = layer(x, c)
    assert out.shape == (2, 9, 24)
    # By hand: project, split into heads, attend, merge, project out.
    q = layer.to_q(x).view(2, 9, 4, 8).transpose(1, 2)
    k = layer.to_k(c).view(2, 5, 4, 8).transpose(1, 2)
    v = layer.to_v(c).view(2, 5, 4, 8).transpose(1, 2)
    merged = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v).transpose(1, 2).reshape(2, 9, 32)
    torch.testing.assert_close(out, layer.to_out(merged), rtol=1e-5, atol=1e-5)
    assert sorted(dict(layer.named_parameters())) == [
        "to_k.weight", "to_out.0.bias", "to_out.0.weight", "to_q.weight", "to_v.weight"
    ]  # fmt: skip
    self_layer = Attention(query_dim=24, heads=3, head_dim=8, backend=backend)
    assert self_layer(x).shape == (2, 9, 24)
