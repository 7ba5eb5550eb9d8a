"""Stage 2: the latent diffusion model (Rombach et al. 2022, arXiv 2112.10752). A frozen VAE maps
images to latents (or they come from a latent cache), a text encoder (frozen, or trained) maps
captions to the cross-attention context, and the UNet learns to denoise with the loss of
``diffusion_loss.py``. Captions are dropped (replaced by "") with ``caption_dropout`` so the same
network also learns the unconditional prediction that classifier-free guidance needs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.latents import scaled_latents
from ..models.text import encode_text, tokenize
from ..pipeline import LatentDiffusion
from ..viz import image_grid
from .build import DTYPES, build_schedule, build_unet, load_frozen_vae, load_text_models
from .checkpoint import atomic_save
from .config import ConfigError
from .diffusion_loss import NoiseDraw, diffusion_loss, draw_noise
from .trainer import Trainer

MODEL_FILE = "model.safetensors"


class Denoiser(nn.Module):
    """What the loss calls: the UNet, and the text encoder when it is trained (so one DDP module
    holds every trained weight)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None, layer: str = "last") -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.layer = layer

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids is not None:
            context = encode_text(self.text_encoder, input_ids, layer=self.layer)
        return self.unet(x_t, timesteps, context)


class LDMTrainer(Trainer):
    stage = "ldm"

    def build(self) -> None:
        c, m = self.config, self.config.model
        self.schedule = build_schedule(c)
        self.vae = load_frozen_vae(m.vae, "auto", m.fused_groupnorm_silu).to(self.device, DTYPES[m.vae_dtype])
        self.tokenizer, self.text_encoder = load_text_models(c)
        self.unet = build_unet(c)
        width = self.text_encoder.config.hidden_size
        if self.unet.config.context_dim != width:
            raise ConfigError(
                f"model.unet_overrides.context_dim={self.unet.config.context_dim} must equal the text "
                f"encoder's width {width} ({m.text_encoder})"
            )
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise ConfigError(
                f"the UNet takes {self.unet.config.in_channels} channels but the VAE's latents have "
                f"{self.vae.config.latent_channels}; set model.unet_overrides.in_channels/out_channels"
            )
        f = self.vae.downsampling_factor
        if c.data.resolution % f:
            raise ConfigError(
                f"data.resolution={c.data.resolution} must be a multiple of the VAE's factor {f}"
            )
        self.latent_shape = (self.vae.config.latent_channels, c.data.resolution // f, c.data.resolution // f)
        if m.gradient_checkpointing:
            self.unet.set_gradient_checkpointing(True)

        trained_text = self.text_encoder if m.train_text_encoder else None
        self.text_encoder.requires_grad_(m.train_text_encoder).train(m.train_text_encoder)
        if trained_text is not None and m.text_encoder_layer == "penultimate":
            # The last block never reaches the context: frozen, it gets no optimizer state, and DDP
            # does not wait for gradients that never come (an error at the second step otherwise).
            getattr(trained_text, "text_model", trained_text).encoder.layers[-1].requires_grad_(False)
        if not m.train_text_encoder:
            self.text_encoder.to(self.device, self.autocast_dtype or torch.float32)
        self.model = self.unet
        self.train_module = Denoiser(self.unet, trained_text, m.text_encoder_layer)
        self.param_groups = [{"params": list(self.unet.parameters()), "lr": c.optim.lr}]
        if trained_text is not None:
            lr = c.optim.text_encoder_lr or c.optim.lr
            params = [p for p in trained_text.parameters() if p.requires_grad]
            self.param_groups.append({"params": params, "lr": lr})
        self._context_cache: dict[str, torch.Tensor] = {}
        self.dataset = self._build_data()

    def _build_data(self):
        """The training items: images, or (``data.cache_latents``) the VAE's posterior of each image,
        encoded once into ``output_dir/latents.safetensors`` and reused while the VAE and the data
        are unchanged (a stale cache is re-encoded, with a warning)."""
        from ..data.images import build_dataset

        c = self.config
        self.cached = c.data.cache_latents
        if not self.cached:
            return build_dataset(c.data, seed=c.seed)
        import warnings

        from ..data.latents import StaleCacheError, cache_latents, data_identity, load_latent_cache
        from .distributed import barrier

        path = self.out / "latents.safetensors"
        identity = data_identity(c.data, c.seed)
        if path.is_file():
            try:
                return load_latent_cache(path, self.vae, identity, seed=c.seed)
            except StaleCacheError as err:
                warnings.warn(f"{err}; encoding the latents again", stacklevel=2)
        if self.dist.is_main:
            dataset = build_dataset(c.data, seed=c.seed)
            cache_latents(dataset, self.vae, path, data_identity=identity, progress=c.logging.progress)
        barrier(self.dist)
        return load_latent_cache(path, self.vae, identity, seed=c.seed)

    # -------------------------------------------------------------------------------- the step

    def draw(self) -> NoiseDraw:
        d = self.config.diffusion
        return draw_noise(
            self.global_batch,
            self.latent_shape,
            self.schedule.num_train_timesteps,
            self.generator,
            noise_offset=d.noise_offset,
            input_perturbation=d.input_perturbation,
            caption_dropout=d.caption_dropout,
        )

    @torch.no_grad()
    def latents(self, batch: dict[str, Any], eps: torch.Tensor) -> torch.Tensor:
        """Scaled latents :math:`s(z - m)`, :math:`z = \\mu + \\sigma\\varepsilon` (or :math:`\\mu`)."""
        vae_cfg = self.vae.config
        if self.cached:
            mean, std = batch["latent_mean"].to(self.device), batch["latent_std"].to(self.device)
        else:
            pixels = batch["pixel_values"].to(self.device, next(self.vae.parameters()).dtype)
            # In model.vae_dtype, not the autocast dtype: the SD VAE overflows in fp16.
            with torch.autocast(self.device.type, enabled=False):
                posterior = self.vae.encode(pixels)
            mean, std = posterior.mean.float(), posterior.std.float()
        sample = self.config.diffusion.sample_posterior
        return scaled_latents(mean, std, vae_cfg.scaling_factor, vae_cfg.shift_factor, sample=sample, eps=eps)

    @torch.no_grad()
    def context(self, captions: list[str]) -> torch.Tensor:
        """The frozen encoder's embeddings of ``captions``. With ``model.cache_text_embeddings`` each
        distinct caption is encoded once and kept (the shapes set has 96 captions and ""); the cache
        is cleared when it grows past 4096 entries. Without (large caption sets), every batch is encoded."""
        layer = self.config.model.text_encoder_layer
        if not self.config.model.cache_text_embeddings:
            ids = tokenize(self.tokenizer, captions)["input_ids"].to(self.device)
            return encode_text(self.text_encoder, ids, layer=layer).float()
        missing = sorted({cap for cap in captions if cap not in self._context_cache})
        if missing:
            if len(self._context_cache) > 4096:
                self._context_cache.clear()
                missing = sorted(set(captions))
            ids = tokenize(self.tokenizer, missing)["input_ids"].to(self.device)
            encoded = encode_text(self.text_encoder, ids, layer=layer).float()
            self._context_cache.update(zip(missing, encoded, strict=True))
        return torch.stack([self._context_cache[cap] for cap in captions])

    def micro_loss(
        self, batch: dict[str, Any], draw: NoiseDraw, rows: slice
    ) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        d = draw[rows]
        # Timesteps and dropout stay on the CPU, where the draw was made: schedule lookups and
        # the caption choice then need no device sync; the noise goes to the device.
        drops = d.drop_caption.tolist()
        d = NoiseDraw(
            d.timesteps,
            d.noise.to(self.device, non_blocking=True),
            d.noisy_input_noise.to(self.device, non_blocking=True),
            d.drop_caption,
            d.posterior_eps.to(self.device, non_blocking=True),
        )
        x0 = self.latents(batch, d.posterior_eps)
        captions = ["" if drop else cap for cap, drop in zip(batch["caption"], drops, strict=True)]
        if c.model.train_text_encoder:
            ids = tokenize(self.tokenizer, captions)["input_ids"].to(self.device)

            def model(x_t, t):
                return self.forward_module(x_t, t, input_ids=ids)
        else:
            context = self.context(captions)

            def model(x_t, t):
                return self.forward_module(x_t, t, context=context)

        per_sample = diffusion_loss(
            model,
            self.schedule,
            x0,
            d.timesteps,
            d.noise,
            c.diffusion.prediction_type,
            noisy_input_noise=d.noisy_input_noise,
            min_snr_gamma=c.diffusion.min_snr_gamma,
        )
        return per_sample.mean(), {}

    # ---------------------------------------------------------------------- sampling and output

    def sampling_model(self) -> LatentDiffusion:
        """A copy of the networks with the EMA weights, for validation samples."""
        module = copy.deepcopy(self.train_module)
        if self.ema is not None:
            self.ema.copy_to(module)
        module.eval()
        text_encoder = module.text_encoder if module.text_encoder is not None else self.text_encoder
        c = self.config
        return LatentDiffusion(
            unet=module.unet,
            vae=self.vae,
            tokenizer=self.tokenizer,
            text_encoder=text_encoder,
            schedule=self.schedule,
            prediction_type=c.diffusion.prediction_type,
            resolution=c.data.resolution,
            text_encoder_layer=c.model.text_encoder_layer,
        )

    def validate(self) -> Path:
        g = self.config.logging
        prompts = [p for p in g.validation_prompts for _ in g.validation_seeds]
        seeds = [s for _ in g.validation_prompts for s in g.validation_seeds]
        with torch.no_grad(), self.autocast():
            images = self.sampling_model().generate(
                prompts,
                seeds=seeds,
                num_inference_steps=g.validation_steps,
                guidance_scale=g.validation_guidance_scale,
                guidance_rescale=g.validation_guidance_rescale,
                spacing=g.validation_spacing,
            )
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images.float(), prompts, ncols=min(len(prompts), len(g.validation_seeds) * 2)).save(path)
        return path

    def finish(self) -> None:
        """``model.safetensors``: the trained weights and their EMA, the frozen text encoder when it
        was built from a size name (so the file is self-contained), the config; no optimizer."""
        tensors = {f"model.{k}": v for k, v in self.train_module.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        from .config import _exists

        if not self.config.model.train_text_encoder and not _exists(self.config.model.text_encoder):
            tensors.update(
                {f"frozen_text_encoder.{k}": v for k, v in self.text_encoder.float().state_dict().items()}
            )
        metadata = {"stage": "ldm", "step": str(self.step), "config": self.config.to_yaml()}
        atomic_save(tensors, self.out / MODEL_FILE, metadata)
