r"""A trained text-to-image latent diffusion model, and generation with DDIM + classifier-free guidance.

:class:`LatentDiffusion` bundles what sampling needs: the UNet, the VAE that decodes its latents,
the tokenizer and text encoder, the noise schedule and the prediction type.
:meth:`LatentDiffusion.load` reads a model file written by the trainer (``model.safetensors``: the
UNet's weights, their EMA and the run's config), a training checkpoint, or an EMA-only export
(``ldm_lib.training.export``). The denoising loop of :meth:`LatentDiffusion.generate` is written
out: both CFG passes run as one batch (Ho & Salimans 2022, arXiv 2207.12598), then guidance
rescale (Lin et al. 2023, arXiv 2305.08891), then one DDIM step (Song et al. 2021, arXiv 2010.02502).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ._checks import check_number
from .guidance import classifier_free_guidance, rescale_guidance
from .models.text import CLIPTextModel, CLIPTokenizer, encode_text, tokenize
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .samplers.ddim import ddim_step
from .schedules import NoiseSchedule, inference_timesteps

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str | Path, *relative_to: Path) -> Path:
    """``path`` as given if it exists, else relative to each of ``relative_to``, else to the
    repository root (so configs name ``models/course_vae`` and it works from ``notebooks/`` too)."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    for base in (*relative_to, REPO_ROOT):
        if (base / path).exists():
            return base / path
    raise FileNotFoundError(
        f"{str(path)!r} not found (looked in {Path.cwd()}, {[str(b) for b in relative_to]}, {REPO_ROOT})"
    )


@dataclass
class LatentDiffusion:
    """A text-to-image latent diffusion model, ready to sample."""

    unet: UNet
    vae: AutoencoderKL
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    schedule: NoiseSchedule
    prediction_type: str
    resolution: int  # image side in pixels; latents are resolution / f
    text_encoder_layer: str = "last"
    config: dict | None = None  # the training config, when loaded from a trainer's file

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @classmethod
    def load(
        cls, path: str | Path, *, use_ema: bool = True, device: str | torch.device = "cpu"
    ) -> LatentDiffusion:
        """Load a trainer's ``model.safetensors`` or checkpoint; the VAE and text encoder come from the
        paths recorded in its config (or from the file itself when the text encoder was trained)."""
        from .training.build import build_sampling_model

        return build_sampling_model(resolve_path(path), use_ema=use_ema, device=device)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = tokenize(self.tokenizer, list(prompts))["input_ids"].to(self.device)
        return encode_text(self.text_encoder, ids, layer=self.text_encoder_layer)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int] | int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        guidance_rescale: float = 0.0,
        spacing: str = "trailing",
        eta: float = 0.0,
        progress: bool = False,
        return_latents: bool = False,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] for ``prompts``; image ``i`` starts from the noise of
        ``seeds[i]`` (or ``seeds + i`` for an int), so an image does not depend on its batch."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; give at least one prompt")
        seeds = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        check_number("guidance_scale", guidance_scale, low=0.0)
        check_number("guidance_rescale", guidance_rescale, low=0.0, high=1.0)
        timesteps = inference_timesteps(num_inference_steps, self.schedule.num_train_timesteps, spacing)

        f = self.vae.downsampling_factor
        shape = (self.unet.config.in_channels, self.resolution // f, self.resolution // f)
        # One generator per image, for x_T and then (eta > 0) its fresh noise at every step: an image
        # depends on its seed only, not on the batch it is in.
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        x = torch.cat([torch.randn(shape, generator=g)[None] for g in generators])
        x = x.to(self.device)
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""]).expand_as(cond)
        context = torch.cat([uncond, cond])
        steps = timesteps.tolist()
        for i, t in enumerate(tqdm(steps, desc="sampling", disable=not progress, leave=False)):
            t_prev = steps[i + 1] if i + 1 < len(steps) else -1
            t_batch = torch.full((2 * len(x),), t, device=self.device, dtype=torch.long)
            out_uncond, out_cond = self.unet(torch.cat([x, x]), t_batch, context).float().chunk(2)
            guided = classifier_free_guidance(out_uncond, out_cond, guidance_scale)
            if guidance_rescale:
                guided = rescale_guidance(guided, out_cond, guidance_rescale)
            if eta:
                x = torch.cat([
                    ddim_step(self.schedule, self.prediction_type, g[None], t, t_prev, xi[None], eta, gen)[0]
                    for g, xi, gen in zip(guided, x, generators, strict=True)
                ])  # fmt: skip
            else:
                x, _ = ddim_step(self.schedule, self.prediction_type, guided, t, t_prev, x)
        if return_latents:
            return x
        with torch.autocast(self.device.type, enabled=False):  # the VAE runs in its own dtype
            images = self.vae.decode_latents(x.to(next(self.vae.parameters()).dtype))
        return images.float().clamp(-1, 1)


__all__ = ["LatentDiffusion", "resolve_path"]
