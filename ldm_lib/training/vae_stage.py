"""Stage 1: the KL-regularised autoencoder (Rombach et al. 2022, arXiv 2112.10752, §3.1 and App. G).

The encoder's posterior :math:`q(z\\mid x)` is sampled with the reparameterisation trick (Kingma &
Welling 2014), decoded, and trained with ``vae_losses.VAELoss``: reconstruction + a small KL weight,
plus LPIPS and a patch GAN when switched on. At the end the latent scale factor
:math:`s = 1/\\mathrm{std}(z)` is measured on the data and stored in the saved VAE's config, so the
diffusion stage trains on latents of unit variance (§4.3.2)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..interop.diffusers_format import save_vae
from ..models.vae import DiagonalGaussian, latent_scaling_factor
from ..viz import image_grid
from .build import build_vae
from .checkpoint import optimizer_from_tensors, optimizer_to_tensors, prefixed
from .config import ConfigError
from .trainer import Trainer, collate
from .vae_losses import VAELoss

VAE_FOLDER = "vae"


class VAEForward(nn.Module):
    """What the loss calls (and DDP wraps): encode, sample :math:`z = \\mu + \\sigma\\varepsilon`
    with the given :math:`\\varepsilon`, decode. Returns tensors only: the reconstruction and the
    posterior's parameters."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x)
        return self.vae.decode(posterior.mean + posterior.std * eps.to(posterior.mean)), posterior.parameters


class VAETrainer(Trainer):
    stage = "vae"

    def build(self) -> None:
        from ..data.images import build_dataset

        c = self.config
        self.vae = build_vae(c)
        self.vae.set_attention_backend(c.model.attention_backend)
        f = self.vae.downsampling_factor
        if c.data.resolution % f:
            raise ConfigError(
                f"data.resolution={c.data.resolution} must be a multiple of the VAE's factor {f}"
            )
        self.latent_shape = (self.vae.config.latent_channels, c.data.resolution // f, c.data.resolution // f)
        self.model = self.vae
        self.train_module = VAEForward(self.vae)
        self.param_groups = [{"params": list(self.vae.parameters()), "lr": c.optim.lr}]
        self.loss_fn = VAELoss(c.vae_loss, self.vae.config.in_channels).to(self.device)
        self.d_optimizer = self.loss_fn.make_discriminator_optimizer() if self.loss_fn.discriminator else None
        self.dataset = build_dataset(c.data, seed=c.seed)
        self._last_pair: tuple[torch.Tensor, torch.Tensor] | None = None

    def draw(self) -> torch.Tensor:
        return torch.randn((self.global_batch, *self.latent_shape), generator=self.generator)

    def micro_loss(
        self, batch: dict[str, Any], draw: torch.Tensor, rows: slice
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["pixel_values"].to(self.device)
        recon, moments = self.forward_module(x, draw[rows].to(self.device))
        posterior = DiagonalGaussian(moments.float())
        last_layer = self.vae.decoder.conv_out.weight
        loss, logs = self.loss_fn.generator_step_loss(x, recon.float(), posterior, self.step, last_layer)
        self._last_pair = (x, recon.detach())
        return loss, {k: logs[k] for k in ("rec_loss", "kl_loss", "perceptual_loss", "g_loss")}

    def after_step(self) -> dict[str, float]:
        """One discriminator step on the last micro-batch, once the GAN is on (Esser et al. 2021).

        With the GAN on, accumulation and DDP are no longer exactly the big batch: the adaptive
        weight is computed per micro-batch and process, and the discriminator sees the last
        micro-batch of each process (its gradients are averaged over processes)."""
        if (
            self.d_optimizer is None
            or self._last_pair is None
            or not self.loss_fn.discriminator_active(self.step)
        ):
            return {}
        x, recon = self._last_pair
        with self.autocast():
            d_loss, logs = self.loss_fn.discriminator_step_loss(x, recon, self.step)
        d_loss.float().backward()
        if self.dist.enabled:  # the discriminator is not DDP-wrapped: average its gradients by hand
            for p in self.loss_fn.discriminator.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.dist.world_size
        self.d_optimizer.step()
        self.d_optimizer.zero_grad(set_to_none=True)
        return {"d_loss": logs["d_loss"]}

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        if self.d_optimizer is None:
            return {}, {}
        tensors = {f"discriminator.{k}": v for k, v in self.loss_fn.discriminator.state_dict().items()}
        opt, groups = optimizer_to_tensors(self.d_optimizer, "optimizer_d")
        return {**tensors, **opt}, {"optimizer_d_groups": groups}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        if self.d_optimizer is not None:
            self.loss_fn.discriminator.load_state_dict(prefixed(tensors, "discriminator"))
            optimizer_from_tensors(self.d_optimizer, tensors, "optimizer_d", metadata["optimizer_d_groups"])

    def averaged_vae(self) -> nn.Module:
        vae = copy.deepcopy(self.vae)
        if self.ema is not None:
            module = VAEForward(vae)
            self.ema.copy_to(module)
        return vae.eval()

    @torch.no_grad()
    def validate(self) -> Path:
        """Originals (top row) and reconstructions by the posterior mean (bottom row)."""
        vae = self.averaged_vae()
        n = min(8, len(self.dataset))
        x = collate([self.dataset[i] for i in range(n)])["pixel_values"].to(self.device)
        recon = vae.decode(vae.encode(x).mean).float().clamp(-1, 1)
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(torch.cat([x.float(), recon]), ncols=n).save(path)
        return path

    @torch.no_grad()
    def finish(self) -> None:
        """Measure :math:`s = 1/\\mathrm{std}(z)` on ``vae.scale_batches`` batches of posterior samples
        and write the VAE (EMA weights when kept) with it as a diffusers folder ``vae/``."""
        c = self.config
        vae = self.averaged_vae()
        generator = torch.Generator().manual_seed(c.seed)
        latents = []
        for b in range(c.vae.scale_batches):
            start = b * c.optim.batch_size
            items = [self.dataset[i % len(self.dataset)] for i in range(start, start + c.optim.batch_size)]
            x = collate(items)["pixel_values"].to(self.device)
            posterior = vae.encode(x)
            eps = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
            latents.append((posterior.mean + posterior.std * eps).float().cpu())
        scale = latent_scaling_factor(torch.cat(latents))
        vae.config = dataclasses.replace(vae.config, scaling_factor=scale)
        save_vae(vae.float(), self.out / VAE_FOLDER)
