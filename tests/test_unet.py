import dataclasses

import pytest
import torch

import ldm_lib.models.unet as unet_mod
from ldm_lib.models.presets import PRESETS, unet_config
from ldm_lib.models.unet import (
    UNet,
    UNetConfig,
    from_diffusers_config,
    timestep_embedding,
    to_diffusers_config,
)


def diffusers_unet(cfg: UNetConfig):
    """diffusers' UNet2DConditionModel with the same architecture: the reference for parity tests."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers (the parity reference) is not installed")
    return diffusers.UNet2DConditionModel(**to_diffusers_config(cfg))


# Tiny configs with three levels (two attention levels, one without, odd sizes reach every path).
SD1_TINY = UNetConfig(
    model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1),
    num_heads=2, context_dim=24, norm_num_groups=8, zero_init=False,
)  # fmt: skip
SD2_TINY = dataclasses.replace(
    SD1_TINY, num_heads=None, head_dim=8, use_linear_projection=True, transformer_depth=2, num_res_blocks=2
)


def inputs(shape=(2, 4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.tensor([3, 700]), torch.randn(shape[0], 7, 24, generator=g)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dim", [32, 33, 320])
@pytest.mark.parametrize("flip, shift", [(True, 0), (False, 1), (True, 1)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    pytest.importorskip("diffusers", reason="diffusers (the parity reference) is not installed")
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 500, 999])
    ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_timestep_embedding_is_cos_then_sin_of_geometric_frequencies():
    e = timestep_embedding(torch.tensor([0.0, 2.0]), 8)
    torch.testing.assert_close(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # t = 0: cos 0, sin 0
    omega = 10000 ** (-torch.arange(4) / 4)
    torch.testing.assert_close(e[1], torch.cat([torch.cos(2 * omega), torch.sin(2 * omega)]))
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.tensor([[1]]), 8)


@pytest.mark.parametrize("cfg", [SD1_TINY, SD2_TINY], ids=["sd1_conv_heads", "sd2_linear_head_dim"])
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 4, 10, 6)], ids=["8x8", "10x6"])
@pytest.mark.parametrize("direction", ["ours_to_diffusers", "diffusers_to_ours"])
def test_parity_with_diffusers(cfg, shape, direction):
    torch.manual_seed(0)
    ours, theirs = UNet(cfg).eval(), diffusers_unet(cfg).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    if direction == "ours_to_diffusers":
        theirs.load_state_dict(ours.state_dict(), strict=True)
    else:
        ours.load_state_dict(theirs.state_dict(), strict=True)
    x, t, c = inputs(shape)
    with torch.no_grad():
        a, b = ours(x, t, c), theirs(x, t, c).sample
    assert a.shape == x.shape and a.abs().mean() > 0.1  # a real output, not zeros
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_math_backend_gives_the_same_network():
    torch.manual_seed(0)
    model = UNet(SD2_TINY).eval()
    x, t, c = inputs()
    with torch.no_grad():
        a = model(x, t, c)
        model.set_attention_backend("math")
        b = model(x, t, c)
    assert model.config.attention_backend == "math"
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_scalar_timestep_broadcasts():
    torch.manual_seed(0)
    model = UNet(SD1_TINY).eval()
    x, _, c = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, 250, c), model(x, torch.tensor([250, 250]), c))
        torch.testing.assert_close(model(x, torch.tensor(250.0), c), model(x, torch.tensor([250, 250]), c))


def test_zero_init_starts_at_zero_output():
    model = UNet(dataclasses.replace(SD1_TINY, zero_init=True))
    x, t, c = inputs()
    assert (model(x, t, c) == 0).all()
    assert model.down_blocks[0].resnets[0].conv2.weight.abs().sum() == 0


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    calls = []
    real = unet_mod.checkpoint
    monkeypatch.setattr(unet_mod, "checkpoint", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    cfg = dataclasses.replace(SD2_TINY, dropout=0.0)
    torch.manual_seed(0)
    plain = UNet(cfg).train()
    ckpt = UNet(dataclasses.replace(cfg, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, c = inputs()
    for model in (plain, ckpt):
        model(x, t, c).square().mean().backward()
    # Every ResNet block and every transformer block was checkpointed, non-reentrantly.
    n_blocks = sum(isinstance(m, unet_mod.Checkpointable) for m in ckpt.modules())
    assert len(calls) == n_blocks and all(kw == {"use_reentrant": False} for kw in calls)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    calls.clear()
    with torch.no_grad():
        ckpt(x, t, c)
    ckpt.eval()(x, t, c)
    assert calls == []  # only when training with gradients


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(num_heads=8, head_dim=64), "exactly one"),
        (dict(num_heads=None, head_dim=None), "exactly one"),
        (dict(model_channels=20), "norm_num_groups=8 does not divide the 20 channels"),
        (dict(num_heads=3), "num_heads=3 does not divide the 16 channels of level 0"),
        (dict(num_heads=None, head_dim=12), "head_dim=12 does not divide"),
        (dict(attention_levels=(0, 3)), "attention_levels entries=3"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(attention_backend="flash"), "attention_backend='flash'"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(fused_groupnorm_silu=1), "fused_groupnorm_silu=1 must be True or False"),
    ],
)
def test_bad_configs_raise_value_error(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(SD1_TINY, **change)


def test_bad_inputs_raise_value_error():
    model = UNet(SD1_TINY)
    x, t, c = inputs()
    with pytest.raises(ValueError, match="context must be"):
        model(x, t, c[..., :8])
    with pytest.raises(ValueError, match="timesteps must be"):
        model(x, torch.tensor([1, 2, 3]), c)
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :3], t, c)


@pytest.mark.parametrize("name", PRESETS["unet"])
def test_presets_match_diffusers_on_meta(name):
    cfg = unet_config(name)
    with torch.device("meta"):
        ours, theirs = UNet(cfg), diffusers_unet(cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert n_params(ours) == n_params(theirs)
    assert from_diffusers_config(theirs.config) == cfg


def test_published_parameter_counts():
    with torch.device("meta"):
        assert n_params(UNet(unet_config("sd15"))) == 859_520_964  # Stable Diffusion 1.5
        assert n_params(UNet(unet_config("sd21"))) == 865_910_724  # Stable Diffusion 2.1


def test_course_presets_run():
    for name, hw in (("course_tiny", 8), ("course_small", 16)):
        cfg = unet_config(name, zero_init=False)
        x = torch.randn(2, 4, hw, hw)
        out = UNet(cfg)(x, torch.tensor([10, 900]), torch.randn(2, 5, cfg.context_dim))
        assert out.shape == x.shape
    with pytest.raises(ValueError, match="UNet preset='sd3'"):
        unet_config("sd3")
    with pytest.raises(ValueError, match="UNetConfig field='heads'"):
        unet_config("sd15", heads=4)
    assert unet_config("sd15", attention_backend="math").attention_backend == "math"


def test_from_diffusers_rejects_other_layouts():
    sdxl_like = {**to_diffusers_config(unet_config("sd15")), "addition_embed_type": "text_time"}
    with pytest.raises(ValueError, match="addition_embed_type='text_time' is not supported"):
        from_diffusers_config(sdxl_like)


def test_fused_groupnorm_silu_switch_keeps_the_weights_and_says_where_it_cannot_run(monkeypatch):
    from ldm_lib.kernels.groupnorm_silu import GroupNormSiLU

    torch.manual_seed(0)
    plain = UNet(SD1_TINY).eval()
    fused = UNet(dataclasses.replace(SD1_TINY, fused_groupnorm_silu=True)).eval()
    assert list(fused.state_dict()) == list(plain.state_dict())  # same names: checkpoints load either way
    fused.load_state_dict(plain.state_dict(), strict=True)
    norms = [m for m in fused.modules() if isinstance(m, GroupNormSiLU)]
    n_resnets = sum(isinstance(m, unet_mod.ResnetBlock2D) for m in fused.modules())
    assert len(norms) == 2 * n_resnets + 1 and all(m.fused for m in norms)  # + conv_norm_out
    transformers = [m for m in fused.modules() if isinstance(m, unet_mod.Transformer2DModel)]
    assert transformers and all(type(m.norm) is torch.nn.GroupNorm for m in transformers)  # no SiLU there
    x, t, c = inputs()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU without the interpreter
    with pytest.raises(ValueError, match=r"fused GroupNorm\+SiLU kernel cannot run on cpu"):
        fused(x, t, c)
    fused.set_fused_groupnorm_silu(False)
    assert not fused.config.fused_groupnorm_silu and not any(m.fused for m in norms)
    with torch.no_grad():
        assert torch.equal(fused(x, t, c), plain(x, t, c))
    assert unet_config("course_tiny", fused_groupnorm_silu=True).fused_groupnorm_silu
