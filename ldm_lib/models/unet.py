r"""The Stable Diffusion UNet: predicts the noise (or v, or x0) in a latent, given the timestep and text.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
arXiv 2112.10752) trains :math:`\epsilon_\theta(z_t, t, \tau(y))` on autoencoder latents :math:`z`,
with the text encoding :math:`\tau(y)` entering through cross-attention (§3.3). The network is the
UNet of Ho et al. 2020 (arXiv 2006.11239, App. B) as improved by Dhariwal & Nichol 2021
(arXiv 2105.05233), with a transformer after ResNet blocks at the chosen resolutions:

- ``timestep_embedding`` + ``time_embedding``: t -> sinusoids -> MLP, added inside every ResNet block;
- ``down_blocks``: per level, ResNet blocks (+ transformers), then a stride-2 conv (not the last level);
- ``mid_block``: ResNet, transformer, ResNet at the lowest resolution;
- ``up_blocks``: per level, one more ResNet block than on the way down, each fed the concatenation of
  the current features and a skip connection saved on the way down; then a nearest-neighbour x2
  upsampling and a conv (not the last level);
- ``conv_norm_out``, ``conv_out``: back to the latent channels.

Module and parameter names follow diffusers' ``UNet2DConditionModel`` (``down_blocks.0.resnets.0.conv1``,
``...attentions.0.transformer_blocks.0.attn2.to_k``, ``time_embedding.linear_1``, ...), so its state dicts
load here with ``strict=True`` and back. ``DownBlock`` stands for its CrossAttnDownBlock2D and
DownBlock2D, ``MidBlock`` for UNetMidBlock2DCrossAttn, ``UpBlock`` for CrossAttnUpBlock2D and UpBlock2D.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._checks import check_choice, check_number
from ..kernels.groupnorm_silu import GroupNormSiLU, set_fused
from .attention import Attention, backend_names


@dataclass
class UNetConfig:
    """Sizes and options of the UNet. Defaults are Stable Diffusion 1.x; see ``presets.unet_config``,
    and ``to_diffusers_config``/``from_diffusers_config`` for diffusers' names of the same options."""

    in_channels: int = 4  # latent channels coming in (4 for SD's autoencoder)
    out_channels: int = 4  # channels predicted (epsilon, v or x0 have the latents' shape)
    model_channels: int = 320  # channels of the first level; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one entry per level; each level but the last halves H, W
    num_res_blocks: int = 2  # ResNet blocks per level going down (going up: one more, for the extra skip)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with a transformer after each ResNet block;
    #                                                the middle block always has one
    num_heads: int | None = 8  # attention heads per transformer (SD1: 8) ...
    head_dim: int | None = None  # ... or channels per head, heads = channels // head_dim (SD2: 64); set one
    context_dim: int = 768  # width of the text tokens (CLIP ViT-L/14: 768, OpenCLIP ViT-H/14: 1024)
    use_linear_projection: bool = False  # transformer proj_in/proj_out: 1x1 conv (SD1) or linear (SD2)
    transformer_depth: int = 1  # BasicTransformerBlocks in each transformer
    norm_num_groups: int = 32  # GroupNorm groups; every level's channels must be divisible by it
    norm_eps: float = 1e-5  # GroupNorm epsilon of the ResNet blocks and the output norm
    dropout: float = 0.0  # dropout inside the ResNet blocks (where SD has it)
    attention_dropout: float = 0.0  # dropout after attention and in the feed-forward (0 in SD)
    flip_sin_to_cos: bool = True  # timestep embedding as [cos, sin] (SD) instead of [sin, cos]
    freq_shift: float = 0.0  # timestep embedding frequency shift (SD: 0, DDPM: 1); see timestep_embedding
    zero_init: bool = True  # start every residual branch and conv_out at zero, as the original LDM code
    gradient_checkpointing: bool = False  # recompute ResNet/transformer activations in backward (training)
    attention_backend: str = "auto"  # "auto" or a name from models.attention.backend_names()
    fused_groupnorm_silu: bool = False  # SiLU(GroupNorm(x)) by one Triton kernel (kernels.groupnorm_silu):
    #                                     CUDA, or CPU with TRITON_INTERPRET=1; same weights either way

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        self.validate()

    @property
    def block_channels(self) -> tuple[int, ...]:
        """Channels of each level: ``model_channels * channel_mult[i]``."""
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding MLP: 4 x model_channels (Ho et al. 2020)."""
        return 4 * self.model_channels

    def heads(self, channels: int) -> int:
        """Attention heads of a transformer with ``channels`` channels."""
        return self.num_heads if self.num_heads is not None else channels // self.head_dim

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option, its value and what is allowed."""
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "context_dim"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("transformer_depth", self.transformer_depth, low=1, integer=True)
        check_number("norm_num_groups", self.norm_num_groups, low=1, integer=True)
        check_number("norm_eps", self.norm_eps, low=0.0, low_open=True)
        check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_number("attention_dropout", self.attention_dropout, low=0.0, high=1.0, high_open=True)
        check_number("freq_shift", self.freq_shift)
        check_choice("attention_backend", self.attention_backend, ("auto", *backend_names()))
        if not isinstance(self.fused_groupnorm_silu, bool):
            raise ValueError(f"fused_groupnorm_silu={self.fused_groupnorm_silu!r} must be True or False")
        if not self.channel_mult:
            raise ValueError("channel_mult=() is empty; give a positive integer per level, e.g. (1, 2, 4, 4)")
        for m in self.channel_mult:
            check_number("channel_mult entries", m, low=1, integer=True)
        levels = range(len(self.channel_mult))
        for level in self.attention_levels:
            check_choice("attention_levels entries", level, levels)
        if len(set(self.attention_levels)) != len(self.attention_levels):
            raise ValueError(f"attention_levels={self.attention_levels!r} repeats a level")
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(
                f"num_heads={self.num_heads!r}, head_dim={self.head_dim!r}: set exactly one of them "
                "(SD1 fixes num_heads=8, SD2 fixes head_dim=64)"
            )
        key = "num_heads" if self.num_heads is not None else "head_dim"
        check_number(key, getattr(self, key), low=1, integer=True)
        for level, c in enumerate(self.block_channels):
            if c % self.norm_num_groups:
                raise ValueError(
                    f"norm_num_groups={self.norm_num_groups} does not divide the {c} channels of level "
                    f"{level} (model_channels={self.model_channels} x channel_mult[{level}]); allowed: a "
                    "divisor of every level's channels"
                )
            has_transformer = level in self.attention_levels or level == len(self.channel_mult) - 1
            if has_transformer and c % getattr(self, key):
                raise ValueError(
                    f"{key}={getattr(self, key)} does not divide the {c} channels of level {level}, which "
                    "has a transformer (the last level always has one, in the middle block)"
                )


# ---------------------------------------------------------------------------------------- timesteps


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    max_period: float = 10000,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0,
) -> torch.Tensor:
    r"""Sinusoidal embedding of timesteps ``(B,)`` -> ``(B, dim)``, float32.

    The positional encoding of Vaswani et al. 2017 (arXiv 1706.03762, §3.5) applied to the diffusion
    step, as in Ho et al. 2020 (arXiv 2006.11239, App. B). With :math:`h = \lfloor dim/2 \rfloor`,
    :math:`s` = ``downscale_freq_shift`` and :math:`P` = ``max_period``,

    .. math:: \omega_i = P^{-i/(h - s)},\ i = 0..h-1, \qquad
              e(t) = [\cos(t\omega_0..t\omega_{h-1}),\ \sin(t\omega_0..t\omega_{h-1})]

    Frequencies fall geometrically from 1 to about :math:`1/P`: fast ones tell neighbouring steps
    apart, slow ones give the coarse position in the chain. Stable Diffusion puts the cosines first
    (``flip_sin_to_cos=True``) and uses :math:`s = 0`; DDPM's code puts sines first with :math:`s = 1`.
    An odd ``dim`` gets a zero last column.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (B,), got shape {tuple(timesteps.shape)}")
    check_number("dim", dim, low=1, integer=True)
    half = dim // 2
    if half - downscale_freq_shift <= 0:
        raise ValueError(f"downscale_freq_shift={downscale_freq_shift!r} must be < dim // 2 = {half}")
    # omega_i = P^(-i / (h - s))
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    omega = torch.exp(exponent / (half - downscale_freq_shift))
    args = timesteps[:, None].float() * omega[None, :]
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    r"""The MLP on the sinusoids: :math:`W_2\,\mathrm{SiLU}(W_1 e(t) + b_1) + b_2` (Ho et al. 2020)."""

    def __init__(self, in_dim: int, time_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


# ------------------------------------------------------------------------------------------- blocks


class Checkpointable(nn.Module):
    """A block whose activations can be recomputed in backward instead of stored (gradient
    checkpointing, Chen et al. 2016, arXiv 1604.06174): less memory for about one more forward.
    Subclasses implement ``block``; checkpointing applies only when training with gradients on."""

    gradient_checkpointing: bool = False

    def forward(self, *args: Any) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.block, *args, use_reentrant=False)
        return self.block(*args)

    def block(self, *args: Any) -> torch.Tensor:
        raise NotImplementedError


class ResnetBlock2D(Checkpointable):
    r"""ResNet block with the time embedding added between its two convolutions (Ho et al. 2020,
    App. B; He et al. 2016):

    .. math:: h = W_1 * \mathrm{SiLU}(\mathrm{GN}(x)) + W_t\,\mathrm{SiLU}(e_t),\quad
              y = \mathrm{skip}(x) + W_2 * \mathrm{Dropout}(\mathrm{SiLU}(\mathrm{GN}(h)))

    ``skip`` is a 1x1 conv (``conv_shortcut``) when the channel count changes, else the identity.
    ``norm1``/``norm2`` are :class:`~ldm_lib.kernels.groupnorm_silu.GroupNormSiLU`: GroupNorm's
    parameters, with the SiLU after it included (one fused kernel when switched on).
    """

    def __init__(
        self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float, dropout: float
    ) -> None:
        super().__init__()
        self.norm1 = GroupNormSiLU(groups, in_ch, eps=eps)  # SiLU(GN(x))
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = GroupNormSiLU(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def block(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))  # norm1 is SiLU(GN(.))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # one shift per channel
        h = self.conv2(self.dropout(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class GEGLU(nn.Module):
    r"""Gated GELU unit (Shazeer 2020, "GLU Variants Improve Transformer", arXiv 2002.05202):
    :math:`\mathrm{GEGLU}(x) = (xW + b) \odot \mathrm{GELU}(xV + c)`, W and V stacked in ``proj``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer's position-wise MLP: GEGLU to 4 x dim, dropout, linear back to dim."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(Checkpointable):
    r"""Pre-norm transformer block on image tokens (Rombach et al. 2022, arXiv 2112.10752, §3.3):

    .. math:: x \mathrel{+}= \mathrm{SelfAttn}(\mathrm{LN}(x)),\quad
              x \mathrel{+}= \mathrm{CrossAttn}(\mathrm{LN}(x), c),\quad
              x \mathrel{+}= \mathrm{FF}(\mathrm{LN}(x))

    ``attn1`` lets image positions talk to each other, ``attn2`` reads the text tokens ``c``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, head_dim, dropout=dropout, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, dropout=dropout, backend=backend)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def block(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project in, treat the H x W positions as tokens, transformer
    blocks, project out, add to the input (Rombach et al. 2022, §3.3). The projections are 1x1 convs
    (SD1) or linear layers on the tokens (SD2): the same maps, with differently shaped weights."""

    def __init__(self, channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        c = channels  # the tokens keep the width of the feature map: heads x head_dim = c
        heads = cfg.heads(c)
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, c, eps=1e-6)  # SD fixes 1e-6 here
        self.proj_in = nn.Linear(c, c) if self.linear else nn.Conv2d(c, c, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                c, heads, c // heads, cfg.context_dim, cfg.attention_dropout, cfg.attention_backend
            )
            for _ in range(cfg.transformer_depth)
        )
        self.proj_out = nn.Linear(c, c) if self.linear else nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, -1)  # (B, C, H, W) -> (B, H*W tokens, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, -1).permute(0, 3, 1, 2)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Downsample2D(nn.Module):
    """Halve H and W with a 3x3 convolution of stride 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling to ``size`` (twice the input, or an odd skip's size), then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def _resnet(in_ch: int, out_ch: int, cfg: UNetConfig) -> ResnetBlock2D:
    return ResnetBlock2D(in_ch, out_ch, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout)


class DownBlock(nn.Module):
    """One level going down: ResNet blocks (each followed by a transformer at attention levels), then
    a stride-2 conv except at the last level. Every output is kept as a skip connection."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, attention: bool, downsample: bool) -> None:
        super().__init__()
        n = cfg.num_res_blocks
        self.resnets = nn.ModuleList(_resnet(in_ch if i == 0 else out_ch, out_ch, cfg) for i in range(n))
        self.attentions = (
            nn.ModuleList(Transformer2DModel(out_ch, cfg) for _ in range(n)) if attention else None
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """The lowest resolution: ResNet, transformer, ResNet."""

    def __init__(self, channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(channels, channels, cfg), _resnet(channels, channels, cfg)])
        self.attentions = nn.ModuleList([Transformer2DModel(channels, cfg)])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class UpBlock(nn.Module):
    """One level going up: ResNet blocks on [features, skip] concatenated along channels (each followed
    by a transformer at attention levels), then nearest x2 upsampling and a conv except at level 0."""

    def __init__(self, in_chs: list[int], out_ch: int, cfg: UNetConfig, attention: bool, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(c, out_ch, cfg) for c in in_chs)
        self.attentions = (
            nn.ModuleList(Transformer2DModel(out_ch, cfg) for _ in in_chs) if attention else None
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, skips: list[torch.Tensor]):
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size=skips[-1].shape[-2:])
        return h


# --------------------------------------------------------------------------------------------- UNet


class UNet(nn.Module):
    r"""The text-conditioned UNet of Stable Diffusion (Rombach et al. 2022, arXiv 2112.10752):
    ``forward(x, timesteps, context)`` maps noisy latents ``(B, C, H, W)``, timesteps ``(B,)`` or a
    scalar and text tokens ``(B, L, context_dim)`` to a prediction shaped like ``x``. H and W need not
    be powers of two: upsampling lands on each skip connection's size.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        chs, n = config.block_channels, config.num_res_blocks
        self.conv_in = nn.Conv2d(config.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], config.time_embed_dim)

        skip_chs, in_ch = [chs[0]], chs[0]  # channels of the skips, in the order they are saved
        self.down_blocks = nn.ModuleList()
        for level, out_ch in enumerate(chs):
            last = level == len(chs) - 1
            attention = level in config.attention_levels
            self.down_blocks.append(DownBlock(in_ch, out_ch, config, attention, downsample=not last))
            skip_chs += [out_ch] * (n if last else n + 1)
            in_ch = out_ch

        self.mid_block = MidBlock(chs[-1], config)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(chs))):
            out_ch, in_chs = chs[level], []
            for _ in range(n + 1):  # each ResNet block eats one skip, last saved first
                in_chs.append(in_ch + skip_chs.pop())
                in_ch = out_ch
            attention = level in config.attention_levels
            self.up_blocks.append(UpBlock(in_chs, out_ch, config, attention, upsample=level > 0))

        self.conv_norm_out = GroupNormSiLU(config.norm_num_groups, chs[0], eps=config.norm_eps)  # SiLU(GN)
        self.conv_out = nn.Conv2d(chs[0], config.out_channels, 3, padding=1)

        if config.zero_init:
            self._zero_residual_branches()
        self.set_gradient_checkpointing(config.gradient_checkpointing)
        self.set_fused_groupnorm_silu(config.fused_groupnorm_silu)

    def _zero_residual_branches(self) -> None:
        # As the original LDM code: each block starts as the identity and the output as zero, so the
        # untrained network is a stack of skips and early training is stable.
        last_layers = [self.conv_out]
        for module in self.modules():
            if isinstance(module, ResnetBlock2D):
                last_layers.append(module.conv2)
            elif isinstance(module, Transformer2DModel):
                last_layers.append(module.proj_out)
        for layer in last_layers:
            for p in layer.parameters():
                nn.init.zeros_(p)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ResNet and transformer block activations in backward (training only)."""
        self.config = dataclasses.replace(self.config, gradient_checkpointing=bool(enabled))
        for module in self.modules():
            if isinstance(module, Checkpointable):
                module.gradient_checkpointing = bool(enabled)

    def set_attention_backend(self, backend: str) -> None:
        """Switch every attention layer to ``backend`` ("auto" or a registered name)."""
        self.config = dataclasses.replace(self.config, attention_backend=backend)  # validates the name
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    def set_fused_groupnorm_silu(self, enabled: bool = True) -> None:
        """Compute every SiLU(GroupNorm(x)) (ResNet blocks, output) with the fused Triton kernel of
        :mod:`ldm_lib.kernels.groupnorm_silu`, or with torch's ops; the weights are the same. With the
        kernel on, a forward on tensors it cannot run on (CPU without TRITON_INTERPRET=1, no triton)
        raises ``ValueError`` saying why."""
        self.config = dataclasses.replace(self.config, fused_groupnorm_silu=enabled)  # validates
        set_fused(self, enabled)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor
    ) -> torch.Tensor:
        cfg = self.config
        B = x.shape[0]
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be (B={B}, L, {cfg.context_dim}), got {tuple(context.shape)}")
        t = torch.as_tensor(timesteps, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t
        if t.shape != (B,):
            raise ValueError(f"timesteps must be a scalar or shaped (B={B},), got {tuple(t.shape)}")

        emb = timestep_embedding(t, cfg.model_channels, 10000, cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(emb.to(x.dtype))

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, saved = block(h, temb, context)
            skips += saved
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            h = block(h, temb, context, skips)
        return self.conv_out(self.conv_norm_out(h))  # conv_norm_out is SiLU(GN(.))


# ----------------------------------------------------------------------------- diffusers configs
# Translation to and from the config of diffusers' UNet2DConditionModel (config.json of a diffusers
# checkpoint), so real weights load with an identity key map and the parity tests build the same net.


def to_diffusers_config(config: UNetConfig) -> dict[str, Any]:
    """Keyword arguments for diffusers' ``UNet2DConditionModel`` that build the same network.

    diffusers calls the per-level head count ``attention_head_dim`` (a historical misnomer).
    """
    L = len(config.channel_mult)
    cross = [level in config.attention_levels for level in range(L)]
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": config.block_channels,
        "layers_per_block": config.num_res_blocks,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cross),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cross)),
        "attention_head_dim": config.num_heads
        if config.num_heads is not None
        else tuple(max(1, c // config.head_dim) for c in config.block_channels),
        "cross_attention_dim": config.context_dim,
        "use_linear_projection": config.use_linear_projection,
        "transformer_layers_per_block": config.transformer_depth,
        "norm_num_groups": config.norm_num_groups,
        "norm_eps": config.norm_eps,
        "dropout": config.dropout,
        "flip_sin_to_cos": config.flip_sin_to_cos,
        "freq_shift": config.freq_shift,
    }


# diffusers options that must keep these values for the SD 1.x/2.x layout built here.
_DIFFUSERS_FIXED: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu", "center_input_sample": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "only_cross_attention": False,
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
    "num_class_embeds": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "cross_attention_norm": None, "num_attention_heads": None,
    "reverse_transformer_layers_per_block": None, "mid_block_only_cross_attention": None,
}  # fmt: skip


def from_diffusers_config(config: Mapping[str, Any], **overrides: Any) -> UNetConfig:
    """The config of a diffusers ``UNet2DConditionModel`` (its ``config.json``) as a ``UNetConfig``;
    ``ValueError`` for options this UNet does not have (SDXL's added embeddings, for example)."""
    for option, default in _DIFFUSERS_FIXED.items():
        if config.get(option, default) != default:
            raise ValueError(
                f"diffusers option {option}={config[option]!r} is not supported; this UNet is the "
                f"SD 1.x/2.x layout, which needs {option}={default!r}"
            )
    down = tuple(config["down_block_types"])
    for t in down:
        check_choice("down_block_types entries", t, ("CrossAttnDownBlock2D", "DownBlock2D"))
    mirror = tuple(t.replace("Down", "Up") for t in reversed(down))
    if tuple(config["up_block_types"]) != mirror:
        raise ValueError(
            f"up_block_types={config['up_block_types']!r} must mirror down_block_types: {mirror}"
        )
    channels = tuple(config["block_out_channels"])
    depth = config.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        if len(set(depth)) != 1:
            raise ValueError(f"transformer_layers_per_block={depth!r}: only one depth for all levels")
        depth = depth[0]
    attention_levels = tuple(i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D")
    heads = config.get("attention_head_dim", 8)
    num_heads = head_dim = None
    if isinstance(heads, int):
        num_heads = heads
    else:  # per-level head counts: a common head size (SD2) or a common count
        levels = sorted({*attention_levels, len(channels) - 1})
        dims = {channels[i] // heads[i] for i in levels}
        if len(dims) == 1 and all(channels[i] % heads[i] == 0 for i in levels):
            head_dim = dims.pop()
        elif len({heads[i] for i in levels}) == 1:
            num_heads = heads[levels[0]]
        else:
            raise ValueError(f"attention_head_dim={heads!r}: neither the head count nor size is constant")
    model_channels = channels[0]
    if any(c % model_channels for c in channels):
        raise ValueError(f"block_out_channels={channels!r} must be multiples of the first entry")
    fields = {
        "in_channels": config.get("in_channels", 4),
        "out_channels": config.get("out_channels", 4),
        "model_channels": model_channels,
        "channel_mult": tuple(c // model_channels for c in channels),
        "num_res_blocks": config.get("layers_per_block", 2),
        "attention_levels": attention_levels,
        "num_heads": num_heads,
        "head_dim": head_dim,
        "context_dim": config.get("cross_attention_dim", 1280),
        "use_linear_projection": config.get("use_linear_projection", False),
        "transformer_depth": depth,
        "norm_num_groups": config.get("norm_num_groups", 32),
        "norm_eps": config.get("norm_eps", 1e-5),
        "dropout": config.get("dropout", 0.0),
        "flip_sin_to_cos": config.get("flip_sin_to_cos", True),
        "freq_shift": config.get("freq_shift", 0),
    }
    return UNetConfig(**{**fields, **overrides})
