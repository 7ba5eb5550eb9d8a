r"""The losses of stage 1, the autoencoder: reconstruction + KL, and optionally LPIPS and a patch GAN.

The LDM autoencoder (Rombach et al. 2022, arXiv 2112.10752, App. G) is trained as in Esser et al.
2021 ("Taming Transformers", arXiv 2012.09841, §3.1), with a KL term in place of the vector
quantiser. For a batch of images :math:`x` in :math:`[-1, 1]` and reconstructions :math:`\hat x`:

.. math::  \mathcal L = \mathcal L_{\rm rec} + \beta\,\mathcal L_{\rm KL}
           + \lambda\, w_{\rm adv}\, \mathbb 1[\text{step} \ge \text{disc\_start}]\,\mathcal L_G,

.. math::  \mathcal L_{\rm rec} = \frac1B \sum_b \Big( w_{\rm rec} \sum_{i=1}^{N} \rho(x_{b,i} - \hat x_{b,i})
           + w_p\, N\, \mathrm{LPIPS}(x_b, \hat x_b) \Big),\qquad
           \mathcal L_{\rm KL} = \frac1B \sum_b \mathrm{KL}\big(q(z\mid x_b)\,\Vert\,\mathcal N(0, I)\big),

with :math:`\rho = |\cdot|` (``reconstruction="l1"``, LDM's choice) or :math:`(\cdot)^2` (``"l2"``),
:math:`N = C\,H\,W` the elements of one image, :math:`\mathcal L_G = -\operatorname{mean} D(\hat x)`
the generator's adversarial loss and :math:`\lambda` the adaptive weight of Esser et al. eq. 7
(:func:`adaptive_weight`).

**Reduction convention (LDM's ``LPIPSWithDiscriminator``):** every per-image term is summed over
its elements and averaged over the batch. The KL is already a per-image sum over the latent
(:meth:`~ldm_lib.models.vae.DiagonalGaussian.kl`), and LPIPS, a per-image distance, is counted once
per element (LDM adds it to the per-pixel L1 map before summing), hence the factor :math:`N`.
This is what makes LDM's weights mean the same here: ``kl_weight=1e-6``, ``perceptual_weight=1.0``,
``adversarial_weight=0.5``. (A mean over pixels with the same :math:`\beta` would make the KL term
:math:`N` times stronger; Adam is nearly invariant to the overall scale of the loss, not to the
ratio of its terms.) The logged ``rec_loss`` is the per-element mean, comparable across image sizes.

Perceptual (LPIPS, Zhang et al. 2018, arXiv 1801.03924) and adversarial (PatchGAN, Isola et al.
2017, arXiv 1611.07004) terms are **off by default**: LPIPS needs ImageNet VGG16 weights and the
LPIPS "lin" weights, which cannot be downloaded here, so the user points ``lpips_vgg_path`` and
``lpips_lin_path`` at local files (:meth:`LPIPS.from_files`).

Training step order (two optimizers, as in taming/LDM):

1. ``loss, logs = vae_loss.generator_step_loss(x, recon, posterior, step, last_layer=
   vae.decoder.conv_out.weight)``; backward; step the autoencoder's optimizer. The discriminator's
   parameters are frozen during this call, so this backward leaves them without gradients.
2. ``if vae_loss.discriminator_active(step):`` ``d_loss, d_logs = vae_loss.discriminator_step_loss(
   x, recon, step)``; backward; step the discriminator's optimizer
   (:meth:`VAELoss.make_discriminator_optimizer`). Before ``disc_start`` (or with the GAN off) the
   discriminator loss is a constant zero without a graph: skip its backward and step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_number
from ..interop.keys import check_keys, read_state_dict

if TYPE_CHECKING:
    from ..models.vae import DiagonalGaussian

RECONSTRUCTIONS = ("l1", "l2")
DISC_LOSSES = ("hinge", "vanilla")
DISC_NORMS = ("batch", "group")

# ------------------------------------------------------------------------------------------- LPIPS

# torchvision's vgg16().features (configuration "D" of Simonyan & Zisserman 2014, arXiv 1409.1556):
# output channels of each 3x3 conv, "M" a 2x2 max-pool. Every conv is followed by a ReLU.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in `features` of the ReLUs LPIPS reads: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# The LPIPS release's input normalisation, (x - shift) / scale for x in [-1, 1]: ImageNet's mean and
# std mapped from [0, 1] to [-1, 1] (2 * 0.485 - 1 = -0.030, 2 * 0.229 = 0.458, ...).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """The VGG16 convolutional stack (Simonyan & Zisserman 2014, arXiv 1409.1556) up to relu5_3.

    ``features`` holds the layers at torchvision's indices (``features.0`` the first conv,
    ``features.29`` the last ReLU; the final max-pool, index 30, has no weights and is not needed),
    so a torchvision ``vgg16`` state dict's ``features.N.weight/bias`` load as they are.
    ``forward`` returns the five LPIPS taps, relu1_2 ... relu5_3 (64, 128, 256, 512, 512 channels at
    1, 1/2, 1/4, 1/8, 1/16 of the input resolution).
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                taps.append(x)
        return taps


class _LinLayer(nn.Module):
    """LPIPS' per-channel weights as a 1x1 conv without bias. The release wraps it as
    ``model = Sequential(Dropout, Conv2d)``; an Identity in the Dropout's place keeps the key
    ``model.1.weight`` and leaves nothing random in the (frozen) metric."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))
        nn.init.ones_(self.model[1].weight)  # without trained weights: the plain channel sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    r"""The LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep
    Features as a Perceptual Metric", arXiv 1801.03924, eq. 1), VGG16 variant (v0.1 weights):

    .. math::  d(x, x_0) = \sum_{l=1}^{5} \frac{1}{H_l W_l} \sum_{h,w} \sum_c
               w_{l,c}\,\big(\hat y^l_{hwc} - \hat y^l_{0,hwc}\big)^2,\qquad
               \hat y^l_{hw} = \frac{y^l_{hw}}{\lVert y^l_{hw}\rVert_2},

    where :math:`y^l` are the VGG16 activations at the five taps of the scaled input
    :math:`(x - \text{shift})/\text{scale}`, unit-normalised over channels at each position, and
    :math:`w_l \ge 0` the learned "lin" weights (applied to the squared difference, as the release
    does; the paper writes :math:`\lVert w_l \odot \Delta\rVert^2`, the same with :math:`w` squared).

    Inputs are images in :math:`[-1, 1]`, ``(B, 3, H, W)`` with ``H, W >= 16`` (relu5_3 is at 1/16);
    the output is ``(B,)``. Built directly, the weights are random (lin weights 1: the paper's
    "baseline" channel sum); real use goes through :meth:`from_files`. Always frozen and in eval mode:
    gradients flow to the images, never to the metric.
    """

    def __init__(self) -> None:
        super().__init__()
        # Constants of the metric, not weights: non-persistent, so the state dict is VGG + lin only.
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        for i, channels in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{i}", _LinLayer(channels))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Stays in eval mode whatever the parent module does: a metric must not change with it."""
        return super().train(False)

    @property
    def lins(self) -> list[_LinLayer]:
        return [getattr(self, f"lin{i}") for i in range(len(LPIPS_CHANNELS))]

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[1] != 3 or min(x0.shape[-2:]) < 16:
            raise ValueError(
                f"LPIPS inputs have shapes {tuple(x0.shape)} and {tuple(x1.shape)}; expected two equal "
                "(B, 3, H, W) RGB batches in [-1, 1] with H, W >= 16"
            )
        B = x0.shape[0]
        feats = self.net((torch.cat([x0, x1]) - self.shift) / self.scale)  # one pass for both
        distance = x0.new_zeros(B)
        for f, lin in zip(feats, self.lins, strict=True):
            # F.normalize divides by max(||y||, eps): as LPIPS' y / (||y|| + eps) up to eps, but with a
            # finite gradient where a position's features are all zero (sqrt'(0) would give NaN).
            f = F.normalize(f, dim=1, eps=1e-10)
            diff = (f[:B] - f[B:]) ** 2
            distance = distance + lin(diff).mean(dim=(1, 2, 3))
        return distance

    @classmethod
    def from_files(
        cls, vgg_path: str | Path, lin_path: str | Path, device: str | torch.device = "cpu"
    ) -> LPIPS:
        """LPIPS with weights read from local files (``.safetensors``, or ``.pth``/``.pt``/``.ckpt``/
        ``.bin`` read with ``torch.load(weights_only=True)``: no code runs while loading).

        - ``vgg_path``: ImageNet VGG16 weights in torchvision's format, keys ``features.N.weight`` /
          ``features.N.bias`` or ``N.weight`` / ``N.bias`` (e.g. torchvision's
          ``vgg16-397923af.pth``; its ``classifier.*`` entries are ignored).
        - ``lin_path``: the LPIPS release's lin weights (``lpips/weights/v0.1/vgg.pth``, or taming's
          ``vgg_lpips.pth``), keys ``lin0.model.1.weight`` ... ``lin4.model.1.weight``, shape
          ``(1, C, 1, 1)``, all >= 0.

        A missing, unexpected or misshapen key raises :class:`~ldm_lib.interop.keys.KeyMismatchError`
        (a ``ValueError``) that lists them; nothing is loaded then.
        """
        model = cls()
        vgg = {}
        for key, value in read_state_dict(vgg_path).items():
            if key.startswith("classifier."):  # a whole torchvision vgg16: only the conv stack is used
                continue
            vgg[f"features.{key}" if key[:1].isdigit() else key] = value
        expected_vgg = {k: tuple(v.shape) for k, v in model.net.state_dict().items()}
        check_keys(
            expected_vgg, vgg, f"VGG16 weights {str(vgg_path)!r}",
            hint="expected torchvision vgg16 keys features.N.weight/bias (or N.weight/bias), N in "
            f"{sorted({int(k.split('.')[1]) for k in expected_vgg})}",
        )  # fmt: skip
        lin = read_state_dict(lin_path)
        expected_lin = {f"lin{i}.{k}": tuple(v.shape) for i, m in enumerate(model.lins) for k, v in
                        m.state_dict().items()}  # fmt: skip
        check_keys(
            expected_lin, lin, f"LPIPS lin weights {str(lin_path)!r}",
            hint="expected the LPIPS release format (lpips/weights/v0.1/vgg.pth): lin0.model.1.weight "
            "... lin4.model.1.weight",
        )  # fmt: skip
        negative = [k for k, v in lin.items() if (v < 0).any()]
        if negative:
            raise ValueError(
                f"LPIPS lin weights {str(lin_path)!r} have negative entries in {negative}; LPIPS weights "
                "are >= 0 (clamped in training), otherwise the distance can be negative"
            )
        with torch.no_grad():
            model.net.load_state_dict({k: v.float() for k, v in vgg.items()}, strict=True)
            for i, m in enumerate(model.lins):
                m.load_state_dict({"model.1.weight": lin[f"lin{i}.model.1.weight"].float()}, strict=True)
        return model.to(device)


# ----------------------------------------------------------------------------------- discriminator


class PatchDiscriminator(nn.Module):
    r"""The PatchGAN discriminator of pix2pix (Isola et al. 2017, arXiv 1611.07004, §3.2.2), as
    taming's ``NLayerDiscriminator``: ``n_layers`` stride-2 4x4 convolutions (channels ``ndf``,
    ``2 ndf``, ... capped at ``8 ndf``), one stride-1 4x4 conv, then a 4x4 conv to one channel, with
    LeakyReLU(0.2) and a norm after every conv but the first and last. It returns per-patch logits
    ``(B, 1, h, w)``, :math:`h = \lfloor H/2^{n}\rfloor - 2`; each logit sees a 70x70 patch for
    ``n_layers=3`` (34 for 2), so the GAN judges local texture, where L1 blurs.

    ``norm="batch"`` is taming's (conv biases off, as the norm has its own); ``"group"``
    (GroupNorm with ``num_groups`` groups) does not depend on the batch. Layer names (``main.N``)
    match taming's, so its discriminator weights load.
    """

    def __init__(
        self,
        in_channels: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        norm: str = "batch",
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        check_number("in_channels", in_channels, low=1, integer=True)
        check_number("ndf", ndf, low=1, integer=True)
        check_number("n_layers", n_layers, low=1, integer=True)
        check_choice("norm", norm, DISC_NORMS)
        if norm == "group":
            check_number("num_groups", num_groups, low=1, integer=True)
            if ndf % num_groups:  # every width is ndf * 2^k, so dividing ndf is enough
                raise ValueError(f"num_groups={num_groups!r} must divide ndf={ndf} for norm='group'")
        self.n_layers = n_layers

        def norm_layer(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(num_groups, channels)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last of these keeps the resolution
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_discriminator)

    @property
    def min_size(self) -> int:
        r"""The smallest input side with at least one logit: :math:`3 \cdot 2^{n}`."""
        return 3 * 2**self.n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"PatchDiscriminator(n_layers={self.n_layers}) got an input of shape {tuple(x.shape)}; "
                f"expected (B, C, H, W) with H, W >= {self.min_size} (fewer layers for smaller images)"
            )
        return self.main(x)


def _init_discriminator(m: nn.Module) -> None:
    """DCGAN's initialisation (Radford et al. 2016, arXiv 1511.06434), as pix2pix and taming:
    conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------- GAN objectives


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    r"""Hinge discriminator loss (Lim & Ye 2017, arXiv 1705.02894; Miyato et al. 2018, arXiv 1802.05957):

    .. math::  \mathcal L_D = \tfrac12\big(\mathbb E\,\max(0, 1 - D(x))
               + \mathbb E\,\max(0, 1 + D(\hat x))\big),

    means over every logit (every patch of every image)."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    r"""The original GAN discriminator loss (Goodfellow et al. 2014, arXiv 1406.2661), binary
    cross-entropy on logits:

    .. math::  \mathcal L_D = \tfrac12\big(\mathbb E\,\mathrm{softplus}(-D(x))
               + \mathbb E\,\mathrm{softplus}(D(\hat x))\big)
               = -\tfrac12\big(\mathbb E \log\sigma(D(x)) + \mathbb E\log(1 - \sigma(D(\hat x)))\big)."""
    return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    r"""The autoencoder's adversarial loss, :math:`\mathcal L_G = -\mathbb E\, D(\hat x)` (taming and
    LDM use it with both discriminator losses; Esser et al. 2021, arXiv 2012.09841)."""
    return -logits_fake.float().mean()


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    r"""The adaptive weight of the GAN term (Esser et al. 2021, arXiv 2012.09841, eq. 7):

    .. math::  \lambda = \frac{\lVert\nabla_{G_L}\mathcal L_{\rm rec}\rVert}
               {\lVert\nabla_{G_L}\mathcal L_G\rVert + 10^{-4}},

    with :math:`G_L` the decoder's last layer (``vae.decoder.conv_out.weight``): it scales the GAN
    gradient to the size of the reconstruction gradient, whatever the two losses' scales. Clamped to
    ``[0, max_weight]`` and detached (a weight, not a term to differentiate). The graph is kept
    (``retain_graph=True``), so the total loss can still be backpropagated.
    """
    check_number("max_weight", max_weight, low=0.0)
    if not last_layer_weight.requires_grad:
        raise ValueError("last_layer_weight does not require grad; pass the decoder's trainable last weight")
    grads = []
    for name, loss in (("rec_loss", rec_loss), ("g_loss", g_loss)):
        if not loss.requires_grad:
            raise ValueError(f"{name} has no graph (computed under no_grad?); the adaptive weight needs one")
        (grad,) = torch.autograd.grad(loss, last_layer_weight, retain_graph=True, allow_unused=True)
        if grad is None:
            raise ValueError(
                f"{name} does not depend on last_layer_weight; pass the weight of the layer that produced "
                "the reconstruction (vae.decoder.conv_out.weight)"
            )
        grads.append(grad)
    weight = torch.linalg.vector_norm(grads[0]) / (torch.linalg.vector_norm(grads[1]) + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# ------------------------------------------------------------------------------------------ config


@dataclass
class VAELossConfig:
    """The stage-1 loss (section ``vae_loss`` of a training config). Defaults: L1 + 1e-6 KL, as LDM
    without its perceptual and GAN terms; see the module docstring for the equation and reduction."""

    reconstruction: str = "l1"  # l1 | l2: rho in sum_i rho(x_i - recon_i)
    reconstruction_weight: float = 1.0  # w_rec
    kl_weight: float = 1e-6  # beta (LDM kl-f8: 1e-6), against the sum-over-pixels reconstruction
    perceptual_weight: float = 0.0  # w_p of LPIPS (LDM: 1.0); > 0 needs both lpips paths
    lpips_vgg_path: str | None = None  # torchvision vgg16 weights (.safetensors or .pth)
    lpips_lin_path: str | None = None  # LPIPS v0.1 vgg lin weights (.safetensors or .pth)
    adversarial_weight: float = 0.0  # w_adv of the patch GAN (LDM: 0.5); 0 = no discriminator
    disc_start: int = 50001  # step from which the GAN terms are on (LDM kl-f8: 50001)
    disc_loss: str = "hinge"  # hinge | vanilla
    disc_lr: float = 1e-4  # the discriminator's Adam learning rate
    disc_betas: tuple[float, float] = (0.5, 0.9)  # its Adam betas (taming/LDM)
    disc_layers: int = 3  # stride-2 layers of the PatchGAN (3: 70x70 patches, needs >= 24 px)
    disc_channels: int = 64  # ndf, the first layer's width
    disc_norm: str = "batch"  # batch (taming) | group
    disc_num_groups: int = 32  # GroupNorm groups when disc_norm=group; must divide disc_channels

    def __post_init__(self) -> None:
        p = "vae_loss."
        check_choice(p + "reconstruction", self.reconstruction, RECONSTRUCTIONS)
        for name in ("reconstruction_weight", "kl_weight", "perceptual_weight", "adversarial_weight"):
            check_number(p + name, getattr(self, name), low=0.0)
        if self.perceptual_weight > 0:
            missing = [k for k in ("lpips_vgg_path", "lpips_lin_path") if not getattr(self, k)]
            if missing:
                unset = " and ".join(p + k for k in missing) + (" is" if len(missing) == 1 else " are")
                raise ValueError(
                    f"{p}perceptual_weight={self.perceptual_weight!r} needs local LPIPS weights, but {unset} "
                    f"not set; set {p}lpips_vgg_path (torchvision vgg16 weights) and {p}lpips_lin_path "
                    f"(LPIPS v0.1 vgg.pth), or {p}perceptual_weight=0"
                )
        check_number(p + "disc_start", self.disc_start, low=0, integer=True)
        check_choice(p + "disc_loss", self.disc_loss, DISC_LOSSES)
        check_number(p + "disc_lr", self.disc_lr, low=0.0, low_open=True)
        betas = tuple(self.disc_betas) if isinstance(self.disc_betas, (list, tuple)) else None
        if betas is None or len(betas) != 2:
            raise ValueError(f"{p}disc_betas={self.disc_betas!r} must be two numbers in [0, 1)")
        for b in betas:
            check_number(f"{p}disc_betas entry (in {betas!r})", b, low=0.0, high=1.0, high_open=True)
        self.disc_betas = betas
        check_number(p + "disc_layers", self.disc_layers, low=1, integer=True)
        check_number(p + "disc_channels", self.disc_channels, low=1, integer=True)
        check_choice(p + "disc_norm", self.disc_norm, DISC_NORMS)
        check_number(p + "disc_num_groups", self.disc_num_groups, low=1, integer=True)
        if self.disc_norm == "group" and self.disc_channels % self.disc_num_groups:
            raise ValueError(
                f"{p}disc_num_groups={self.disc_num_groups!r} does not divide {p}disc_channels="
                f"{self.disc_channels}; allowed: a divisor of disc_channels"
            )


# -------------------------------------------------------------------------------------------- loss


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` treated as constants for the graphs built inside: the generator's
    backward then reaches the images through the discriminator, not its weights."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _floats(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Logged values as Python floats, with one device sync for all of them."""
    device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), None)
    stacked = torch.stack(
        [torch.as_tensor(v, device=device).detach().float().reshape(()) for v in values.values()]
    )
    return dict(zip(values, stacked.tolist(), strict=True))


class VAELoss(nn.Module):
    """The stage-1 loss of the module docstring: holds the LPIPS metric (frozen, when
    ``perceptual_weight > 0``) and the patch discriminator (trainable, when ``adversarial_weight > 0``).

    The discriminator's weights are ``vae_loss.discriminator`` (``None`` without the GAN): that is
    what a checkpoint must save besides the autoencoder, ``vae_loss.discriminator.state_dict()``.
    ``vae_loss.state_dict()`` would also hold the frozen LPIPS weights (``lpips.*``, 59 MB of VGG16),
    which come from their files anyway.
    """

    def __init__(self, config: VAELossConfig | None = None, image_channels: int = 3) -> None:
        super().__init__()
        self.config = config = VAELossConfig() if config is None else config
        if not isinstance(config, VAELossConfig):
            raise ValueError(f"config={config!r} must be a VAELossConfig")
        check_number("image_channels", image_channels, low=1, integer=True)
        self.lpips: LPIPS | None = None
        if config.perceptual_weight > 0:
            if image_channels != 3:
                raise ValueError(
                    f"vae_loss.perceptual_weight={config.perceptual_weight!r} needs RGB images, got "
                    f"image_channels={image_channels}; LPIPS (VGG16) takes 3 channels"
                )
            self.lpips = LPIPS.from_files(config.lpips_vgg_path, config.lpips_lin_path)
        self.discriminator: PatchDiscriminator | None = None
        if config.adversarial_weight > 0:
            self.discriminator = PatchDiscriminator(
                image_channels,
                config.disc_channels,
                config.disc_layers,
                config.disc_norm,
                config.disc_num_groups,
            )
        self._d_loss = hinge_d_loss if config.disc_loss == "hinge" else vanilla_d_loss

    def discriminator_active(self, step: int) -> bool:
        """Whether the GAN terms are on at ``step``: a discriminator exists and ``step >= disc_start``."""
        return self.discriminator is not None and step >= self.config.disc_start

    def make_discriminator_optimizer(self) -> torch.optim.Adam:
        """Adam over the discriminator's parameters with ``disc_lr`` and ``disc_betas`` (taming/LDM)."""
        if self.discriminator is None:
            raise ValueError("vae_loss.adversarial_weight=0: there is no discriminator to optimise")
        cfg = self.config
        return torch.optim.Adam(self.discriminator.parameters(), lr=cfg.disc_lr, betas=cfg.disc_betas)

    @staticmethod
    def _check_images(x: torch.Tensor, recon: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape != recon.shape:
            raise ValueError(
                f"x has shape {tuple(x.shape)} and recon {tuple(recon.shape)}; "
                "expected two equal (B, C, H, W)"
            )

    def generator_step_loss(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        posterior: DiagonalGaussian,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        r"""The autoencoder's loss :math:`\mathcal L` (module docstring) for images ``x`` in
        :math:`[-1, 1]`, their reconstructions and posterior, at training step ``step``.

        ``last_layer`` (the decoder's last weight, ``vae.decoder.conv_out.weight``) is needed when the
        GAN is on at this step, for the adaptive weight :math:`\lambda`. Under ``torch.no_grad()``
        (validation) :math:`\lambda` cannot be computed and is 0, so the adversarial term is logged
        (``g_loss``) but not added. Computed in float32 whatever the autocast dtype.

        Logs: ``loss``, ``rec_loss`` (per-element mean of :math:`\rho`), ``nll_loss``
        (:math:`\mathcal L_{\rm rec}`), ``perceptual_loss`` (mean LPIPS), ``kl_loss``, ``g_loss``,
        ``d_weight`` (:math:`\lambda`), ``disc_factor`` (1 when the GAN terms are on, else 0).
        """
        self._check_images(x, recon)
        cfg = self.config
        active = self.discriminator_active(step)
        if active and torch.is_grad_enabled() and last_layer is None:
            raise ValueError(
                f"step={step} >= vae_loss.disc_start={cfg.disc_start}: the adversarial term needs last_layer "
                "(the decoder's last weight, vae.decoder.conv_out.weight) for its adaptive weight"
            )
        zero = torch.zeros((), device=x.device)
        diff = recon.float() - x.float()
        rho = diff.abs() if cfg.reconstruction == "l1" else diff.square()
        nll = cfg.reconstruction_weight * rho.flatten(1).sum(dim=1)  # (B,): sum over the image's elements
        perceptual = zero
        if self.lpips is not None:
            dtype = self.lpips.shift.dtype
            distance = self.lpips(x.to(dtype), recon.to(dtype)).float()  # (B,)
            nll = nll + cfg.perceptual_weight * x[0].numel() * distance  # LPIPS counted once per element
            perceptual = distance.mean()
        nll_loss = nll.mean()
        if posterior.mean.dtype != torch.float32:  # under autocast: the KL's sum in float32, not bf16
            posterior = type(posterior)(posterior.parameters.float())
        kl_loss = posterior.kl().mean()
        loss = nll_loss + cfg.kl_weight * kl_loss
        g_loss, d_weight = zero, zero
        if active:
            with _frozen(self.discriminator):
                g_loss = generator_loss(self.discriminator(recon))
            if torch.is_grad_enabled():
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer)
            loss = loss + cfg.adversarial_weight * d_weight * g_loss
        logs = _floats(
            {
                "loss": loss, "rec_loss": rho.mean(), "nll_loss": nll_loss, "perceptual_loss": perceptual,
                "kl_loss": kl_loss, "g_loss": g_loss, "d_weight": d_weight, "disc_factor": float(active),
            }
        )  # fmt: skip
        return loss, logs

    def discriminator_step_loss(
        self, x: torch.Tensor, recon: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        r"""The discriminator's loss (hinge or vanilla) on real ``x`` and ``recon`` (both detached: this
        step trains only the discriminator). Before ``disc_start``, or without a discriminator, it is a
        constant zero with no graph and no forward pass: check :meth:`discriminator_active` and skip
        the backward and the optimizer step.

        Logs: ``d_loss``, ``logits_real``, ``logits_fake`` (mean logits), ``disc_factor``.
        """
        self._check_images(x, recon)
        if not self.discriminator_active(step):
            zero = torch.zeros((), device=x.device)
            return zero, {"d_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0, "disc_factor": 0.0}
        # Two passes, not one concatenated batch: with BatchNorm, the statistics of a real-only and a
        # fake-only batch are what taming's discriminator was trained with.
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(recon.detach())
        d_loss = self._d_loss(logits_real, logits_fake)
        logs = _floats(
            {"d_loss": d_loss, "logits_real": logits_real.float().mean(),
             "logits_fake": logits_fake.float().mean(), "disc_factor": 1.0}
        )  # fmt: skip
        return d_loss, logs
