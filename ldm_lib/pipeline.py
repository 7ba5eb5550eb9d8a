r"""A trained text-to-image latent diffusion model, and generation with any sampler and CFG.

:class:`LatentDiffusion` bundles what sampling needs: the UNet, the VAE that decodes its latents,
the tokenizer and text encoder, the noise schedule and the prediction type.
:meth:`LatentDiffusion.load` reads a model file written by the trainer (``model.safetensors``: the
UNet's weights, their EMA and the run's config), a training checkpoint, or an EMA-only export
(``ldm_lib.training.export``). :meth:`LatentDiffusion.generate` hands a guided model to any sampler
of :mod:`ldm_lib.samplers`: both CFG passes run as one batch (Ho & Salimans 2022, arXiv 2207.12598),
then guidance rescale (Lin et al. 2023, arXiv 2305.08891), then the sampler's step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ._checks import check_choice, check_number
from .guidance import classifier_free_guidance, rescale_guidance
from .models.text import CLIPTextModel, CLIPTokenizer, encode_text, tokenize
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .samplers import SAMPLERS, WITH_ETA, ModelFn, StepCallback, sample
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

    def guided_model(
        self, prompts: Sequence[str], guidance_scale: float, guidance_rescale: float = 0.0
    ) -> ModelFn:
        r"""``model(x_t, t)`` for a sampler: the UNet under classifier-free guidance.

        The unconditional (empty prompt) and conditional passes run as one batch of ``2B``; then
        :math:`\hat y = y_u + w\,(y_c - y_u)` (Ho & Salimans 2022) and, if ``guidance_rescale`` > 0,
        the rescale of Lin et al. 2023 (both in :mod:`ldm_lib.guidance`). ``w = 1`` is the
        conditional model alone: its unconditional pass is skipped.
        """
        check_number("guidance_scale", guidance_scale, low=0.0)
        check_number("guidance_rescale", guidance_rescale, low=0.0, high=1.0)
        cond = self.encode_prompts(prompts)
        if guidance_scale == 1:
            return lambda x_t, t: self.unet(x_t, t, cond).float()
        context = torch.cat([self.encode_prompts([""]).expand_as(cond), cond])

        def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out_uncond, out_cond = (
                self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), context).float().chunk(2)
            )
            guided = classifier_free_guidance(out_uncond, out_cond, guidance_scale)
            return rescale_guidance(guided, out_cond, guidance_rescale) if guidance_rescale else guided

        return model

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int] | int = 0,
        sampler: str = "ddim",
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        guidance_rescale: float = 0.0,
        spacing: str = "trailing",
        eta: float | None = None,
        progress: bool = False,
        callback: StepCallback | None = None,
        return_latents: bool = False,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] for ``prompts``.

        ``sampler`` is a name from :data:`ldm_lib.samplers.SAMPLERS`; ``eta`` its amount of fresh
        noise (DDIM, Euler ancestral; None for the sampler's default). Image ``i`` starts from the
        noise of ``seeds[i]`` (or ``seeds + i`` for an int) and its own generator draws every later
        noise too, so an image does not depend on the batch it is in. ``callback(i, t, x0_pred)``
        sees each step's latent estimate of the clean sample.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; give at least one prompt")
        seeds = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        check_choice("sampler", sampler, tuple(SAMPLERS))
        check_number("num_inference_steps", num_inference_steps, low=1, integer=True)
        if eta is not None and sampler not in WITH_ETA:
            raise ValueError(f"eta={eta} given for sampler {sampler!r}; eta applies only to {WITH_ETA}")
        # Checked before any work: the timesteps for this spacing and number of steps.
        inference_timesteps(num_inference_steps, self.schedule.num_train_timesteps, spacing)
        model = self.guided_model(prompts, guidance_scale, guidance_rescale)

        f = self.vae.downsampling_factor
        shape = (len(prompts), self.unet.config.in_channels, self.resolution // f, self.resolution // f)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        x = sample(
            sampler,
            model,
            shape,
            self.schedule,
            num_inference_steps,
            self.prediction_type,
            spacing,
            eta=eta,
            generator=generators,
            device=self.device,
            progress=progress,
            callback=callback,
        )
        if return_latents:
            return x
        return self.decode(x)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from (scaled) latents; the VAE runs in its own dtype, autocast off."""
        with torch.autocast(self.device.type, enabled=False):
            images = self.vae.decode_latents(latents.to(next(self.vae.parameters()).dtype))
        return images.float().clamp(-1, 1)


__all__ = ["LatentDiffusion", "resolve_path"]
