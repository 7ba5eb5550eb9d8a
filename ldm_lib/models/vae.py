r"""The KL autoencoder of latent diffusion: images to a small latent grid and back.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", arXiv 2112.10752, §3.1) runs the diffusion model on the latents of a pretrained
autoencoder instead of on pixels: an image :math:`x \in \mathbb R^{H\times W\times 3}` becomes
:math:`z \in \mathbb R^{h\times w\times c}` with :math:`h = H/f`, :math:`w = W/f`, where the
downsampling factor is :math:`f = 2^{L-1}` for :math:`L` resolution levels (SD: :math:`f = 8`,
:math:`c = 4`, so a 512x512x3 image is a 64x64x4 latent, 48 times fewer numbers).

The autoencoder is a variational one (Kingma & Welling 2014, "Auto-Encoding Variational Bayes",
arXiv 1312.6114). The encoder outputs a diagonal Gaussian posterior
:math:`q(z\mid x) = \mathcal N(\mu(x), \operatorname{diag}\sigma^2(x))`; training minimises

.. math::  \mathcal L = \lVert x - D(z) \rVert + \beta\,
           \mathrm{KL}\big(q(z\mid x)\,\Vert\,\mathcal N(0, I)\big),\quad
           z = \mu + \sigma \odot \varepsilon,\ \varepsilon \sim \mathcal N(0, I),

with a tiny :math:`\beta` (about 1e-6 in LDM): the KL term only keeps the latent space from
drifting to arbitrary scales, it is not meant to make :math:`q(z\mid x)` match the prior.
(LDM adds a perceptual and a patch-GAN loss to the reconstruction term; those live outside this
module.)

Because :math:`\beta` is so small, the latents' scale is whatever the encoder found, not 1. The
diffusion model's noise schedule assumes unit-variance data, so latents are multiplied by a
**scaling factor** before diffusion, :math:`z' = s\,(z - m)`, and divided by it before decoding.
:math:`s = 1/\operatorname{std}(z)` measured on training latents (:func:`latent_scaling_factor`);
it is 0.18215 for Stable Diffusion's VAE. It is stored in :class:`VAEConfig`, because it belongs
to the trained weights, not to the trainer.

Architecture (the SD / LDM "KL-f8" autoencoder): ResNet blocks with GroupNorm and SiLU, a
stride-2 convolution to go down a level, nearest-neighbour upsampling plus a convolution to go up,
and a middle block of two ResNet blocks around one self-attention layer at the lowest resolution.
Parameter names follow the diffusers ``AutoencoderKL`` state dict (``encoder.down_blocks.0.
resnets.0.conv1.weight``, ``encoder.mid_block.attentions.0.to_q.weight``, ``quant_conv.weight``,
...), so a diffusers checkpoint loads with ``load_state_dict(..., strict=True)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_number
from ..kernels.groupnorm_silu import GroupNormSiLU, set_fused
from .attention import Attention, backend_names

# The log-variance is clamped to this range before exponentiating (as in LDM): exp(20/2) = 2.2e4 is
# a standard deviation no trained encoder needs, and exp(-30) keeps log(var) finite in the KL.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass(frozen=True)
class VAEConfig:
    """Sizes of an :class:`AutoencoderKL`. Defaults are Stable Diffusion's VAE (1.x, 2.x)."""

    in_channels: int = 3  # image channels fed to the encoder (3 for RGB)
    out_channels: int = 3  # image channels produced by the decoder
    base_channels: int = 128  # channels of the first (full-resolution) level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # level i has base_channels * channel_mult[i] channels
    num_res_blocks: int = 2  # ResNet blocks per encoder level; the decoder has one more per level
    latent_channels: int = 4  # channels c of the latent z (the encoder emits 2c: mean and log-variance)
    norm_num_groups: int = 32  # GroupNorm groups; must divide every level's channel count
    norm_eps: float = 1e-6  # GroupNorm epsilon
    mid_block_attention: bool = True  # self-attention between the two middle ResNet blocks
    attention_backend: str = "auto"  # "auto" or a name from models.attention.backend_names()
    scaling_factor: float = 0.18215  # s in z' = s * (z - m): 1/std of the latents (SD: 0.18215)
    shift_factor: float = 0.0  # m in z' = s * (z - m): mean of the latents (0 for SD 1.x/2.x/XL)

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks", "latent_channels"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("norm_num_groups", self.norm_num_groups, low=1, integer=True)
        mult = self.channel_mult
        if isinstance(mult, list):  # accept a list (e.g. from YAML) but store a hashable tuple
            mult = tuple(mult)
            object.__setattr__(self, "channel_mult", mult)
        if not isinstance(mult, tuple) or not mult:
            raise ValueError(f"channel_mult={mult!r} must be a non-empty tuple of positive integers")
        for m in mult:
            check_number(f"channel_mult entry (in {mult!r})", m, low=1, integer=True)
        for channels in self.block_channels:
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"norm_num_groups={self.norm_num_groups!r} does not divide the {channels} channels of "
                    f"a level (base_channels={self.base_channels} * channel_mult={mult}); "
                    "allowed: a divisor of every level's channel count"
                )
        check_number("norm_eps", self.norm_eps, low=0.0, low_open=True)
        check_number("scaling_factor", self.scaling_factor, low=0.0, low_open=True)
        check_number("shift_factor", self.shift_factor)
        if not isinstance(self.mid_block_attention, bool):
            raise ValueError(f"mid_block_attention={self.mid_block_attention!r} must be True or False")
        check_choice("attention_backend", self.attention_backend, ("auto", *backend_names()))

    @property
    def block_channels(self) -> tuple[int, ...]:
        """Channels of each level, from full resolution down: ``base_channels * channel_mult[i]``."""
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def downsampling_factor(self) -> int:
        """:math:`f = 2^{L-1}`: one stride-2 step between each pair of the ``L`` levels."""
        return 2 ** (len(self.channel_mult) - 1)


def latent_scaling_factor(latents: torch.Tensor) -> float:
    r"""The scaling factor of a VAE of our own: :math:`s = 1/\operatorname{std}(z)`.

    ``latents`` are unscaled encoder samples of training images (any shape; the standard
    deviation is over all elements, as LDM estimated it on its first batch, Rombach et al. 2022,
    App. D.1). Scaling by ``s`` gives the diffusion model unit-variance data.
    """
    std = latents.detach().float().std().item()
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latents have std={std!r}; need a finite, positive spread to scale by")
    return 1.0 / std


class DiagonalGaussian:
    r"""The encoder's posterior :math:`q(z\mid x) = \mathcal N(\mu, \operatorname{diag}\sigma^2)`.

    Built from the encoder output ``parameters`` of shape ``(B, 2c, h, w)``: the first ``c``
    channels are the mean :math:`\mu`, the last ``c`` the log-variance :math:`\log\sigma^2`,
    clamped to ``[-30, 20]`` (as in LDM) so that :math:`\sigma` never overflows or underflows.
    (Kingma & Welling 2014, arXiv 1312.6114.)
    """

    def __init__(self, parameters: torch.Tensor) -> None:
        if parameters.ndim < 2 or parameters.shape[1] % 2:
            raise ValueError(
                f"parameters has shape {tuple(parameters.shape)}; expected (B, 2c, ...) "
                "with mean and log-variance stacked on dim 1"
            )
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""A differentiable sample, :math:`z = \mu + \sigma\odot\varepsilon`,
        :math:`\varepsilon\sim\mathcal N(0, I)` (the reparameterisation trick, Kingma & Welling 2014,
        §2.4): the randomness is moved into :math:`\varepsilon`, so gradients flow to
        :math:`\mu` and :math:`\sigma`. ``generator`` must live on the parameters' device.
        """
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        r"""The most likely latent, :math:`\mu` (what deterministic encoding uses)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        r""":math:`\mathrm{KL}(q\,\Vert\,\mathcal N(0, I))` per sample, shape ``(B,)``:

        .. math::  \tfrac12 \sum_i \big(\mu_i^2 + \sigma_i^2 - 1 - \log\sigma_i^2\big),

        summed over all non-batch dimensions (Kingma & Welling 2014, App. B).
        """
        dims = tuple(range(1, self.mean.ndim))
        return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=dims)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        r"""Negative log-likelihood of ``x`` under the posterior, per sample, shape ``(B,)``:

        .. math::  \tfrac12 \sum_i \Big(\log 2\pi + \log\sigma_i^2 + \frac{(x_i-\mu_i)^2}{\sigma_i^2}\Big).
        """
        dims = tuple(range(1, self.mean.ndim))
        squared = (x - self.mean) ** 2 / self.var
        return 0.5 * torch.sum(math.log(2 * math.pi) + self.logvar + squared, dim=dims)


class ResnetBlock(nn.Module):
    r"""Pre-activation residual block (He et al. 2016, arXiv 1603.05027), as in LDM:

    .. math::  h = \mathrm{conv}_2\,\mathrm{SiLU}\,\mathrm{GN}_2\;\mathrm{conv}_1\,\mathrm{SiLU}\,
               \mathrm{GN}_1(x),\quad y = \mathrm{shortcut}(x) + h,

    with a 1x1 convolution as shortcut when the channel count changes (the identity otherwise).
    ``norm1``/``norm2`` are :class:`~ldm_lib.kernels.groupnorm_silu.GroupNormSiLU`: GroupNorm's
    parameters, with the SiLU after it included (one fused kernel when switched on).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = GroupNormSiLU(groups, in_channels, eps=eps)  # SiLU(GN(x))
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNormSiLU(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))  # the norms are SiLU(GN(.))
        h = self.conv2(self.norm2(h))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class SpatialSelfAttention(Attention):
    r"""Single-head self-attention over the ``h*w`` positions of a feature map, with a residual:

    .. math::  y = x + W_o\,\mathrm{softmax}\!\Big(\frac{QK^\top}{\sqrt C}\Big)V,\quad
               Q, K, V = \mathrm{GN}(x)\,W_{q,k,v} + b_{q,k,v}

    (Vaswani et al. 2017, arXiv 1706.03762): the course's :class:`~ldm_lib.models.attention.Attention`
    layer with one head as wide as the channels and biased projections, as in the LDM autoencoder,
    applied to the GroupNorm-ed map seen as a sequence of ``h*w`` tokens.
    """

    def __init__(self, channels: int, groups: int, eps: float, backend: str = "auto") -> None:
        super().__init__(channels, None, heads=1, head_dim=channels, bias=True, backend=backend)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        B, C, H, W = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        out = super().forward(tokens)
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Halve the resolution: pad one zero row/column at the bottom/right, then a 3x3 stride-2 conv.

    The asymmetric padding (0, 1, 0, 1) is what SD's VAE was trained with; symmetric padding 1
    gives the same output shape but different numbers, so pretrained weights need this one.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv (no checkerboard artefacts of a
    transposed conv; Odena et al. 2016, "Deconvolution and Checkerboard Artifacts")."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _resnet_stack(channels: list[int], groups: int, eps: float) -> nn.ModuleList:
    """ResNet blocks along ``channels = [in, out, out, ...]``: one block per consecutive pair."""
    pairs = zip(channels[:-1], channels[1:], strict=True)
    return nn.ModuleList(ResnetBlock(c_in, c_out, groups, eps) for c_in, c_out in pairs)


class DownBlock(nn.Module):
    """One encoder level: ResNet blocks, then (except at the lowest level) a :class:`Downsample`.
    The downsampler sits in a list (empty at the lowest level), named ``downsamplers.0`` as in diffusers."""

    def __init__(self, channels: list[int], groups: int, eps: float, downsample: bool) -> None:
        super().__init__()
        self.resnets = _resnet_stack(channels, groups, eps)
        self.downsamplers = nn.ModuleList([Downsample(channels[-1])] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    """One decoder level: ResNet blocks, then (except at full resolution) an :class:`Upsample`,
    named ``upsamplers.0`` as in diffusers."""

    def __init__(self, channels: list[int], groups: int, eps: float, upsample: bool) -> None:
        super().__init__()
        self.resnets = _resnet_stack(channels, groups, eps)
        self.upsamplers = nn.ModuleList([Upsample(channels[-1])] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class MidBlock(nn.Module):
    """ResNet block, self-attention (optional), ResNet block, at the lowest resolution: the only
    place where every position sees every other one."""

    def __init__(self, channels: int, config: VAEConfig) -> None:
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList()  # empty when mid_block_attention is off
        if config.mid_block_attention:
            self.attentions.append(SpatialSelfAttention(channels, groups, eps, config.attention_backend))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image ``(B, in, H, W)`` to posterior parameters ``(B, 2c, H/f, W/f)`` (mean and log-variance)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, groups, eps = config.block_channels, config.norm_num_groups, config.norm_eps
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        levels, c_in = [], ch[0]
        for i, c_out in enumerate(ch):
            last = i == len(ch) - 1
            channels = [c_in] + [c_out] * config.num_res_blocks
            levels.append(DownBlock(channels, groups, eps, downsample=not last))
            c_in = c_out
        self.down_blocks = nn.ModuleList(levels)
        self.mid_block = MidBlock(ch[-1], config)
        self.conv_norm_out = GroupNormSiLU(groups, ch[-1], eps=eps)  # SiLU(GN(.))
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(self.conv_norm_out(h))


class Decoder(nn.Module):
    """Latent ``(B, c, h, w)`` to image ``(B, out, h*f, w*f)``: the encoder's levels in reverse,
    with one more ResNet block per level."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, groups, eps = config.block_channels[::-1], config.norm_num_groups, config.norm_eps
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], config)
        levels, c_in = [], ch[0]
        for i, c_out in enumerate(ch):
            last = i == len(ch) - 1
            channels = [c_in] + [c_out] * (config.num_res_blocks + 1)
            levels.append(UpBlock(channels, groups, eps, upsample=not last))
            c_in = c_out
        self.up_blocks = nn.ModuleList(levels)
        self.conv_norm_out = GroupNormSiLU(groups, ch[-1], eps=eps)  # SiLU(GN(.))
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(self.conv_norm_out(h))


class AutoencoderKL(nn.Module):
    r"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, arXiv 2112.10752;
    Kingma & Welling 2014, arXiv 1312.6114).

    ``encode(x)`` gives the posterior :math:`q(z\mid x)`, ``decode(z)`` the image. Between them sit
    two 1x1 convolutions, ``quant_conv`` (on the 2c posterior parameters) and ``post_quant_conv``
    (on z), kept from LDM's VQ variant so that pretrained weights load. The diffusion model sees
    the *scaled* latents of :meth:`encode_latents` and hands them back to :meth:`decode_latents`.
    """

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config = VAEConfig() if config is None else config
        if not isinstance(config, VAEConfig):
            raise ValueError(f"config={config!r} must be a VAEConfig")
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def downsampling_factor(self) -> int:
        """:math:`f = 2^{L-1}`: an ``H x W`` image becomes an ``H/f x W/f`` latent."""
        return self.config.downsampling_factor

    def set_attention_backend(self, backend: str) -> None:
        """Switch the middle blocks' attention to ``backend`` ("auto" or a registered name)."""
        self.config = dataclasses.replace(self.config, attention_backend=backend)  # validates the name
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    def set_fused_groupnorm_silu(self, enabled: bool = True) -> None:
        """Compute every SiLU(GroupNorm(x)) (ResNet blocks, output norms) with the fused Triton kernel
        of :mod:`ldm_lib.kernels.groupnorm_silu`, or with torch's ops; the weights are the same. A
        runtime switch, not a :class:`VAEConfig` field: the config is part of the VAE's identity
        (``data.latents.vae_identity``), and how the norm is computed is not. With the kernel on, a
        forward on tensors it cannot run on raises ``ValueError`` saying why."""
        set_fused(self, enabled)

    @property
    def fused_groupnorm_silu(self) -> bool:
        """Whether the fused kernel is on (see :meth:`set_fused_groupnorm_silu`)."""
        return any(m.fused for m in self.modules() if isinstance(m, GroupNormSiLU))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        r"""The posterior :math:`q(z\mid x)` of images ``x`` ``(B, in, H, W)`` in ``[-1, 1]``;
        ``H`` and ``W`` must be multiples of :attr:`downsampling_factor`."""
        f = self.downsampling_factor
        if x.ndim != 4 or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; expected (B, C, H, W) with H and W multiples of the "
                f"downsampling factor {f}"
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``(B, out, h*f, w*f)`` from unscaled latents ``z`` ``(B, c, h, w)``."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct ``x`` through a sample of the posterior (or its mode); returns
        ``(reconstruction, posterior)``, what a training loss needs."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        r"""The latents the diffusion model is trained on, :math:`z' = s\,(z - m)`, with
        :math:`z \sim q(z\mid x)` (or its mode when ``sample=False``), :math:`s` the config's
        ``scaling_factor`` and :math:`m` its ``shift_factor``."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        r"""Images from diffusion-space latents: undo the scaling, :math:`z = z'/s + m`, then decode."""
        return self.decode(latents / self.config.scaling_factor + self.config.shift_factor)
