"""The fused GroupNorm + SiLU Triton kernels (``ldm_lib.kernels.groupnorm_silu``) against
``F.silu(F.group_norm(...))``: outputs and the gradients of x, weight and bias; float32, float16,
bfloat16; batch 1 and 3, C/G from 1 up, H*W not a multiple of the tile, 2-D to 5-D inputs,
channels_last and sliced views, no affine; the module switch, a tiny UNet and VAE with it on.

On a machine without CUDA the kernels run in Triton's interpreter, which needs TRITON_INTERPRET=1
before anything imports triton. This module sets it when it is the first to import triton; when
something imported triton earlier in this process (transformers and diffusers do, and pytest imports
every test module at collection), the kernel tests are skipped here and
`test_kernel_checks_in_a_fresh_process` runs this file again in a fresh interpreter. On CUDA the
same tests run compiled, plus one at Stable Diffusion's sizes.
"""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from triton_fresh_process import rerun_with_interpreter  # noqa: E402

import ldm_lib.kernels.groupnorm_silu as gns  # noqa: E402
from ldm_lib.kernels.groupnorm_silu import GroupNormSiLU, group_norm_silu  # noqa: E402

TRITON = importlib.util.find_spec("triton") is not None
REASON = gns.fused_unavailable_reason(DEVICE)
FRESH = "LDM_GROUPNORM_SILU_FRESH_PROCESS"  # set in the fresh process, so that it cannot recurse
needs_kernels = pytest.mark.skipif(
    REASON is not None,
    reason=f"the fused kernel cannot run in this process ({REASON}); "
    "test_kernel_checks_in_a_fresh_process runs these tests",
)
parent_only = pytest.mark.skipif(bool(os.environ.get(FRESH)), reason="runs in the parent process")
# Low precision: the kernel rounds a float32 result once, so it is within about one unit in the
# last place of the float64 truth computed from the same rounded inputs.
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def randn(shape, seed, dtype=torch.float32, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + shift).to(device=DEVICE, dtype=dtype)


def run(fn, x, weight, bias, dy):
    """Output and gradients (x, weight, bias) of ``fn(x, weight, bias)`` for the upstream gradient ``dy``."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def exact(x, weight, bias, dy, groups, eps=1e-5):
    """The reference in float64 from the same (rounded) inputs."""
    d = [t.double() if t is not None else None for t in (x, weight, bias)]
    return run(lambda a, w, b: F.silu(F.group_norm(a, groups, w, b, eps)), d[0], d[1], d[2], dy.double())


def assert_matches(got, want, rtol, atol, names=("y", "dx", "dweight", "dbias")):
    for name, a, b in zip(names, got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------- float32, shapes

SHAPES = {
    # (x shape, groups, block_c, block_s): default tiles hold a whole group; small ones make the
    # kernels loop, with ragged last tiles along channels and positions.
    "batch3_cg2_35pos": ((3, 6, 5, 7), 3, None, None),
    "batch1_cg1_9pos_in_4s": ((1, 4, 3, 3), 4, 1, 4),
    "cg6_in_4s_15pos_in_8s": ((2, 12, 3, 5), 2, 4, 8),
    "one_group_cg8": ((1, 8, 2, 3), 1, None, None),
    "NCL": ((2, 4, 10), 2, None, None),
    "NC": ((3, 6), 3, None, None),
    "NCDHW": ((1, 4, 2, 3, 2), 2, None, None),
}


@needs_kernels
@pytest.mark.parametrize("case", SHAPES.values(), ids=SHAPES.keys())
def test_float32_output_and_gradients_match_torch(case):
    shape, groups, block_c, block_s = case
    C = shape[1]
    x, dy = randn(shape, 0, scale=2.0, shift=0.5), randn(shape, 1)
    weight, bias = randn(C, 2), randn(C, 3)
    fused = run(
        lambda a, w, b: group_norm_silu(a, groups, w, b, block_c=block_c, block_s=block_s),
        x,
        weight,
        bias,
        dy,
    )
    assert fused[0].shape == x.shape and fused[0].dtype == torch.float32
    assert_matches(fused, exact(x, weight, bias, dy, groups), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_variance_is_computed_from_centred_values():
    # mean 1000, std 1: E[x^2] - E[x]^2 in float32 loses about 6% of the variance to cancellation
    # (float32 keeps 7 digits of E[x^2] = 1e6: errors of 5e-2 in y), and x * (gamma r) + (beta - mu gamma r)
    # cancels too (1e-4); the kernels centre first (3e-5, torch's float32 GroupNorm 6e-5).
    x, dy, w, b = randn((2, 4, 6, 5), 4, shift=1000.0), randn((2, 4, 6, 5), 5), randn(4, 6), randn(4, 7)
    fused = run(lambda a, w_, b_: group_norm_silu(a, 2, w_, b_), x, w, b, dy)
    assert_matches(fused, exact(x, w, b, dy, 2), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_without_affine_and_with_weight_only():
    x, dy = randn((2, 6, 4, 3), 8), randn((2, 6, 4, 3), 9)
    module = GroupNormSiLU(3, 6, affine=False, fused=True).to(DEVICE)
    assert module.weight is None and module.bias is None
    y = module(x)
    torch.testing.assert_close(y.double(), F.silu(F.group_norm(x.double(), 3)), rtol=1e-5, atol=1e-5)
    w = randn(6, 10)
    fused = run(lambda a, w_, b_: group_norm_silu(a, 3, w_, None, eps=1e-3), x, w, None, dy)
    assert_matches(fused, exact(x, w, None, dy, 3, eps=1e-3), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- low precision


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("params", ["float32 params", "params in dtype"])
def test_half_precision_within_an_ulp_of_the_truth(dtype, params):
    # float32 parameters with half activations is the mixed-precision case (weights stay float32).
    pdtype = torch.float32 if params == "float32 params" else dtype
    x, dy = randn((3, 6, 5, 7), 11, dtype, scale=2.0, shift=0.5), randn((3, 6, 5, 7), 12, dtype)
    w, b = randn(6, 13, pdtype), randn(6, 14, pdtype)
    y, dx, dw, db = run(lambda a, w_, b_: group_norm_silu(a, 3, w_, b_, block_s=16), x, w, b, dy)
    assert (y.dtype, dx.dtype, dw.dtype, db.dtype) == (dtype, dtype, pdtype, pdtype)
    ey, edx, edw, edb = exact(x, w, b, dy, 3)
    u = ULP[dtype]
    torch.testing.assert_close(y.double(), ey, rtol=u, atol=u)
    torch.testing.assert_close(dx.double(), edx, rtol=u, atol=u * edx.abs().max().item())
    pu = u if pdtype != torch.float32 else 1e-5  # the parameter gradients are summed in float32
    torch.testing.assert_close(dw.double(), edw, rtol=pu, atol=pu * edw.abs().max().item())
    torch.testing.assert_close(db.double(), edb, rtol=pu, atol=pu * edb.abs().max().item())


# ------------------------------------------------------------------------------------- strides


@needs_kernels
def test_channels_last_and_sliced_views_without_copies():
    shape, groups = (2, 8, 5, 6), 4
    w, b = randn(8, 20), randn(8, 21)
    # channels_last: positions equally spaced (stride C), channels adjacent; the output keeps the format.
    x = randn(shape, 22).contiguous(memory_format=torch.channels_last)
    dy = randn(shape, 23).contiguous(memory_format=torch.channels_last)
    fused = run(lambda a, w_, b_: group_norm_silu(a, groups, w_, b_), x, w, b, dy)
    assert fused[0].is_contiguous(memory_format=torch.channels_last)
    assert fused[1].is_contiguous(memory_format=torch.channels_last)
    assert_matches(fused, exact(x, w, b, dy, groups), rtol=1e-5, atol=1e-5)
    # A crop: rows of 6 of 12, so positions are not equally spaced and the kernels use (h, w)
    # strides; the upstream gradient is a transposed view with strides of its own.
    x = randn((2, 8, 7, 12), 24)[:, :, 1:6, 3:9]
    dy = randn((2, 8, 6, 5), 25).transpose(2, 3)
    assert x.shape == dy.shape == shape and not x.is_contiguous() and not dy.is_contiguous()
    assert not gns._strides(x)[0] and not gns._strides(dy)[0]
    fused = run(lambda a, w_, b_: group_norm_silu(a, groups, w_, b_, block_s=8), x, w, b, dy)
    assert_matches(fused, exact(x, w, b, dy, groups), rtol=1e-5, atol=1e-5)


def test_stride_flattening_rule():
    x = torch.empty(2, 8, 5, 6)
    assert gns._strides(x)[0] and gns._strides(x.contiguous(memory_format=torch.channels_last))[0]
    assert gns._strides(x[:, :, :1, ::2])[0]  # one row: any column stride is one step
    assert gns._strides(x[:, :, ::2, :1])[0]  # one column: the row stride is the step
    assert gns._strides(x[:, :, :, ::2])[0]  # every other column: still one step (2) between positions
    assert not gns._strides(x[:, :, :, 1:4])[0] and not gns._strides(x.transpose(2, 3))[0]
    assert gns._strides(x)[1] == [240, 30, 0, 1]
    assert gns._strides(torch.ones(()).expand(2, 8, 5, 6)) == (True, [0, 0, 0, 0])  # the gradient of a sum


# ------------------------------------------------------------------------------------- module


def test_module_off_is_torch_and_keeps_group_norms_state_dict():
    torch.manual_seed(0)
    plain = nn.GroupNorm(2, 6, eps=1e-6)
    nn.init.normal_(plain.weight)
    nn.init.normal_(plain.bias)
    module = GroupNormSiLU(2, 6, eps=1e-6)
    assert isinstance(module, nn.GroupNorm) and not module.fused
    module.load_state_dict(plain.state_dict(), strict=True)
    assert list(module.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 6, 3, 3)
    assert torch.equal(module(x), F.silu(plain(x)))
    module.fused = True
    assert list(module.state_dict()) == ["weight", "bias"] and "fused=True" in repr(module)
    plain.load_state_dict(module.state_dict(), strict=True)


@needs_kernels
def test_module_switch_on_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    off = GroupNormSiLU(4, 8).to(DEVICE)
    nn.init.normal_(off.weight)
    nn.init.normal_(off.bias)
    on = GroupNormSiLU(4, 8, fused=True).to(DEVICE)
    on.load_state_dict(off.state_dict())
    x = randn((3, 8, 4, 5), 30).requires_grad_()
    y_on, y_off = on(x), off(x)
    torch.testing.assert_close(y_on, y_off, rtol=1e-5, atol=1e-5)
    # The gradient of a sum arrives as a broadcast tensor of ones (all strides 0): read as it is.
    g_on = torch.autograd.grad(y_on.sum(), [x, on.weight, on.bias])
    g_off = torch.autograd.grad(y_off.sum(), [x, off.weight, off.bias])
    for a, b in zip(g_on, g_off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------- refusals


def test_refused_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module = GroupNormSiLU(2, 4, fused=True)
    with pytest.raises(
        ValueError, match="cannot run on cpu: .*TRITON_INTERPRET=1.*switch fused_groupnorm_silu off"
    ):
        module(torch.randn(1, 4, 2, 2))
    module.fused = False
    assert module(torch.randn(1, 4, 2, 2)).shape == (1, 4, 2, 2)  # off: torch's ops, anywhere


def test_reasons_name_the_cause_and_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(gns, "_compiled_for_gpu", lambda: True)
    assert "imported before TRITON_INTERPRET=1" in gns.fused_unavailable_reason("cpu")
    assert "not on mps" in gns.fused_unavailable_reason("mps")
    monkeypatch.setattr(gns, "_compiled_for_gpu", lambda: False)
    assert gns.fused_unavailable_reason("cpu") is None
    monkeypatch.setattr(gns, "_triton_installed", lambda: False)
    for device in ("cpu", "cuda"):
        assert "triton is not installed" in gns.fused_unavailable_reason(device)
    with pytest.raises(ValueError, match="triton is not installed"):
        group_norm_silu(torch.randn(1, 4, 2, 2), 2)


def test_bad_inputs_are_refused_before_any_kernel(monkeypatch):
    monkeypatch.setattr(gns, "fused_unavailable_reason", lambda device: None)
    monkeypatch.setattr(gns, "_kernels", None)  # any launch would fail
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match="float64 is not supported.*allowed: torch.float32"):
        group_norm_silu(x.double(), 3)
    with pytest.raises(ValueError, match="num_groups=4 must be a positive divisor of the 6 channels"):
        group_norm_silu(x, 4)
    with pytest.raises(ValueError, match=r"weight must be .* of shape \(6,\)"):
        group_norm_silu(x, 3, torch.ones(3))
    with pytest.raises(ValueError, match=r"x must be \(N, C, \*\)"):
        group_norm_silu(torch.randn(6), 3)
    with pytest.raises(ValueError, match="must be True or False"):
        gns.set_fused(nn.Sequential(GroupNormSiLU(3, 6)), "yes")


@parent_only
def test_importing_the_models_does_not_import_triton():
    code = (
        "import sys, torch\n"
        "import ldm_lib, ldm_lib.models.unet, ldm_lib.models.vae, ldm_lib.training.config\n"
        "from ldm_lib.kernels.groupnorm_silu import GroupNormSiLU, fused_unavailable_reason\n"
        "m = GroupNormSiLU(2, 4)\n"
        "m(torch.randn(1, 4, 2, 2)); fused_unavailable_reason('cpu')\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------------- models


@needs_kernels
def test_tiny_unet_in_channels_last_with_the_kernel_matches_torch():
    from ldm_lib.models.unet import UNet, UNetConfig

    cfg = UNetConfig(
        model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
        context_dim=8, norm_num_groups=2, zero_init=False, attention_backend="math",
    )  # fmt: skip
    torch.manual_seed(0)
    off = UNet(cfg).to(DEVICE)
    on = UNet(dataclasses.replace(cfg, fused_groupnorm_silu=True)).to(DEVICE)
    on.load_state_dict(off.state_dict(), strict=True)
    assert sum(m.fused for m in on.modules() if isinstance(m, GroupNormSiLU)) == 17  # 8 blocks x 2 + out
    on.to(memory_format=torch.channels_last)  # the kernel reads and writes channels_last as it is
    x, t, c = randn((1, 4, 5, 6), 40), torch.tensor([10], device=DEVICE), randn((1, 3, 8), 41)
    y_on = on(x.contiguous(memory_format=torch.channels_last), t, c)
    y_off = off(x, t, c)
    torch.testing.assert_close(y_on, y_off, rtol=1e-4, atol=1e-5)
    y_on.square().mean().backward()
    y_off.square().mean().backward()
    for (name, p), q in zip(on.named_parameters(), off.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@needs_kernels
def test_tiny_vae_with_the_kernel_matches_torch():
    from ldm_lib.models.vae import AutoencoderKL, VAEConfig

    cfg = VAEConfig(
        base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=2, latent_channels=2
    )
    torch.manual_seed(0)
    off = AutoencoderKL(cfg).to(DEVICE).eval()
    on = AutoencoderKL(cfg).to(DEVICE).eval()
    on.load_state_dict(off.state_dict(), strict=True)
    on.set_fused_groupnorm_silu(True)
    assert on.fused_groupnorm_silu and not off.fused_groupnorm_silu
    x = randn((1, 3, 6, 6), 50)
    with torch.no_grad():
        z_on, z_off = on.encode(x).mode(), off.encode(x).mode()
        torch.testing.assert_close(z_on, z_off, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(on.decode(z_off), off.decode(z_off), rtol=1e-4, atol=1e-5)


@needs_kernels
def test_training_config_with_the_switch_validates_where_the_kernel_runs(tmp_path):
    from ldm_lib.training.config import config_from_dict

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    model = {"vae": str(tmp_path / "vae"), "text_encoder": "tiny", "fused_groupnorm_silu": True}
    for stage in ("ldm", "vae"):
        config = config_from_dict({"stage": stage, "device": DEVICE, "model": model})  # no ConfigError
        assert config.model.fused_groupnorm_silu


# ---------------------------------------------------------------------------- fresh process, CUDA


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_kernel_checks_in_a_fresh_process():
    rerun_with_interpreter(__file__, FRESH, REASON, CUDA)


@pytest.mark.skipif(not CUDA or REASON is not None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "groups"), [((2, 320, 64, 64), 32), ((1, 512, 128, 96), 32), ((4, 1280, 8, 8), 32)]
)
def test_stable_diffusion_sizes_on_cuda(dtype, shape, groups):
    x, dy = randn(shape, 60, dtype, scale=3.0, shift=1.0), randn(shape, 61, dtype)
    w, b = randn(shape[1], 62), randn(shape[1], 63)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf, dyf = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
        fused = run(lambda a, w_, b_: group_norm_silu(a, groups, w_, b_), xf, w, b, dyf)
        want = exact(xf, w, b, dyf, groups)
        u = ULP.get(dtype, 1e-5)
        torch.testing.assert_close(fused[0].double(), want[0], rtol=u, atol=u)
        torch.testing.assert_close(fused[1].double(), want[1], rtol=u, atol=u * want[1].abs().max().item())
        for got, ref in zip(fused[2:], want[2:], strict=True):
            torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
