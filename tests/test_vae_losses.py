"""Stage-1 losses: LPIPS loaded from local files, the patch discriminator, GAN objectives, the adaptive
weight and the assembled VAELoss, each checked against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ldm_lib.interop.keys import CheckpointError, KeyMismatchError
from ldm_lib.models.vae import DiagonalGaussian
from ldm_lib.training.vae_losses import (
    LPIPS,
    PatchDiscriminator,
    VAELoss,
    VAELossConfig,
    VGG16Features,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
    vanilla_d_loss,
)

torch.set_num_threads(1)

# VGG16 as blocks of (number of 3x3 convs, channels), each block closed by a 2x2 max-pool: written
# independently of the library's layout table, so the reference below checks its indices and taps.
VGG_BLOCKS = [(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)]
LIN_CHANNELS = [64, 128, 256, 512, 512]


def images(seed: int, shape=(2, 3, 16, 16)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def weights():
    """Random VGG16 (torchvision keys) and positive lin weights (LPIPS release keys). He-initialised
    (Kaiming et al. 2015), so the deep taps still vary with the input: with torch's default init they
    shrink to a bias-driven constant and relu5_3 would go untested."""
    torch.manual_seed(0)
    net = VGG16Features()
    for conv in net.modules():
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            torch.nn.init.normal_(conv.bias, 0.0, 0.01)
    vgg = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(LIN_CHANNELS)}
    return vgg, lin


@pytest.fixture(scope="module")
def files(weights, tmp_path_factory):
    """The weights in both formats and both key styles: features.N / N, safetensors / .pth."""
    vgg, lin = weights
    d = tmp_path_factory.mktemp("lpips")
    save_file(vgg, str(d / "vgg.safetensors"))
    # torchvision style: a whole vgg16 state dict, classifier included, bare N.weight keys here
    bare = {k.removeprefix("features."): v for k, v in vgg.items()}
    bare["classifier.0.weight"] = torch.zeros(4, 8)
    torch.save(bare, d / "vgg_bare.pth")
    torch.save(lin, d / "lin.pth")
    save_file(lin, str(d / "lin.safetensors"))
    return d


@pytest.fixture(scope="module")
def lpips(files):
    return LPIPS.from_files(files / "vgg.safetensors", files / "lin.pth")


def reference_taps(vgg, x):
    """relu1_2 ... relu5_3 of VGG16 with functional ops, from the raw state dict."""
    out, idx, h = [], 0, x
    for n_convs, _ in VGG_BLOCKS:
        for _ in range(n_convs):  # conv at idx, ReLU at idx + 1
            h = F.relu(F.conv2d(h, vgg[f"features.{idx}.weight"], vgg[f"features.{idx}.bias"], padding=1))
            idx += 2
        out.append(h)
        if len(out) < len(VGG_BLOCKS):  # the pool after relu5_3 (index 30) is not needed
            h = F.max_pool2d(h, 2)
        idx += 1  # the pool
    return out


def reference_lpips(vgg, lin, x0, x1):
    """LPIPS written out with functional ops from the raw state dicts (Zhang et al. 2018, eq. 1)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    taps0, taps1 = reference_taps(vgg, (x0 - shift) / scale), reference_taps(vgg, (x1 - shift) / scale)
    total = 0
    for i, (a, b) in enumerate(zip(taps0, taps1, strict=True)):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = lin[f"lin{i}.model.1.weight"].view(1, -1, 1, 1)
        total = total + (w * (a - b) ** 2).sum(1).mean(dim=(1, 2))
    return total


# ------------------------------------------------------------------------------------------- LPIPS


def test_lpips_matches_reference_from_both_key_formats(files, weights, lpips):
    other = LPIPS.from_files(files / "vgg_bare.pth", files / "lin.safetensors")
    x0, x1 = images(0, (2, 3, 16, 16)), images(1, (2, 3, 16, 16))
    with torch.no_grad():
        for ours, ref in zip(other.net(x0), reference_taps(weights[0], x0), strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        expected = reference_lpips(*weights, x0, x1)
        d = lpips(x0, x1)
        assert d.shape == (2,)
        torch.testing.assert_close(d, expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(other(x0, x1), d, rtol=0, atol=0)
    # the loaded weights are the saved ones, not a fresh random initialisation
    torch.testing.assert_close(
        other.net.features[28].weight, weights[0]["features.28.weight"], rtol=0, atol=0
    )
    torch.testing.assert_close(other.lin4.model[1].weight, weights[1]["lin4.model.1.weight"], rtol=0, atol=0)


def test_lpips_is_a_distance(lpips):
    x0, x1 = images(2), images(3)
    with torch.no_grad():
        assert lpips(x0, x0).abs().max() < 1e-6
        torch.testing.assert_close(lpips(x0, x1), lpips(x1, x0), rtol=1e-5, atol=0)
        d = lpips(x0, x1)
        assert (d > 1e-3).all()
        # closer images are closer: a small perturbation scores far below an unrelated image
        assert (lpips(x0, x0 + 0.01 * x1) < 0.1 * d).all()


def test_lpips_is_frozen_and_gradients_reach_the_input(lpips):
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()  # e.g. VAELoss.train(): the metric stays in eval mode
    assert not lpips.training
    x = images(4).requires_grad_(True)
    lpips(x, images(5)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_lpips_wrong_files_give_clear_errors(files, weights, tmp_path):
    vgg, lin = weights
    renamed = {k.replace("lin0.model.1.weight", "lin0.weight"): v for k, v in lin.items()}
    torch.save(renamed, tmp_path / "bad_lin.pth")
    with pytest.raises(KeyMismatchError, match=r"missing \(1\): lin0\.model\.1\.weight") as err:
        LPIPS.from_files(files / "vgg.safetensors", tmp_path / "bad_lin.pth")
    assert "unexpected (1): lin0.weight" in str(err.value) and "bad_lin.pth" in str(err.value)

    short = {k: v for k, v in vgg.items() if not k.startswith("features.28.")}
    short["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    save_file(short, str(tmp_path / "bad_vgg.safetensors"))
    with pytest.raises(KeyMismatchError) as err:
        LPIPS.from_files(tmp_path / "bad_vgg.safetensors", files / "lin.pth")
    message = str(err.value)
    assert "features.28.weight" in message and "features.28.bias" in message
    assert "features.0.weight: checkpoint (64, 1, 3, 3) vs model (64, 3, 3, 3)" in message

    negative = dict(lin)
    negative["lin2.model.1.weight"] = -negative["lin2.model.1.weight"]
    save_file(negative, str(tmp_path / "neg.safetensors"))
    with pytest.raises(ValueError, match="negative entries in .*lin2.model.1.weight"):
        LPIPS.from_files(files / "vgg.safetensors", tmp_path / "neg.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        LPIPS.from_files(tmp_path / "nope.pth", files / "lin.pth")


def test_lpips_rejects_bad_inputs(lpips):
    with pytest.raises(ValueError, match="H, W >= 16"):
        lpips(images(0, (1, 3, 8, 8)), images(1, (1, 3, 8, 8)))
    with pytest.raises(ValueError, match="two equal"):
        lpips(images(0), images(1, (2, 3, 16, 32)))


# ----------------------------------------------------------------------------------- discriminator


def test_patch_discriminator_layout_and_shapes():
    d = PatchDiscriminator()  # taming's NLayerDiscriminator(3, 64, 3) with BatchNorm
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    convs = {k: tuple(v.shape) for k, v in d.state_dict().items() if k.endswith("weight") and v.ndim == 4}
    assert convs == {
        "main.0.weight": (64, 3, 4, 4), "main.2.weight": (128, 64, 4, 4), "main.5.weight": (256, 128, 4, 4),
        "main.8.weight": (512, 256, 4, 4), "main.11.weight": (1, 512, 4, 4),
    }  # fmt: skip
    assert d(images(0, (2, 3, 32, 32))).shape == (2, 1, 2, 2)
    small = PatchDiscriminator(ndf=8, n_layers=2, norm="group", num_groups=4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in small.modules())
    assert small(images(0, (2, 3, 16, 16))).shape == (2, 1, 2, 2)
    assert small(images(0, (1, 3, 12, 40))).shape == (1, 1, 1, 8)
    with pytest.raises(ValueError, match=r"H, W >= 24"):
        d(images(0, (1, 3, 16, 16)))
    with pytest.raises(ValueError, match="num_groups=3 must divide ndf=8"):
        PatchDiscriminator(ndf=8, norm="group", num_groups=3)
    with pytest.raises(ValueError, match="norm='layer'"):
        PatchDiscriminator(norm="layer")


# ---------------------------------------------------------------------------------- GAN objectives


def test_gan_losses_match_hand_computed_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # hinge: relu(1 - real) = (0, 0.5, 2), relu(1 + fake) = (0, 1, 2.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))

    def softplus(v):
        return math.log1p(math.exp(v))

    vanilla = 0.5 * (
        sum(softplus(-r) for r in (2.0, 0.5, -1.0)) / 3 + sum(softplus(f) for f in (-2.0, 0.0, 1.5)) / 3
    )
    assert vanilla_d_loss(real, fake).item() == pytest.approx(vanilla, rel=1e-6)
    assert generator_loss(fake).item() == pytest.approx(0.5 / 3)
    # per-patch logits: means over every patch of every image
    assert hinge_d_loss(real.view(1, 1, 1, 3), fake.view(3, 1, 1, 1)).item() == pytest.approx(1.0)


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, generator=g).requires_grad_(True)
    a, t, c = torch.randn(3, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    out = w @ a
    rec = ((out - t) ** 2).sum()
    gan = -(c * out).mean()
    # by hand: d rec / d w = 2 (out - t) a^T, d gan / d w = -(c / 10) a^T
    grad_rec = 2 * (out.detach() - t) @ a.T
    grad_gan = -(c / c.numel()) @ a.T
    expected = grad_rec.norm() / (grad_gan.norm() + 1e-4)
    lam = adaptive_weight(rec, gan, w)
    assert not lam.requires_grad
    torch.testing.assert_close(lam, expected, rtol=1e-5, atol=0)
    (rec + lam * gan).backward()  # the graph was retained for the real backward
    torch.testing.assert_close(w.grad, grad_rec + expected * grad_gan, rtol=1e-5, atol=1e-6)
    # clamped: a GAN loss with a vanishing gradient gets max_weight
    out = w @ a
    assert adaptive_weight(((out - t) ** 2).sum(), 1e-9 * out.sum(), w, max_weight=10.0).item() == 10.0
    with pytest.raises(ValueError, match="does not depend on last_layer_weight"):
        adaptive_weight(((w @ a) ** 2).sum(), (t**2).sum().requires_grad_(True), w)


# -------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"kl_weight": -1.0}, r"vae_loss\.kl_weight=-1\.0 is out of range"),
        (
            {"reconstruction": "l3"},
            r"vae_loss\.reconstruction='l3' is not supported; expected one of 'l1', 'l2'",
        ),
        ({"perceptual_weight": 1.0}, r"vae_loss\.lpips_vgg_path and vae_loss\.lpips_lin_path are not set"),
        ({"perceptual_weight": 1.0, "lpips_vgg_path": "v.pth"}, r"vae_loss\.lpips_lin_path is not set"),
        ({"adversarial_weight": float("nan")}, r"vae_loss\.adversarial_weight=nan must be finite"),
        ({"disc_start": -1}, r"vae_loss\.disc_start=-1 is out of range"),
        ({"disc_start": 1.5}, r"vae_loss\.disc_start=1\.5 must be an integer"),
        ({"disc_loss": "wgan"}, r"vae_loss\.disc_loss='wgan' is not supported; expected one of 'hinge'"),
        ({"disc_lr": 0.0}, r"vae_loss\.disc_lr=0\.0 is out of range"),
        ({"disc_betas": (0.5,)}, r"vae_loss\.disc_betas=\(0\.5,\) must be two numbers"),
        ({"disc_norm": "group", "disc_channels": 48}, r"vae_loss\.disc_num_groups=32 does not divide"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        VAELossConfig(**fields)


def test_config_defaults_are_ldm_without_lpips_and_gan():
    cfg = VAELossConfig()
    assert (cfg.reconstruction, cfg.kl_weight, cfg.perceptual_weight, cfg.adversarial_weight) == (
        "l1",
        1e-6,
        0,
        0,
    )
    assert VAELossConfig(disc_betas=[0.0, 0.99]).disc_betas == (0.0, 0.99)  # a YAML list becomes a tuple
    loss = VAELoss()
    assert loss.lpips is None and loss.discriminator is None and not loss.discriminator_active(10**9)
    with pytest.raises(CheckpointError, match="nope.pth"):  # a missing file fails when the loss is built
        VAELoss(VAELossConfig(perceptual_weight=1.0, lpips_vgg_path="nope.pth", lpips_lin_path="nope.pth"))


# --------------------------------------------------------------------------------------------- VAELoss


def batch(seed: int = 0, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    recon = x + 0.3 * torch.randn(x.shape, generator=g)
    posterior = DiagonalGaussian(torch.randn(2, 8, size // 4, size // 4, generator=g))
    return x, recon, posterior


def kl_by_hand(posterior: DiagonalGaussian) -> torch.Tensor:
    mu, logvar = posterior.parameters.chunk(2, dim=1)
    return (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(dim=(1, 2, 3)).mean()


@pytest.mark.parametrize("reconstruction", ["l1", "l2"])
def test_vae_loss_default_is_reconstruction_plus_kl(reconstruction):
    x, recon, posterior = batch()
    cfg = VAELossConfig(reconstruction=reconstruction, kl_weight=1e-3, reconstruction_weight=2.0)
    loss, logs = VAELoss(cfg).generator_step_loss(x, recon, posterior, step=10**6)
    err = (x - recon).abs() if reconstruction == "l1" else (x - recon) ** 2
    expected = 2.0 * err.sum() / 2 + 1e-3 * kl_by_hand(posterior)  # sum over pixels, mean over the batch
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert logs["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert logs["rec_loss"] == pytest.approx(err.mean().item(), rel=1e-5)
    assert logs["kl_loss"] == pytest.approx(kl_by_hand(posterior).item(), rel=1e-5)
    assert logs["g_loss"] == logs["d_weight"] == logs["perceptual_loss"] == logs["disc_factor"] == 0.0
    assert all(isinstance(v, float) for v in logs.values())
    with pytest.raises(ValueError, match="expected two equal"):
        VAELoss(cfg).generator_step_loss(x, recon[:, :, :8], posterior, step=0)
    # a bf16 posterior (autocast) gets its KL summed in float32
    low = DiagonalGaussian(posterior.parameters.bfloat16())
    loss16, logs16 = VAELoss(cfg).generator_step_loss(x, recon, low, step=0)
    assert loss16.dtype == torch.float32
    kl32 = kl_by_hand(DiagonalGaussian(low.parameters.float()))
    assert logs16["kl_loss"] == pytest.approx(kl32.item(), rel=1e-6)
    expected16 = (
        expected - 1e-3 * kl_by_hand(posterior) + 1e-3 * kl_by_hand(DiagonalGaussian(low.parameters.float()))
    )
    torch.testing.assert_close(loss16, expected16, rtol=1e-5, atol=0)


def test_vae_loss_with_lpips(files, lpips):
    x, recon, posterior = batch(1)
    cfg = VAELossConfig(
        perceptual_weight=0.5,
        lpips_vgg_path=str(files / "vgg_bare.pth"),
        lpips_lin_path=str(files / "lin.pth"),
    )
    vae_loss = VAELoss(cfg)
    loss, logs = vae_loss.generator_step_loss(x, recon, posterior, step=0)
    with torch.no_grad():
        distance = lpips(x, recon)
    n = 3 * 16 * 16
    expected = (x - recon).abs().sum() / 2 + 0.5 * n * distance.mean() + 1e-6 * kl_by_hand(posterior)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert logs["perceptual_loss"] == pytest.approx(distance.mean().item(), rel=1e-5)
    assert not any(p.requires_grad for p in vae_loss.lpips.parameters())


def test_gan_terms_are_off_before_disc_start_and_on_after():
    torch.manual_seed(0)
    cfg = VAELossConfig(
        adversarial_weight=0.5,
        disc_start=5,
        disc_layers=2,
        disc_channels=8,
        disc_norm="group",
        disc_num_groups=4,
    )
    vae_loss = VAELoss(cfg)
    disc = vae_loss.discriminator
    x, _, posterior = batch(2)
    last = torch.nn.Conv2d(4, 3, 3, padding=1)  # stands in for the decoder's conv_out
    h = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    base = VAELoss(VAELossConfig())

    # before disc_start: exactly the loss without a GAN, and the discriminator loss is a constant 0
    recon = last(h)
    loss, logs = vae_loss.generator_step_loss(x, recon, posterior, step=4, last_layer=last.weight)
    torch.testing.assert_close(loss, base.generator_step_loss(x, recon, posterior, 4)[0], rtol=0, atol=0)
    assert logs["g_loss"] == logs["d_weight"] == logs["disc_factor"] == 0.0
    d_loss, d_logs = vae_loss.discriminator_step_loss(x, recon, step=4)
    assert d_loss.item() == 0.0 and not d_loss.requires_grad and d_logs["disc_factor"] == 0.0
    assert not vae_loss.discriminator_active(4) and vae_loss.discriminator_active(5)

    # from disc_start: + w_adv * lambda * L_G, lambda from the gradients at the last layer
    recon = last(h)
    loss, logs = vae_loss.generator_step_loss(x, recon, posterior, step=5, last_layer=last.weight)
    nll = (x - recon).abs().sum() / 2
    g = -disc(recon).mean()
    lam = adaptive_weight(nll, g, last.weight)
    assert lam > 0 and g != 0
    expected = nll + 1e-6 * kl_by_hand(posterior) + 0.5 * lam * g
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert logs["d_weight"] == pytest.approx(lam.item(), rel=1e-5)
    assert logs["g_loss"] == pytest.approx(g.item(), rel=1e-5) and logs["disc_factor"] == 1.0
    disc.zero_grad(set_to_none=True)
    loss.backward()
    assert last.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())  # the generator step leaves D alone
    assert all(p.requires_grad for p in disc.parameters())  # and gives it back trainable

    d_loss, d_logs = vae_loss.discriminator_step_loss(x, recon, step=5)
    torch.testing.assert_close(d_loss, hinge_d_loss(disc(x), disc(recon.detach())), rtol=1e-6, atol=0)
    assert d_loss.item() > 0 and d_logs["d_loss"] == pytest.approx(d_loss.item(), rel=1e-6)
    last.zero_grad(set_to_none=True)
    d_loss.backward()
    assert last.weight.grad is None  # recon was detached: this step trains only D
    assert all(p.grad is not None for p in disc.parameters())

    # validation (no_grad): lambda cannot be computed, so the adversarial term is logged, not added
    with torch.no_grad():
        recon = last(h)
        loss, logs = vae_loss.generator_step_loss(x, recon, posterior, step=5)
        torch.testing.assert_close(loss, base.generator_step_loss(x, recon, posterior, 5)[0], rtol=0, atol=0)
        assert logs["d_weight"] == 0.0 and logs["g_loss"] != 0.0
    with pytest.raises(ValueError, match="needs last_layer"):
        vae_loss.generator_step_loss(x, last(h), posterior, step=5)


def test_discriminator_optimizer_and_vanilla_loss():
    cfg = VAELossConfig(
        adversarial_weight=1.0,
        disc_start=0,
        disc_loss="vanilla",
        disc_lr=3e-4,
        disc_layers=2,
        disc_channels=8,
    )
    vae_loss = VAELoss(cfg)
    opt = vae_loss.make_discriminator_optimizer()
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["betas"] == (0.5, 0.9)
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == sum(
        p.numel() for p in vae_loss.discriminator.parameters()
    )
    # a few discriminator steps separate real from fake: the vanilla loss falls below log 2
    torch.manual_seed(0)
    x, recon, _ = batch(4)
    first = None
    for _ in range(8):
        d_loss, _ = vae_loss.discriminator_step_loss(x, recon, step=0)
        first = d_loss.item() if first is None else first
        opt.zero_grad()
        d_loss.backward()
        opt.step()
    assert d_loss.item() < first and d_loss.item() < math.log(2)
    with pytest.raises(ValueError, match="no discriminator"):
        VAELoss().make_discriminator_optimizer()
