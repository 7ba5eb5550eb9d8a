"""The training configuration: typed dataclasses, loaded from YAML with ``key=value`` overrides.

Every field has a default and a comment; :func:`load_config` reads a YAML file (``configs/*.yaml``),
applies command-line overrides such as ``optim.lr=3e-4`` or ``diffusion.prediction_type=v_prediction``
and checks everything, types and ranges and the combinations that cannot work (epsilon prediction
with zero terminal SNR, fp16 on a CPU, ...), before any model is built or any data is read. Each
error names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .._checks import check_choice, check_number
from ..data.images import DataConfig
from ..models.attention import backend_names
from ..parameterization import PREDICTION_TYPES
from ..schedules import SPACINGS
from .vae_losses import VAELossConfig

STAGES = ("vae", "ldm")
SCHEDULES = ("linear", "scaled_linear", "cosine")
MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "linear", "cosine")
TEXT_ENCODER_LAYERS = ("last", "penultimate")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and what is allowed."""


@dataclass
class ModelConfig:
    """The networks of the latent diffusion stage (Rombach et al. 2022, arXiv 2112.10752)."""

    unet: str = "course_tiny"  # a preset of ldm_lib.models.presets.unet_config
    unet_overrides: dict[str, Any] = field(default_factory=dict)  # any UNetConfig field, e.g. context_dim
    unet_init: str | None = (
        None  # weights to start from (fine-tuning): a diffusers UNet folder or SD single file
    )
    vae: str = "models/course_vae"  # a trained AutoencoderKL folder (diffusers layout), frozen
    text_encoder: str = "models/course_text_encoder"  # a CLIPTextModel folder, or a size: tiny|small|sd1|sd2
    tokenizer: str | None = None  # a CLIPTokenizer folder; None = CLIP's BPE built offline
    text_encoder_layer: str = "last"  # "last" (SD1) or "penultimate" (SD2)
    train_text_encoder: bool = False  # False: frozen
    cache_text_embeddings: bool = True  # frozen encoder: encode each distinct caption once (few captions)
    vae_dtype: str = "float32"  # the frozen VAE's dtype when encoding pixels: float32 | bfloat16 | float16
    attention_backend: str = "auto"  # math | sdpa | xformers | triton | auto
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    compile: bool = False  # torch.compile the trained module (UNet, + text encoder when trained)
    compile_backend: str = "inductor"  # torch.compile backend (inductor; aot_eager to debug)
    fused_groupnorm_silu: bool = False  # SiLU(GroupNorm) of the trained UNet/VAE by one Triton kernel
    #                                     (kernels.groupnorm_silu): CUDA, or CPU with TRITON_INTERPRET=1


@dataclass
class VAEModelConfig:
    """The autoencoder trained in stage 1."""

    preset: str = "course"  # a preset of ldm_lib.models.presets.vae_config
    overrides: dict[str, Any] = field(default_factory=dict)  # any VAEConfig field
    scale_batches: int = 8  # batches encoded at the end to measure the latent scale factor 1/std


@dataclass
class DiffusionConfig:
    """The forward process and the loss (COURSE.md §4)."""

    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample (Salimans & Ho 2022)
    schedule: str = "scaled_linear"  # linear | scaled_linear | cosine
    num_train_timesteps: int = 1000
    beta_start: float | None = None  # None: the schedule's default (0.00085 for scaled_linear)
    beta_end: float | None = None  # None: the schedule's default (0.012 for scaled_linear)
    zero_terminal_snr: bool = False  # rescale betas so SNR(T) = 0 (Lin et al. 2023); needs v_prediction
    noise_offset: float = 0.0  # offset noise strength (Guttenberg 2023); 0.05-0.2 recommended
    input_perturbation: float = 0.0  # DDPM-IP rho (Ning et al. 2023); 0.05-0.15 suggested
    min_snr_gamma: float | None = None  # Min-SNR-gamma weighting (Hang et al. 2023); 5 is the paper's
    caption_dropout: float = 0.1  # probability of an empty caption, what makes CFG possible
    sample_posterior: bool = True  # z ~ q(z|x) (LDM) instead of its mean


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) and its learning-rate schedule."""

    batch_size: int = 32  # per device and per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step; effective batch = batch_size*accum*GPUs
    max_steps: int = 1000  # optimizer steps
    lr: float = 1e-3
    text_encoder_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    fused: bool | None = None  # fused AdamW kernel; None = when the device supports it
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None = no clipping
    warmup_steps: int = 0  # linear warm-up from 0
    lr_schedule: str = "constant"  # after warm-up: constant | linear (to 0) | cosine (to min_lr_ratio*lr)
    min_lr_ratio: float = 0.0


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (Polyak averaging; used by DDPM and LDM)."""

    enabled: bool = True
    decay: float = 0.999  # the final decay
    warmup: bool = True  # decay_n = min(decay, (1 + n) / (10 + n)), as the LDM code's LitEma
    update_every: int = 1  # optimizer steps between EMA updates


@dataclass
class LoggingConfig:
    """Progress, metrics, checkpoints and validation samples."""

    log_every: int = 10  # steps between metric lines in metrics.jsonl
    progress: bool = True  # a tqdm progress bar
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones are deleted
    validate_every: int = 0  # steps between validation grids; 0 = only at the end
    validation_prompts: list[str] = field(
        default_factory=lambda: [
            "a large red circle on a white background",
            "a small blue square on a black background",
            "a large yellow triangle on a gray background",
            "a small white circle on a black background",
        ]
    )
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1])  # one image per prompt and seed
    validation_steps: int = 25  # DDIM steps
    validation_guidance_scale: float = 4.0
    validation_guidance_rescale: float = 0.0
    validation_spacing: str = "trailing"  # leading | trailing | linspace


@dataclass
class TrainConfig:
    """One training run: stage 1 (``vae``) or stage 2 (``ldm``)."""

    stage: str = "ldm"  # vae | ldm
    output_dir: str = "runs/default"  # checkpoints/, samples/, metrics.jsonl, config.yaml
    seed: int = 0  # everything random derives from it: data order, noise, timesteps, dropout, init
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    mixed_precision: str = "no"  # no | bf16 | fp16 (with a grad scaler); trainable weights stay fp32
    num_workers: int = 0  # DataLoader worker processes
    resume: bool = True  # continue from output_dir's newest checkpoint; false: start over, deleting them
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VAEModelConfig = field(default_factory=VAEModelConfig)
    vae_loss: VAELossConfig = field(default_factory=VAELossConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------ building


_TYPE_WORDS = {
    bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"
}  # fmt: skip
# A float as YAML 1.2 writes it: PyYAML (YAML 1.1) reads 3e-4, without a dot, as a string.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    if tp in _TYPE_WORDS:
        return _TYPE_WORDS[tp]
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (from the dataclass annotation), or a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}={value!r} must be {' or '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping of {tp.__name__} fields")
        return _build(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}={value!r} must have {len(args)} items")
            return tuple(
                _coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        items = [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return dict(value)
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a bug in this file, not in the YAML


def _build(cls: type, mapping: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        where = f"section {prefix!r}" if prefix else "the top level"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed: {names}")
    kwargs = {}
    for name in names:
        if name in mapping:
            kwargs[name] = _coerce(f"{prefix}.{name}" if prefix else name, mapping[name], hints[name])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # the section's own __post_init__ checks
        raise ConfigError(str(err)) from None


def apply_overrides(mapping: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a nested dict; values are parsed as YAML (``1e-4``,
    ``true``, ``[1, 2]``, ``null``)."""
    result = yaml.safe_load(yaml.safe_dump(mapping)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=3e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key part in {key!r}")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return result


def config_from_dict(mapping: dict[str, Any], check_paths: bool = True) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a nested dict (missing keys keep their defaults).
    ``check_paths=False`` skips the checks that look at the file system and the machine (for a config
    recorded in a model file, whose relative paths may point elsewhere and whose device may be absent)."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(mapping).__name__}")
    config = _build(TrainConfig, mapping, "")
    validate(config, check_paths)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults when ``path`` is None), apply ``overrides``
    and validate. A typo in a key, a wrong type or a bad value is a :class:`ConfigError`."""
    mapping = read_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(mapping, list(overrides)))


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if (
            isinstance(value, dict)
            and isinstance(out.get(key), dict)
            and key not in ("unet_overrides", "overrides")
        ):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a dict. A top-level ``base: other.yaml`` (relative to the file) is read first
    and this file's values are merged over it, so a variant states only what differs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"config {path}: 'base' files include each other")
    mapping = yaml.safe_load(path.read_text()) or {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    base = mapping.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base={base!r} must be the path of another YAML file")
        mapping = _merge(read_yaml(path.parent / base, (*_seen, path.resolve())), mapping)
    return mapping


# ---------------------------------------------------------------------------------- validation


def _check(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def validate(c: TrainConfig, check_paths: bool = True) -> None:
    """Check every value and the combinations; raise :class:`ConfigError` on the first problem."""
    _check(check_choice, "stage", c.stage, STAGES)
    _check(check_number, "seed", c.seed, low=0, integer=True)
    if not (c.device in ("auto", "cpu", "cuda") or c.device.startswith("cuda:")):
        raise ConfigError(
            f"device={c.device!r} is not supported; expected one of 'auto', 'cpu', 'cuda', 'cuda:N'"
        )
    _check(check_choice, "mixed_precision", c.mixed_precision, MIXED_PRECISION)
    _check(check_number, "num_workers", c.num_workers, low=0, integer=True)
    if not c.output_dir:
        raise ConfigError("output_dir='' must name a folder")

    m = c.model
    _check(check_choice, "model.text_encoder_layer", m.text_encoder_layer, TEXT_ENCODER_LAYERS)
    _check(check_choice, "model.vae_dtype", m.vae_dtype, ("float32", "bfloat16", "float16"))
    _check(check_choice, "model.attention_backend", m.attention_backend, ("auto", *backend_names()))
    if "fused_groupnorm_silu" in m.unet_overrides:
        raise ConfigError(
            "model.unet_overrides.fused_groupnorm_silu: set model.fused_groupnorm_silu instead (checked "
            "against the device, and applied to the trained network of either stage)"
        )
    if m.fused_groupnorm_silu and check_paths:
        _check_fused_groupnorm_silu(c)

    d = c.diffusion
    _check(check_choice, "diffusion.prediction_type", d.prediction_type, PREDICTION_TYPES)
    _check(check_choice, "diffusion.schedule", d.schedule, SCHEDULES)
    _check(check_number, "diffusion.num_train_timesteps", d.num_train_timesteps, low=2, integer=True)
    for name in ("beta_start", "beta_end"):
        value = getattr(d, name)
        if value is not None:
            _check(check_number, f"diffusion.{name}", value, low=0.0, high=1.0, low_open=True, high_open=True)
    if d.zero_terminal_snr and d.prediction_type == "epsilon":
        raise ConfigError(
            "diffusion.prediction_type='epsilon' cannot be trained with diffusion.zero_terminal_snr=true: "
            "at t = T the SNR is 0, x_T is pure noise, so predicting its noise is trivial and x0 cannot be "
            "recovered from it (x0 = (x_t - sigma*eps)/alpha divides by alpha_T = 0). "
            "Use prediction_type: v_prediction (Lin et al. 2023, arXiv 2305.08891, §3.2)"
        )
    _check(check_number, "diffusion.noise_offset", d.noise_offset, low=0.0, high=1.0)
    _check(check_number, "diffusion.input_perturbation", d.input_perturbation, low=0.0, high=1.0)
    if d.min_snr_gamma is not None:
        _check(check_number, "diffusion.min_snr_gamma", d.min_snr_gamma, low=0.0, low_open=True)
    _check(check_number, "diffusion.caption_dropout", d.caption_dropout, low=0.0, high=1.0)

    o = c.optim
    _check(check_number, "optim.batch_size", o.batch_size, low=1, integer=True)
    _check(check_number, "optim.grad_accum_steps", o.grad_accum_steps, low=1, integer=True)
    _check(check_number, "optim.max_steps", o.max_steps, low=1, integer=True)
    _check(check_number, "optim.lr", o.lr, low=0.0, low_open=True)
    if o.text_encoder_lr is not None:
        _check(check_number, "optim.text_encoder_lr", o.text_encoder_lr, low=0.0, low_open=True)
    _check(check_number, "optim.weight_decay", o.weight_decay, low=0.0)
    for i, beta in enumerate(o.betas):
        _check(check_number, f"optim.betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
    _check(check_number, "optim.eps", o.eps, low=0.0, low_open=True)
    if o.max_grad_norm is not None:
        _check(check_number, "optim.max_grad_norm", o.max_grad_norm, low=0.0, low_open=True)
    _check(check_number, "optim.warmup_steps", o.warmup_steps, low=0, integer=True)
    _check(check_choice, "optim.lr_schedule", o.lr_schedule, LR_SCHEDULES)
    _check(check_number, "optim.min_lr_ratio", o.min_lr_ratio, low=0.0, high=1.0)

    e = c.ema
    _check(check_number, "ema.decay", e.decay, low=0.0, high=1.0, high_open=True)
    _check(check_number, "ema.update_every", e.update_every, low=1, integer=True)

    g = c.logging
    for name in ("log_every", "checkpoint_every", "keep_checkpoints", "validation_steps"):
        _check(check_number, f"logging.{name}", getattr(g, name), low=1, integer=True)
    _check(check_number, "logging.validate_every", g.validate_every, low=0, integer=True)
    _check(check_number, "logging.validation_guidance_scale", g.validation_guidance_scale, low=0.0)
    _check(
        check_number, "logging.validation_guidance_rescale", g.validation_guidance_rescale, low=0.0, high=1.0
    )
    _check(check_choice, "logging.validation_spacing", g.validation_spacing, SPACINGS)
    if d.zero_terminal_snr and g.validation_spacing == "leading":
        raise ConfigError(
            "logging.validation_spacing='leading' never starts from t = T, the only step where a zero "
            "terminal SNR model sees pure noise; use 'trailing' (Lin et al. 2023, §3.3)"
        )
    for i, seed in enumerate(g.validation_seeds):
        _check(check_number, f"logging.validation_seeds[{i}]", seed, low=0, integer=True)
    if m.compile:  # an unknown backend would fail only once the networks are built
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        _check(check_choice, "model.compile_backend", m.compile_backend, backends)

    if c.stage == "ldm":
        for name in ("validation_prompts", "validation_seeds"):  # validation samples one image per pair
            if not getattr(g, name):
                raise ConfigError(f"logging.{name}=[] must hold at least one entry (prompts x seeds images)")
        _validate_ldm_models(c, check_paths)
        if c.data.cache_latents:
            try:
                from ..data.latents import check_cacheable

                check_cacheable(c.data)
            except ValueError as err:
                raise ConfigError(str(err)) from None
    else:
        from ..models.presets import PRESETS, vae_config

        _check(check_choice, "vae.preset", c.vae.preset, PRESETS["vae"])
        try:
            vae_config(c.vae.preset, **c.vae.overrides)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"vae.overrides={c.vae.overrides!r}: {err}") from None
        _check(check_number, "vae.scale_batches", c.vae.scale_batches, low=1, integer=True)
        if c.data.cache_latents:
            raise ConfigError("data.cache_latents=true is for stage 'ldm'; stage 'vae' trains on pixels")
    if c.mixed_precision == "fp16" and c.device == "cpu":
        raise ConfigError("mixed_precision='fp16' needs a CUDA device; on a CPU use 'bf16' or 'no'")
    if c.stage == "vae" and c.mixed_precision == "fp16" and c.vae_loss.adversarial_weight > 0:
        raise ConfigError(
            "mixed_precision='fp16' with vae_loss.adversarial_weight > 0: the discriminator has no grad "
            "scaler; use mixed_precision 'bf16' or 'no'"
        )
    if c.stage == "ldm":
        _warn_combinations(c)


def _check_fused_groupnorm_silu(c: TrainConfig) -> None:
    """``model.fused_groupnorm_silu: true`` needs the Triton kernel to run on the configured device:
    refuse it now, not at the first forward."""
    import torch

    from ..kernels.groupnorm_silu import fused_unavailable_reason  # does not import triton

    device = c.device
    if device == "auto":  # as the trainer resolves it
        device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = fused_unavailable_reason(device)
    if reason is not None:
        raise ConfigError(
            f"model.fused_groupnorm_silu=true cannot run with device={c.device!r} (here: {device}): {reason}"
        )


def _warn_combinations(c: TrainConfig) -> None:
    """Combinations that run but are probably not what was meant."""
    d, g = c.diffusion, c.logging
    if d.zero_terminal_snr and d.min_snr_gamma is not None and d.prediction_type == "v_prediction":
        warnings.warn(
            "diffusion.min_snr_gamma with zero_terminal_snr and v_prediction: the v weight "
            "min(SNR, gamma)/(SNR + 1) goes to 0 as SNR -> 0, so the noisiest timesteps, where sampling "
            "starts, are hardly trained. Set min_snr_gamma: null",
            stacklevel=3,
        )
    if d.caption_dropout == 0 and g.validation_guidance_scale != 1:
        warnings.warn(
            f"diffusion.caption_dropout=0 never trains the unconditional prediction, yet "
            f"logging.validation_guidance_scale={g.validation_guidance_scale} uses it (classifier-free "
            "guidance needs caption dropout, e.g. 0.1)",
            stacklevel=3,
        )


def _validate_ldm_models(c: TrainConfig, check_paths: bool) -> None:
    from ..models.presets import PRESETS, unet_config
    from ..models.text import TEXT_ENCODER_CONFIGS

    m = c.model
    _check(check_choice, "model.unet", m.unet, PRESETS["unet"])
    try:
        unet_config(m.unet, **m.unet_overrides)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.unet_overrides={m.unet_overrides!r}: {err}") from None
    if not check_paths:
        return
    if m.text_encoder not in TEXT_ENCODER_CONFIGS and not _exists(m.text_encoder):
        raise ConfigError(
            f"model.text_encoder={m.text_encoder!r} is neither a folder nor a size; allowed: a CLIPTextModel "
            f"folder or one of {sorted(TEXT_ENCODER_CONFIGS)}"
        )
    if not (_exists(m.vae, "config.json") or _exists(m.vae, "vae/config.json")):
        raise ConfigError(
            f"model.vae={m.vae!r} is not an AutoencoderKL folder (no config.json); train one with a "
            "stage: vae config, or point it at the vae/ folder of a Stable Diffusion checkpoint"
        )
    if m.unet_init is not None and not _exists(m.unet_init):
        raise ConfigError(
            f"model.unet_init={m.unet_init!r} does not exist; give a diffusers UNet folder (e.g. the unet/ "
            "of a Stable Diffusion checkpoint) or an original single .safetensors/.ckpt file, or null"
        )
    if m.tokenizer is not None and not _exists(m.tokenizer):
        raise ConfigError(
            f"model.tokenizer={m.tokenizer!r} is not a folder; use null for CLIP's BPE built offline"
        )


def _exists(path: str, inside: str = "") -> bool:
    """Whether ``path / inside`` exists where :func:`ldm_lib.pipeline.resolve_path` looks for it."""
    from ..pipeline import resolve_path

    try:
        return resolve_path(Path(path) / inside).exists()  # an absolute path is returned as given
    except FileNotFoundError:
        return False
