"""Stable Diffusion's original single-file checkpoints (``v1-5-pruned.safetensors``,
``v2-1_768-ema-pruned.ckpt``, ...): the whole latent diffusion model of Rombach et al. 2022
(arXiv 2112.10752) in the layout of the CompVis/Stability code, mapped onto our UNet and autoencoder.

One file holds every part of the ``LatentDiffusion`` module, under a prefix per part:

- ``model.diffusion_model.``: the UNet, as numbered ``nn.Sequential`` containers:
  ``input_blocks.i.k`` (``i`` counts every layer that saves a skip: ``conv_in``, each ResNet block with
  its transformer, each downsampler; ``k`` is the position inside: 0 the ResNet, 1 the transformer),
  ``middle_block.0/1/2``, ``output_blocks.o.k`` (a ResNet, its transformer, the upsampler last),
  ``time_embed.0/2`` and ``out.0/2``; inside a ResNet block ``in_layers.0/2``, ``emb_layers.1``,
  ``out_layers.0/3`` and ``skip_connection`` are our ``norm1``, ``conv1``, ``time_emb_proj``,
  ``norm2``, ``conv2``, ``conv_shortcut``. The transformers use our names already.
- ``first_stage_model.``: the autoencoder, ``encoder.down.l.block.j``, ``encoder.down.l.downsample``,
  ``mid.block_1``, ``mid.attn_1``, ``mid.block_2``, ``norm_out``; the decoder's ``up.l`` is numbered
  by resolution level (``up.0`` is full resolution, run last), ours in the order it runs. The mid
  attention's ``q, k, v, proj_out`` are 1x1 convolutions, weights ``(C, C, 1, 1)``, which are our
  linear layers' ``(C, C)``: :math:`W * x` at one pixel is :math:`Wx`.
- ``cond_stage_model.`` (the text encoder, see ``models.text``), ``model_ema.`` (EMA weights, names
  without dots), and the noise schedule's buffers (``betas``, ``alphas_cumprod``, ...): known, not
  model weights here, skipped. Any other key is reported, never dropped silently.

The key map is derived from the config by walking the network in the order the original code builds
it, not read from a table: :func:`unet_key_map` and :func:`vae_key_map` show it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.unet import UNet, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from .keys import (
    CheckpointError,
    build_and_load,
    check_keys,
    model_state_dict,
    read_state_dict,
    save_safetensors,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
# Known entries that are not UNet or VAE weights: the text encoder (loaded by models.text), the EMA
# copy (unless ema=True), and the autoencoder's training loss (LPIPS and discriminator).
IGNORED_PREFIXES = ("cond_stage_model.", EMA_PREFIX, "first_stage_model.loss.", "loss.")
# LatentDiffusion's noise schedule buffers (Ho et al. 2020's quantities, recomputed by ldm_lib.schedules).
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
)  # fmt: skip
SKIPPED_KEYS = {*SCHEDULE_BUFFERS, EMA_PREFIX + "decay", EMA_PREFIX + "num_updates"}  # EMA's own counters
_HINT = (
    "Is the config right? SD 1.x is presets.unet_config('sd15') (8 heads, 1x1-conv projections, 768-wide "
    "context), SD 2.x 'sd21' (64-channel heads, linear projections, 1024-wide context); the VAE is 'sd'. "
    "Entries that are neither UNet nor VAE weights can be skipped with ignore_prefixes=(...)."
)

# ============================================================================= the rule-based key map

# Names of the layers inside one original module that differ from ours, per kind of module.
RENAMES: dict[str, dict[str, str]] = {
    "same": {},
    "unet_resnet": {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"},
    "downsample": {"conv": "op"},
    "vae_resnet": {"conv_shortcut": "nin_shortcut"},
    "vae_attention": {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"},
}  # fmt: skip
CONV_1X1_KINDS = {"vae_attention"}  # linear weights (C, C) here, 1x1 conv weights (C, C, 1, 1) there


@dataclass(frozen=True)
class Rule:
    """One of our modules (``ours``, a prefix of our parameter names) is the original module ``theirs``;
    the names inside differ as ``RENAMES[kind]`` says."""

    ours: str
    theirs: str
    kind: str = "same"


def _sequential(entry: str, layers: Iterable[tuple[str, str] | None]) -> list[Rule]:
    """An original ``nn.Sequential`` called ``entry`` holding our modules ``(prefix, kind)`` in order
    (``None`` entries are absent layers and take no position)."""
    present = [layer for layer in layers if layer is not None]
    return [Rule(ours, f"{entry}.{k}", kind) for k, (ours, kind) in enumerate(present)]


def unet_rules(config: UNetConfig) -> list[Rule]:
    """Where each of our UNet modules sits in the original ``openaimodel.UNetModel``, found by building
    its block lists in the same order it does."""
    L, n = len(config.channel_mult), config.num_res_blocks
    rules = [Rule("conv_in", "input_blocks.0.0"), Rule("time_embedding.linear_1", "time_embed.0"),
             Rule("time_embedding.linear_2", "time_embed.2")]  # fmt: skip
    i = 1  # input_blocks.0 is conv_in
    for level in range(L):
        attention = level in config.attention_levels
        for j in range(n):  # each ResNet block, with its transformer, is one input block
            resnet = (f"down_blocks.{level}.resnets.{j}", "unet_resnet")
            transformer = (f"down_blocks.{level}.attentions.{j}", "same") if attention else None
            rules += _sequential(f"input_blocks.{i}", [resnet, transformer])
            i += 1
        if level < L - 1:  # so is the downsampler
            rules += _sequential(f"input_blocks.{i}", [(f"down_blocks.{level}.downsamplers.0", "downsample")])
            i += 1
    middle = [("mid_block.resnets.0", "unet_resnet"), ("mid_block.attentions.0", "same"),
              ("mid_block.resnets.1", "unet_resnet")]  # fmt: skip
    rules += _sequential("middle_block", middle)
    o = 0
    for u, level in enumerate(reversed(range(L))):  # up_blocks.0 is the lowest resolution
        attention = level in config.attention_levels
        for j in range(n + 1):  # the last ResNet block of a level also holds its upsampler
            resnet = (f"up_blocks.{u}.resnets.{j}", "unet_resnet")
            transformer = (f"up_blocks.{u}.attentions.{j}", "same") if attention else None
            upsampler = (f"up_blocks.{u}.upsamplers.0", "same") if j == n and level > 0 else None
            rules += _sequential(f"output_blocks.{o}", [resnet, transformer, upsampler])
            o += 1
    return rules + [Rule("conv_norm_out", "out.0"), Rule("conv_out", "out.2")]


def vae_rules(config: VAEConfig) -> list[Rule]:
    """Where each of our autoencoder modules sits in the original ``Encoder``/``Decoder`` of LDM."""
    L, n = len(config.channel_mult), config.num_res_blocks
    rules = [Rule("quant_conv", "quant_conv"), Rule("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        mid = f"{part}.mid_block"
        rules += [
            Rule(f"{part}.conv_in", f"{part}.conv_in"),
            Rule(f"{part}.conv_out", f"{part}.conv_out"),
            Rule(f"{part}.conv_norm_out", f"{part}.norm_out"),
            Rule(f"{mid}.resnets.0", f"{part}.mid.block_1", "vae_resnet"),
            Rule(f"{mid}.resnets.1", f"{part}.mid.block_2", "vae_resnet"),
        ]
        if config.mid_block_attention:
            rules.append(Rule(f"{mid}.attentions.0", f"{part}.mid.attn_1", "vae_attention"))
    for level in range(L):
        ours, theirs = f"encoder.down_blocks.{level}", f"encoder.down.{level}"
        rules += [Rule(f"{ours}.resnets.{j}", f"{theirs}.block.{j}", "vae_resnet") for j in range(n)]
        if level < L - 1:
            rules.append(Rule(f"{ours}.downsamplers.0", f"{theirs}.downsample"))
    for u, level in enumerate(reversed(range(L))):  # the original numbers decoder levels by resolution
        ours, theirs = f"decoder.up_blocks.{u}", f"decoder.up.{level}"
        rules += [Rule(f"{ours}.resnets.{j}", f"{theirs}.block.{j}", "vae_resnet") for j in range(n + 1)]
        if level > 0:
            rules.append(Rule(f"{ours}.upsamplers.0", f"{theirs}.upsample"))
    return rules


def _apply(key: str, rules: list[Rule]) -> tuple[str, str]:
    """Our parameter ``key`` -> (original key, kind of module), by the longest matching rule."""
    matches = [r for r in rules if key.startswith(r.ours + ".")]
    if not matches:
        raise RuntimeError(f"no rule maps parameter {key!r}: the key map is out of date with the model")
    rule = max(matches, key=lambda r: len(r.ours))
    rest = key[len(rule.ours) + 1 :]
    for old, new in RENAMES[rule.kind].items():
        if rest == old or rest.startswith(old + "."):
            rest = new + rest[len(old) :]
            break
    return f"{rule.theirs}.{rest}", rule.kind


@dataclass(frozen=True)
class Entry:
    """Where one of our parameters lives in the original layout, and its shapes on both sides."""

    theirs: str  # original key, without the part's prefix
    shape: tuple[int, ...]  # our shape
    original_shape: tuple[int, ...]  # the original's shape (differs for 1x1 convs stored as linear here)


def _layout(factory: Callable[[], torch.nn.Module], rules: list[Rule]) -> dict[str, Entry]:
    with torch.device("meta"):
        state = factory().state_dict()
    layout = {}
    for key, tensor in state.items():
        theirs, kind = _apply(key, rules)
        shape = tuple(tensor.shape)
        conv = kind in CONV_1X1_KINDS and len(shape) == 2
        layout[key] = Entry(theirs, shape, (*shape, 1, 1) if conv else shape)
    if len({e.theirs for e in layout.values()}) != len(layout):
        raise RuntimeError("two parameters map to the same original key: the rules are wrong")
    return layout


def unet_key_map(config: UNetConfig) -> dict[str, str]:
    """``{our key: original key}`` (without ``model.diffusion_model.``) for every UNet parameter."""
    return {k: e.theirs for k, e in _layout(lambda: UNet(config), unet_rules(config)).items()}


def vae_key_map(config: VAEConfig) -> dict[str, str]:
    """``{our key: original key}`` (without ``first_stage_model.``) for every autoencoder parameter."""
    return {k: e.theirs for k, e in _layout(lambda: AutoencoderKL(config), vae_rules(config)).items()}


# ============================================================================================ loading


def ema_key(original_key: str) -> str:
    """Where LDM's EMA keeps the UNet weight ``original_key``: ``model_ema.`` + its name in the
    ``LatentDiffusion.model`` wrapper with the dots removed (buffer names cannot contain dots)."""
    return EMA_PREFIX + ("diffusion_model." + original_key).replace(".", "")


def _same_up_to_1x1(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Accept a 1x1 conv weight already stored as linear (as some converted files do)."""
    return len(want) == 4 and want[2:] == (1, 1) and got == want[:2]


def load_single_file(
    path: str | Path,
    unet_config: UNetConfig | None = None,
    vae_config: VAEConfig | None = None,
    *,
    ema: bool = False,
    ignore_prefixes: Iterable[str] = (),
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """The UNet and VAE state dicts, in our names, from an original single-file checkpoint.

    ``path`` is a ``.safetensors`` file or a ``.ckpt`` read with ``torch.load(weights_only=True)``
    (weights under ``"state_dict"``; a file with other pickled objects is refused). Give the config of
    each part wanted (the file does not say which SD version it is: see ``models.presets``); a part
    whose config is ``None`` is skipped and returned as ``None``. A VAE-only file (keys ``encoder.*``,
    ``decoder.*`` without a prefix) loads too. ``ema=True`` takes the UNet from the EMA copy
    (``model_ema.*``, present in "full-ema" checkpoints).

    Every key must be accounted for: each requested part complete and with the right shapes, and
    everything else a known non-model entry (``IGNORED_PREFIXES``, ``SCHEDULE_BUFFERS``, parts not
    requested) or under one of ``ignore_prefixes``. Otherwise a ``KeyMismatchError`` lists the
    missing, unexpected and misshapen keys, as they are named in the file.
    """
    if unet_config is None and vae_config is None:
        raise ValueError("unet_config and vae_config are both None: give the config of at least one part")
    checkpoint = read_state_dict(path)
    source = f"single-file checkpoint {str(path)!r}"
    bare_vae = not any(k.startswith((UNET_PREFIX, VAE_PREFIX)) for k in checkpoint) and any(
        k.startswith(("encoder.", "decoder.")) for k in checkpoint
    )
    vae_prefix = "" if bare_vae else VAE_PREFIX

    # Each requested part: where its weights are in the file (key -> (our key, entry)).
    parts: dict[str, dict[str, tuple[str, Entry]]] = {}
    if unet_config is not None:
        layout = _layout(lambda: UNet(unet_config), unet_rules(unet_config))
        name = ema_key if ema else (lambda theirs: UNET_PREFIX + theirs)
        parts["unet"] = {name(e.theirs): (ours, e) for ours, e in layout.items()}
    if vae_config is not None:
        layout = _layout(lambda: AutoencoderKL(vae_config), vae_rules(vae_config))
        parts["vae"] = {vae_prefix + e.theirs: (ours, e) for ours, e in layout.items()}
    for part, owned in parts.items():
        if not any(k in checkpoint for k in owned):
            what = "EMA weights (model_ema.*)" if part == "unet" and ema else f"{part.upper()} weights"
            raise CheckpointError(f"{source} has no {what} at all; its first keys: {list(checkpoint)[:5]}")

    # Every other key must be a known extra: a skipped key, or under an ignorable prefix. Where a
    # claimed and an ignorable prefix both match (first_stage_model. / first_stage_model.loss.), the
    # longer one decides.
    claimed = ([EMA_PREFIX] if ema else [UNET_PREFIX]) if unet_config is not None else []
    if vae_config is not None:
        claimed += ["encoder.", "decoder.", "quant_conv.", "post_quant_conv."] if bare_vae else [VAE_PREFIX]
    ignorable = [
        p for p in (UNET_PREFIX, VAE_PREFIX, *IGNORED_PREFIXES, *ignore_prefixes) if p not in claimed
    ]

    def skipped(key: str) -> bool:
        if key in SKIPPED_KEYS:
            return True
        matches = [(len(p), False) for p in claimed if key.startswith(p)]
        matches += [(len(p), True) for p in ignorable if key.startswith(p)]
        return bool(matches) and max(matches)[1]

    considered = {k: v for k, v in checkpoint.items() if not skipped(k)}
    expected = {key: e.original_shape for owned in parts.values() for key, (_, e) in owned.items()}
    check_keys(expected, considered, source, shape_ok=_same_up_to_1x1, hint=_HINT)

    out: dict[str, dict[str, torch.Tensor]] = {}
    for part, owned in parts.items():
        out[part] = {ours: checkpoint[key].reshape(e.shape) for key, (ours, e) in owned.items()}
    return out.get("unet"), out.get("vae")


def load_unet_single_file(
    path: str | Path,
    config: UNetConfig,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    ema: bool = False,
    ignore_prefixes: Iterable[str] = (),
) -> UNet:
    """Our :class:`UNet` with the weights of an original single-file checkpoint (see
    :func:`load_single_file`); ``dtype`` defaults to float32."""
    state_dict, _ = load_single_file(path, config, None, ema=ema, ignore_prefixes=ignore_prefixes)
    return build_and_load(lambda: UNet(config), state_dict, str(path), dtype=dtype, device=device)


def load_vae_single_file(
    path: str | Path,
    config: VAEConfig,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    ignore_prefixes: Iterable[str] = (),
) -> AutoencoderKL:
    """Our :class:`AutoencoderKL` from an original single-file checkpoint, or a VAE-only one
    (``vae-ft-mse-840000-ema-pruned.safetensors`` style); ``config.scaling_factor`` is not in the file
    (SD: 0.18215, ``presets.vae_config("sd")``)."""
    _, state_dict = load_single_file(path, None, config, ignore_prefixes=ignore_prefixes)
    return build_and_load(lambda: AutoencoderKL(config), state_dict, str(path), dtype=dtype, device=device)


# ============================================================================================ export


def to_single_file_state_dict(
    unet: UNet | None = None, vae: AutoencoderKL | None = None
) -> dict[str, torch.Tensor]:
    """Our models' weights in the original layout, with the ``model.diffusion_model.`` and
    ``first_stage_model.`` prefixes (the VAE's 1x1-conv attention weights reshaped back)."""
    out = {}
    for model, prefix, rules in (
        (unet, UNET_PREFIX, unet_rules),
        (vae, VAE_PREFIX, vae_rules),
    ):
        if model is None:
            continue
        layout = _layout(lambda model=model: type(model)(model.config), rules(model.config))
        for key, tensor in model_state_dict(model).items():
            out[prefix + layout[key].theirs] = tensor.reshape(layout[key].original_shape)
    return out


def save_single_file(path: str | Path, unet: UNet | None = None, vae: AutoencoderKL | None = None) -> Path:
    """Write our UNet and/or VAE as an original-layout checkpoint: ``.safetensors``, or ``.ckpt``
    (``{"state_dict": ...}`` via ``torch.save``, tensors only). No text encoder is written."""
    if unet is None and vae is None:
        raise ValueError("unet and vae are both None: nothing to save")
    path = Path(path)
    state_dict = to_single_file_state_dict(unet, vae)
    if path.suffix == ".safetensors":
        save_safetensors(state_dict, path)
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": state_dict}, path)
    else:
        raise ValueError(f"path suffix {path.suffix!r} is not supported; allowed: '.safetensors', '.ckpt'")
    return path
