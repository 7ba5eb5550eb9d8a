"""The Triton flash-attention kernel (``ldm_lib.kernels.flash_attention``, attention backend
``"triton"``) against the equation: forward, log-sum-exp and gradients; float32, float16, bfloat16;
ragged sizes (N, M not multiples of the tile), cross-attention, head widths that need padding,
strided views, every kind of mask; the backend, the attention layer, a UNet and a training config.

On a machine without CUDA the kernels run in Triton's interpreter, which needs TRITON_INTERPRET=1
before anything imports triton. When this module is the first to import triton, it imports it in
interpreter mode; when something imported triton earlier in this process (transformers does, and
pytest imports every test module at collection), the kernel tests are skipped here and
`test_kernel_checks_in_a_fresh_process` runs this file again in a fresh interpreter. On CUDA the same tests
run compiled, plus a few at realistic sizes.
"""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from triton_fresh_process import rerun_with_interpreter

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON = importlib.util.find_spec("triton") is not None
if TRITON and not CUDA and "triton" not in sys.modules:
    # Import triton in interpreter mode, and keep the mode on with triton's own switch, so that the
    # variable does not leak into subprocesses and notebook kernels that later tests start.
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import triton

    triton.knobs.runtime.interpret = True
    if before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = before

# Neither imports triton: the kernels' module imports it when a kernel first runs.
import ldm_lib.kernels.flash_attention as fa  # noqa: E402
from ldm_lib.models.attention import Attention, attention, available_backends, backend_names  # noqa: E402

REASON = fa.unavailable_reason(DEVICE)
FRESH = "LDM_FLASH_ATTENTION_FRESH_PROCESS"  # set in the fresh process, so that it cannot recurse
needs_kernels = pytest.mark.skipif(
    REASON is not None,
    reason=f"the triton backend cannot run in this process ({REASON}); "
    "test_kernel_checks_in_a_fresh_process runs these tests",
)
parent_only = pytest.mark.skipif(bool(os.environ.get(FRESH)), reason="runs in the parent process")
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # on outputs of size ~1


def tensors(*shapes, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g).to(device=DEVICE, dtype=dtype) for s in shapes]
    return [t.requires_grad_() for t in out] if grad else out


def reference(q, k, v, mask=None, scale=None):
    """softmax(s QK^T + mask) V in float64 from the same (rounded) inputs; a row with no allowed
    key gives 0, as the kernel defines it. Differentiable."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    alive = (s > -math.inf).any(-1, keepdim=True)
    return torch.where(alive, s, 0.0).softmax(-1) * alive @ v, torch.where(alive, s, 0.0).logsumexp(-1)


def masks(B, H, N, M, seed=1):
    """Every kind of mask the backend takes, with the edge cases that break a naive kernel."""
    g = torch.Generator().manual_seed(seed)
    padding = torch.ones(B, 1, 1, M, dtype=torch.bool)
    padding[0, ..., 5:] = False  # text padding: sample 0 has 5 real tokens (the rest of its blocks masked)
    random = torch.rand(B, H, N, M, generator=g) > 0.4
    random[..., 0, :16] = False  # row 0: the whole first key block masked (m stays -inf through it)
    random[-1, :, 3, :] = False  # row 3 of the last sample: no allowed key at all
    additive = torch.randn(N, M, generator=g)  # a bias broadcast over batch and heads
    minus_inf = torch.zeros(B, 1, N, M).masked_fill(torch.rand(B, 1, N, M, generator=g) > 0.7, -math.inf)
    minus_inf[..., 0] = 0.0
    out = {"padding": padding, "random": random, "additive": additive, "additive -inf": minus_inf}
    return {name: m.to(DEVICE) for name, m in out.items()}


def grads_of(fn, inputs, dout):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(dout)
    return out.detach(), [t.grad for t in inputs]


# ------------------------------------------------------------------------------------ forward


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_logsumexp_match_the_equation(dtype):
    # N = 37, M = 23 with 16-wide tiles: 3 query blocks, 2 key blocks, ragged last ones; d = 24
    # is padded to 32 and d_v = 20 differs from it.
    q, k, v = tensors((2, 2, 37, 24), (2, 2, 23, 24), (2, 2, 23, 20), dtype=dtype)
    out, lse = fa.flash_attention_forward(q, k, v, block_m=16, block_n=16)
    assert out.shape == (2, 2, 37, 20) and out.dtype == dtype and lse.dtype == torch.float32
    exact, exact_lse = reference(q, k, v)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=TOL[dtype])
    torch.testing.assert_close(lse.double(), exact_lse, rtol=0, atol=1e-5)
    math_out = attention(q, k, v, backend="math")
    torch.testing.assert_close(out.float(), math_out.float(), rtol=0, atol=2 * TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("d", [8, 40, 160, 512])
def test_head_widths_are_padded(d):
    # 8 -> 16 (tl.dot's minimum), 40 -> 64, 160 -> 256, 512 (the VAE): padded lanes must not leak in.
    q, k, v = tensors((1, 2, 17, d), (1, 2, 17, d), (1, 2, 17, d), seed=d)
    out, lse = fa.flash_attention_forward(q, k, v, block_m=16, block_n=16)
    exact, exact_lse = reference(q, k, v)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double(), exact_lse, rtol=0, atol=2e-5)


@needs_kernels
def test_given_scale_and_default_tiles():
    q, k, v = tensors((1, 2, 33, 16), (1, 2, 20, 16), (1, 2, 20, 16), seed=3)
    for scale in (0.3, 0.0):  # scale 0: every key equally likely
        out = fa.flash_attention(q, k, v, scale=scale)  # default tiles
        torch.testing.assert_close(out.double(), reference(q, k, v, scale=scale)[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(
        fa.flash_attention(q, k, v, scale=0.0), v.mean(2, keepdim=True).expand(1, 2, 33, 16)
    )


@needs_kernels
@pytest.mark.parametrize("kind", ["padding", "random", "additive", "additive -inf"])
def test_masks_forward_and_gradients(kind):
    B, H, N, M = 2, 2, 33, 20
    mask = masks(B, H, N, M)[kind]
    q, k, v = tensors((B, H, N, 16), (B, H, M, 16), (B, H, M, 16), seed=4)
    dout = tensors((B, H, N, 16), seed=5)[0]
    out, grads = grads_of(lambda *a: fa.flash_attention(*a, mask, block_m=16, block_n=16), (q, k, v), dout)
    exact, exact_grads = grads_of(lambda *a: reference(*a, mask)[0], (q, k, v), dout.double())
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-5)
    for name, got, want in zip("qkv", grads, exact_grads, strict=True):
        assert got.isfinite().all(), name
        torch.testing.assert_close(
            got.double(), want.double(), rtol=0, atol=5e-5, msg=f"d{name}, {kind} mask"
        )
    if kind == "random":  # the row with no allowed key: output 0, lse -inf, no gradient
        _, lse = fa.flash_attention_forward(q, k, v, mask, block_m=16, block_n=16)
        assert (out[-1, :, 3] == 0).all() and (lse[-1, :, 3] == -math.inf).all()
        assert (grads[0][-1, :, 3] == 0).all()
    if kind == "padding":  # padded keys get no attention, so no value gradient
        assert (grads[2][0, :, 5:] == 0).all()


@needs_kernels
def test_cross_attention_to_77_text_tokens_in_half_precision():
    # The UNet's cross-attention: image tokens attend to 77 CLIP tokens (5 tiles of 16, the last
    # ragged), half precision, with a padding mask after the real tokens.
    q, k, v = tensors((2, 1, 20, 16), (2, 1, 77, 16), (2, 1, 77, 16), dtype=torch.float16, seed=6)
    mask = torch.ones(2, 1, 1, 77, dtype=torch.bool, device=DEVICE)
    mask[1, ..., 9:] = False
    dout = tensors((2, 1, 20, 16), dtype=torch.float16, seed=7)[0]
    out, grads = grads_of(lambda *a: fa.flash_attention(*a, mask, block_m=16, block_n=16), (q, k, v), dout)
    exact, exact_grads = grads_of(lambda *a: reference(*a, mask)[0], (q, k, v), dout.double())
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=4e-3)
    for got, want in zip(grads, exact_grads, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-2)


# ----------------------------------------------------------------------------------- gradients


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backward", ["triton", "math"])
def test_both_backwards_match_autograd_through_the_equation(dtype, backward):
    q, k, v = tensors((1, 2, 33, 24), (1, 2, 20, 24), (1, 2, 20, 8), dtype=dtype, seed=8)
    dout = tensors((1, 2, 33, 8), dtype=dtype, seed=9)[0]
    run = lambda *a: fa.flash_attention(*a, backward=backward, block_m=16, block_n=16)  # noqa: E731
    _, grads = grads_of(run, (q, k, v), dout)
    _, exact = grads_of(lambda *a: reference(*a)[0], (q, k, v), dout.double())
    atol = 5e-5 if dtype == torch.float32 else 6e-2
    for name, got, want in zip("qkv", grads, exact, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(
            got.double(), want.double(), rtol=0, atol=atol, msg=f"d{name} ({backward})"
        )


@needs_kernels
def test_only_requested_gradients_and_no_grad_mode():
    q, k, v = tensors((1, 1, 17, 16), (1, 1, 17, 16), (1, 1, 17, 16), seed=10)
    k.requires_grad_()
    fa.flash_attention(q, k, v).sum().backward()
    assert q.grad is None and v.grad is None and k.grad is not None
    with torch.no_grad():
        assert not fa.flash_attention(q, k, v).requires_grad


# ------------------------------------------------------------------------------ strides, no copies


@needs_kernels
def test_strided_views_are_read_in_place(monkeypatch):
    B, H, N, M, d = 2, 2, 21, 18, 16
    g = torch.Generator().manual_seed(11)
    # What Attention.split_heads makes: (B, N, H, d) storage seen as (B, H, N, d).
    q = torch.randn(B, N, H, d, generator=g).to(DEVICE).transpose(1, 2)
    # Head width not the fastest axis: k stored as (B, H, d, M).
    k = torch.randn(B, H, d, M, generator=g).to(DEVICE).transpose(-1, -2)
    # v a slice of a wider tensor, dO a transposed view too.
    v = torch.randn(B, H, M, 2 * d, generator=g).to(DEVICE)[..., ::2]
    dout = torch.randn(B, N, H, d, generator=g).to(DEVICE).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, dout)) and k.stride(-1) != 1
    exact, exact_grads = grads_of(lambda *a: reference(*a)[0], (q, k, v), dout.double())

    def no_copies(self, *args, **kwargs):
        raise AssertionError("the kernel wrapper made a contiguous copy")

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # views, not copies
    assert [t.stride() for t in leaves] == [t.stride() for t in (q, k, v)]
    monkeypatch.setattr(torch.Tensor, "contiguous", no_copies)
    out = fa.flash_attention(*leaves, block_m=16, block_n=16)
    out.backward(dout)
    monkeypatch.undo()
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-5)
    for got, want in zip((t.grad for t in leaves), exact_grads, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=5e-5)


# ---------------------------------------------------------------------------------------- errors


@parent_only
@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_bad_inputs_are_value_errors_before_any_work():
    q, k, v = tensors((1, 2, 8, 16), (1, 2, 5, 16), (1, 2, 5, 16))
    cases = [
        ((q[0], k[0], v[0]), {}, "4-D"),
        ((q, k[..., :8], v), {}, "disagree"),
        ((q, k[:, :1], v), {}, "disagree"),
        ((q.double(), k.double(), v.double()), {}, "dtype"),
        ((q, k.half(), v), {}, "share one dtype"),
        ((q, k, v), {"mask": torch.ones(3, 5, dtype=torch.bool, device=DEVICE)}, "does not broadcast"),
        ((q, k, v), {"mask": torch.ones(8, 5, dtype=torch.int64, device=DEVICE)}, "bool .* or float"),
        ((q, k, v), {"scale": float("nan")}, "finite"),
        ((q, k, v), {"block_m": 24}, "power of two"),
        ((q, k, v), {"backward": "cuda"}, "backward='cuda'"),
        ((q, k, v), {"mask": torch.zeros(8, 5, device=DEVICE, requires_grad=True)}, "no gradient"),
    ]
    wide = tensors((1, 1, 4, 520), dtype=torch.float32)[0]
    cases.append(((wide, wide, wide), {}, "at most 512"))
    if DEVICE == "cpu":
        cases.append(((q, k.to("meta"), v), {}, "one device"))
    for args, kwargs, words in cases:
        with pytest.raises(ValueError, match=words):
            fa.flash_attention(*args, **kwargs)


# ------------------------------------------------------------------------ backend, layer, models


@needs_kernels
def test_attention_backend_and_layer_match_math():
    assert "triton" in available_backends(DEVICE)
    q, k, v = tensors((2, 2, 19, 16), (2, 2, 11, 16), (2, 2, 11, 16), seed=12)
    mask = torch.ones(2, 1, 1, 11, dtype=torch.bool, device=DEVICE)
    mask[0, ..., 6:] = False
    for m in (None, mask):
        torch.testing.assert_close(
            attention(q, k, v, backend="triton", mask=m), attention(q, k, v, backend="math", mask=m)
        )
    torch.manual_seed(0)
    layer = Attention(query_dim=24, context_dim=12, heads=2, head_dim=16, backend="math").to(DEVICE)
    x, c = tensors((2, 19, 24), (2, 11, 12), seed=13)
    results = {}
    for backend in ("math", "triton"):
        layer.backend = backend
        layer.zero_grad()
        out = layer(x, c)
        out.square().sum().backward()
        results[backend] = (out.detach(), [p.grad.clone() for p in layer.parameters()])
    torch.testing.assert_close(results["triton"][0], results["math"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results["triton"][1], results["math"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernels
def test_tiny_unet_with_the_triton_backend_matches_math():
    from ldm_lib.models.presets import unet_config
    from ldm_lib.models.unet import UNet

    torch.manual_seed(0)
    model = UNet(unet_config("course_tiny", attention_backend="triton")).to(DEVICE).eval()
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised output layers would hide the attention
            p.copy_(0.2 * torch.randn_like(p))
    x, context = tensors((1, 4, 4, 4), (1, 5, 128), seed=14)
    t = torch.tensor([500], device=DEVICE)
    with torch.no_grad():
        out = model(x, t, context)
        model.set_attention_backend("math")
        expected = model(x, t, context)
    assert expected.abs().max() > 0.1  # the comparison means something
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@parent_only
def test_training_config_accepts_the_triton_backend():
    from ldm_lib.training.config import ConfigError, config_from_dict, load_config

    assert "triton" in backend_names()
    config = config_from_dict({"model": {"attention_backend": "triton"}}, check_paths=False)
    assert config.model.attention_backend == "triton"
    assert load_config(None, ["model.attention_backend=triton"]).model.attention_backend == "triton"
    with pytest.raises(ConfigError, match="'triton'"):
        load_config(None, ["model.attention_backend=flash"])


# --------------------------------------------------------------------- laziness, availability


@parent_only
def test_registration_is_lazy_and_unavailability_says_why():
    # In fresh processes: importing the library (the backend registered) imports no triton; on a
    # CPU the backend is unavailable without the variable, or when triton came first.
    code = (
        "import sys, torch, ldm_lib, ldm_lib.models, ldm_lib.exercises, ldm_lib.kernels.flash_attention\n"
        "from ldm_lib.models.attention import available_backends, backend_names, _triton_unavailable\n"
        "assert 'triton' in backend_names() and 'triton' not in sys.modules\n"
        "print('cpu:', _triton_unavailable(torch.device('cpu')))\n"
        "print('meta:', _triton_unavailable(torch.device('meta')))\n"
        "assert 'triton' not in sys.modules\n"
        "if len(sys.argv) > 1:\n"
        "    import os, triton\n"
        "    os.environ['TRITON_INTERPRET'] = '1'\n"
        "    print('late:', _triton_unavailable(torch.device('cpu')))\n"
    )
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env
    )
    result = run("late") if TRITON else run()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "meta: Triton kernels run on CUDA tensors" in out or not TRITON
    if not TRITON:
        assert "cpu: triton is not installed" in out
    elif not CUDA:
        assert (
            "cpu: on the CPU, Triton kernels run only in Triton's interpreter: set TRITON_INTERPRET=1" in out
        )
        assert "late: triton was imported in this process before TRITON_INTERPRET=1 was set" in out


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_kernel_checks_in_a_fresh_process():
    rerun_with_interpreter(__file__, FRESH, REASON, CUDA)


# ------------------------------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not CUDA or REASON is not None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("N", "M", "d"), [(1024, 1024, 64), (4096, 77, 40), (256, 256, 160), (1024, 1024, 512)]
)
def test_realistic_sizes_on_cuda_match_sdpa(dtype, N, M, d):
    B, H = (2, 8) if d <= 160 else (1, 1)  # the last: the VAE's single 512-wide head
    q, k, v = tensors((B, H, N, d), (B, H, M, d), (B, H, M, d), dtype=dtype, seed=15)
    dout = tensors((B, H, N, d), dtype=dtype, seed=16)[0]
    out, grads = grads_of(fa.flash_attention, (q, k, v), dout)
    want, want_grads = grads_of(
        lambda *a: torch.nn.functional.scaled_dot_product_attention(*(t.float() for t in a)),
        (q, k, v),
        dout.float(),
    )
    torch.testing.assert_close(out.float(), want, rtol=0, atol=2 * TOL[dtype])
    for got, exact in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.float(), exact, rtol=0, atol=10 * TOL[dtype])
