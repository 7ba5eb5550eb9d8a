import math

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from ldm_lib.data.shapes import shapes_tensors
from ldm_lib.models.presets import PRESETS, vae_config
from ldm_lib.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, latent_scaling_factor


def tiny_config(**overrides) -> VAEConfig:
    fields = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=4)
    return VAEConfig(**{**fields, **overrides})


def diffusers_twin(cfg: VAEConfig) -> DiffusersAutoencoderKL:
    """diffusers' AutoencoderKL with the same sizes as ``cfg``."""
    levels = len(cfg.channel_mult)
    return DiffusersAutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=cfg.block_channels,
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor,
        mid_block_add_attention=cfg.mid_block_attention,
    )


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Perturb every parameter (GroupNorm scales and biases included), so parity is not a fluke of init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"channel_mult": (1, 2), "num_res_blocks": 2, "latent_channels": 3},
        {"mid_block_attention": False, "in_channels": 1, "out_channels": 2},
    ],
)
def test_parity_with_diffusers(overrides):
    cfg = tiny_config(**overrides)
    ours, ref = AutoencoderKL(cfg).eval(), diffusers_twin(cfg).eval()
    randomize_(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names and shapes, both ways
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        torch.testing.assert_close(post.mean, ref_post.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(post.logvar, ref_post.logvar, rtol=0, atol=1e-5)
        torch.testing.assert_close(post.kl(), ref_post.kl(), rtol=1e-5, atol=1e-5)
        z = post.mode()
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, rtol=0, atol=1e-5)
        # Full forward with a sampled posterior: the same generator draws the same epsilon.
        rec, _ = ours(x, generator=torch.Generator().manual_seed(7))
        ref_rec = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(7)).sample
        torch.testing.assert_close(rec, ref_rec, rtol=0, atol=1e-5)


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_downsampling_factor_and_latent_shapes(levels):
    cfg = tiny_config(channel_mult=(1,) * levels, latent_channels=3)
    vae = AutoencoderKL(cfg)
    f = 2 ** (levels - 1)
    assert vae.downsampling_factor == cfg.downsampling_factor == f
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        latents = vae.encode_latents(x, generator=torch.Generator().manual_seed(0))
        assert latents.shape == (2, 3, 16 // f, 24 // f)
        assert vae.decode_latents(latents).shape == x.shape


def test_encode_rejects_sizes_not_divisible_by_f():
    vae = AutoencoderKL(tiny_config())  # f = 4
    with pytest.raises(ValueError, match="downsampling factor 4"):
        vae.encode(torch.randn(1, 3, 16, 18))


def test_kl_closed_form_matches_monte_carlo_and_torch_distributions():
    g = torch.Generator().manual_seed(0)
    params = torch.cat([torch.randn(3, 2, 2, 2, generator=g), 0.5 * torch.randn(3, 2, 2, 2, generator=g)], 1)
    post = DiagonalGaussian(params)
    # KL(q || p) = E_q[log q(z) - log p(z)], with log q(z) = -nll(z) and p = N(0, I).
    n = 20_000
    many = DiagonalGaussian(params.repeat(n, 1, 1, 1))
    z = many.sample(g)
    log_q = -many.nll(z)
    log_p = -0.5 * (math.log(2 * math.pi) + z**2).sum(dim=(1, 2, 3))
    mc = (log_q - log_p).view(n, 3).mean(0)
    torch.testing.assert_close(mc, post.kl(), rtol=0.03, atol=0.03)
    q = torch.distributions.Normal(post.mean, post.std)
    p = torch.distributions.Normal(torch.zeros_like(post.mean), torch.ones_like(post.mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), expected, rtol=1e-5, atol=1e-6)
    # The prior itself has zero divergence.
    assert DiagonalGaussian(torch.zeros(2, 8, 3, 3)).kl().abs().max() == 0


def test_nll_is_the_gaussian_log_density():
    g = torch.Generator().manual_seed(0)
    params, x = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 2, 3, 3, generator=g)
    post = DiagonalGaussian(params)
    expected = -torch.distributions.Normal(post.mean, post.std).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.nll(x), expected)


def test_sample_is_reproducible_with_a_generator_and_has_the_posteriors_moments():
    mean = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1).expand(4000, 2, 4, 4)
    logvar = torch.log(torch.tensor([0.25, 4.0])).view(1, 2, 1, 1).expand(4000, 2, 4, 4)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, post.sample(torch.Generator().manual_seed(4)))
    torch.testing.assert_close(a.mean(dim=(0, 2, 3)), torch.tensor([1.5, -2.0]), rtol=0, atol=0.02)
    torch.testing.assert_close(a.std(dim=(0, 2, 3)), torch.tensor([0.5, 2.0]), rtol=0.01, atol=0)
    assert torch.equal(post.mode(), post.mean)


def test_reparameterised_sample_carries_gradients_to_mean_and_logvar():
    params = torch.randn(2, 4, 3, 3, requires_grad=True)
    DiagonalGaussian(params).sample(torch.Generator().manual_seed(0)).sum().backward()
    assert params.grad[:, :2].abs().min() > 0  # d z / d mean = 1
    assert params.grad[:, 2:].abs().min() > 0  # d z / d logvar = eps * std / 2


def test_logvar_is_clamped():
    params = torch.zeros(1, 4, 1, 1)
    params[0, 2], params[0, 3] = 100.0, -100.0
    post = DiagonalGaussian(params)
    assert post.logvar.flatten().tolist() == [20.0, -30.0]
    assert torch.isfinite(post.std).all() and torch.isfinite(post.kl()).all()
    torch.testing.assert_close(post.var, post.std**2)


def test_posterior_rejects_odd_channels():
    with pytest.raises(ValueError, match="mean and log-variance"):
        DiagonalGaussian(torch.zeros(1, 3, 2, 2))


def test_scaled_latents_round_trip_through_the_config():
    cfg = tiny_config(scaling_factor=0.5, shift_factor=0.25)
    vae = AutoencoderKL(cfg).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        mode = vae.encode(x).mode()
        latents = vae.encode_latents(x, sample=False)
        torch.testing.assert_close(latents, (mode - 0.25) * 0.5)
        torch.testing.assert_close(vae.decode_latents(latents), vae.decode(mode))
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        torch.testing.assert_close(vae.encode_latents(x, g1), (vae.encode(x).sample(g2) - 0.25) * 0.5)


def test_latent_scaling_factor_is_one_over_std():
    z = 4.0 * torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    s = latent_scaling_factor(z)
    assert s == pytest.approx(1 / z.std().item())
    assert (z * s).std().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="positive spread"):
        latent_scaling_factor(torch.ones(5))


def test_sd_preset_has_the_published_parameter_count_and_diffusers_layout():
    cfg = vae_config("sd")
    assert cfg.scaling_factor == 0.18215 and cfg.downsampling_factor == 8
    with torch.device("meta"):
        ours, ref = AutoencoderKL(cfg), diffusers_twin(cfg)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters()) == 83_653_863
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_presets():
    assert set(PRESETS["vae"]) == {"sd", "sdxl", "course"}
    assert vae_config("sdxl").scaling_factor == 0.13025
    assert vae_config("course", scaling_factor=0.9).scaling_factor == 0.9
    with pytest.raises(ValueError, match="VAE preset"):
        vae_config("sd3")
    with pytest.raises(ValueError, match="VAEConfig field"):
        vae_config("sd", channels=3)


def test_course_preset_gives_8x8x4_latents_and_learns_shapes():
    cfg = vae_config("course")
    assert cfg.downsampling_factor == 4
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg)
    images, _, _ = shapes_tensors(4, resolution=32)
    with torch.no_grad():
        assert vae.encode_latents(images).shape == (4, 4, 8, 8)
    # A few Adam steps on a fixed batch of smaller images (fast): the reconstruction loss falls.
    batch, _, _ = shapes_tensors(4, resolution=16)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(8):
        reconstruction, posterior = vae(batch, generator=g)
        loss = (reconstruction - batch).pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"norm_num_groups": 3}, "norm_num_groups=3 does not divide"),
        ({"channel_mult": ()}, "channel_mult"),
        ({"channel_mult": (1, 0)}, "channel_mult"),
        ({"base_channels": 0}, "base_channels"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"latent_channels": 2.0}, "latent_channels"),
        ({"scaling_factor": 0.0}, "scaling_factor"),
        ({"shift_factor": float("nan")}, "shift_factor"),
        ({"norm_eps": -1e-6}, "norm_eps"),
        ({"mid_block_attention": 1}, "mid_block_attention"),
        ({"attention_backend": "flash3"}, "attention_backend"),
    ],
)
def test_bad_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_config_accepts_a_list_for_channel_mult_and_backend_can_be_switched():
    cfg = tiny_config(channel_mult=[1, 2])
    assert cfg.channel_mult == (1, 2)
    vae = AutoencoderKL(cfg).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = vae.encode(x).mean
        vae.set_attention_backend("math")
        assert vae.config.attention_backend == "math"
        torch.testing.assert_close(vae.encode(x).mean, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="attention_backend"):
        vae.set_attention_backend("nope")


def test_fused_groupnorm_silu_is_a_runtime_switch_that_keeps_weights_and_identity(monkeypatch):
    from ldm_lib.data.latents import vae_identity
    from ldm_lib.kernels.groupnorm_silu import GroupNormSiLU
    from ldm_lib.models.vae import ResnetBlock, SpatialSelfAttention

    torch.manual_seed(0)
    vae = AutoencoderKL(tiny_config()).eval()
    randomize_(vae)
    keys, identity = list(vae.state_dict()), vae_identity(vae)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = vae.decode(vae.encode(x).mode())
    vae.set_fused_groupnorm_silu(True)
    assert vae.fused_groupnorm_silu and list(vae.state_dict()) == keys
    assert vae_identity(vae) == identity  # how the norm is computed is not part of what the VAE is
    norms = [m for m in vae.modules() if isinstance(m, GroupNormSiLU)]
    n_resnets = sum(isinstance(m, ResnetBlock) for m in vae.modules())
    assert len(norms) == 2 * n_resnets + 2 and all(m.fused for m in norms)  # + both conv_norm_out
    attention = [m for m in vae.modules() if isinstance(m, SpatialSelfAttention)]
    assert attention and all(type(m.group_norm) is torch.nn.GroupNorm for m in attention)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU without the interpreter
    with pytest.raises(ValueError, match=r"fused GroupNorm\+SiLU kernel cannot run on cpu"):
        vae.encode(x)
    vae.set_fused_groupnorm_silu(False)
    assert not vae.fused_groupnorm_silu
    with torch.no_grad():
        assert torch.equal(vae.decode(vae.encode(x).mode()), expected)
    with pytest.raises(ValueError, match="must be True or False"):
        vae.set_fused_groupnorm_silu("on")
