"""Background brightness of the course models, for notebook 13 (offset noise, zero terminal SNR).

Too many images for a notebook's minute (about 8,200 at 25 DDIM steps), so this script measures
them once and writes a small JSON that notebook 13 plots; the notebook recomputes a few of them
live and checks that they agree. Three experiments, DDIM 25 steps, every image seeded:

- ``natural``: the border luma of 8 seeds x the 30 captions with a black background and 8 x the
  30 with a white one, at guidance 1 and 5 (trailing spacing), for shapes_ldm_eps,
  shapes_ldm_eps_offset, shapes_ldm_v and shapes_ldm_v_ztsnr (guidance rescale 0.7, as in
  models/EVALUATION.md); and at guidance 1 with leading spacing for the three models trained on
  the leaky schedule.
- ``shift``: the same 60 captions, one seed each (0..59), guidance 1, from x_T + delta * d: the start noise
  with its per-channel spatial mean moved along ``d``, the unit direction from the mean latent of
  black-background images to that of white-background ones. How far the background follows delta
  measures how much a model reads brightness off the mean of its starting noise.
- ``unconditional``: the empty prompt, guidance 1, 96 seeds, at 32 px (the training size) and at
  64 px (16x16 latents: the UNet and the VAE are convolutional), where the start noise's mean is
  half as large.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python scripts/brightness_experiments.py
    # -> models/noise_experiments/brightness.json (21 min on the shared 2-core machine)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ldm_lib.data.shapes import shapes_tensors
from ldm_lib.eval import border_brightness
from ldm_lib.eval.generation import all_captions
from ldm_lib.noise import initial_noise
from ldm_lib.pipeline import LatentDiffusion
from ldm_lib.samplers import sample

MODELS = ("shapes_ldm_eps", "shapes_ldm_eps_offset", "shapes_ldm_v", "shapes_ldm_v_ztsnr")
LEAKY = ("shapes_ldm_eps", "shapes_ldm_eps_offset", "shapes_ldm_v")  # trained with SNR(T) > 0
SEEDS_PER_CAPTION = 8
DELTAS = (-0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4)
STEPS = 25
BATCH = 128


def captions_with(background: str) -> list[str]:
    return [c for c in all_captions() if c.endswith(f"on a {background} background")]


def natural_items() -> tuple[list[str], list[int]]:
    """8 seeds x 30 black-background captions, then 8 x 30 white-background ones; seed = index."""
    black, white = captions_with("black"), captions_with("white")
    prompts = [c for _ in range(SEEDS_PER_CAPTION) for c in black]
    prompts += [c for _ in range(SEEDS_PER_CAPTION) for c in white]
    return prompts, list(range(len(prompts)))


def brightness_direction(model: LatentDiffusion, n: int = 512) -> torch.Tensor:
    """Unit (C,) direction from the mean latent of black-background images to white-background ones
    (held-out shapes images, samples 20,000 + of seed 0; the VAE's posterior mode)."""
    images, _, attributes = shapes_tensors(n, seed=0, start=20_000)
    with torch.no_grad():
        means = model.vae.encode_latents(images, sample=False).mean(dim=(2, 3))
    background = [a["background"] for a in attributes]
    white = means[torch.tensor([b == "white" for b in background])].mean(0)
    black = means[torch.tensor([b == "black" for b in background])].mean(0)
    return (white - black) / (white - black).norm()


def rounded(values: torch.Tensor) -> list[float]:
    return [round(v, 3) for v in values.tolist()]


def generate(model, prompts, seeds, w, phi, spacing="trailing") -> torch.Tensor:
    out = []
    for start in range(0, len(prompts), BATCH):
        out.append(
            model.generate(
                prompts[start : start + BATCH],
                seeds=seeds[start : start + BATCH],
                num_inference_steps=STEPS,
                guidance_scale=w,
                guidance_rescale=phi,
                spacing=spacing,
            )
        )
    return border_brightness(torch.cat(out))


@torch.no_grad()
def shifted(model, prompts, seeds, direction, delta, w, phi) -> torch.Tensor:
    """Border luma of images sampled from x_T + delta * direction (per channel, every pixel)."""
    f = model.vae.downsampling_factor
    shape = (len(prompts), model.unet.config.in_channels, model.resolution // f, model.resolution // f)
    x_T = initial_noise(shape, [torch.Generator().manual_seed(s) for s in seeds])
    x_T = x_T + delta * direction.view(1, -1, 1, 1)
    latents = sample(
        "ddim", model.guided_model(prompts, w, phi), shape, model.schedule, STEPS,
        model.prediction_type, "trailing", x_T=x_T, progress=False,
    )  # fmt: skip
    return border_brightness(model.decode(latents))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="models/noise_experiments/brightness.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    prompts, seeds = natural_items()
    black, white = captions_with("black"), captions_with("white")
    shift_prompts, shift_seeds = black + white, list(range(len(black) + len(white)))
    result: dict = {
        "command": "nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python scripts/brightness_experiments.py",
        "sampler": f"ddim, {STEPS} steps",
        "natural": {"items": "8 seeds x 30 black-background captions, then 8 x 30 white; seed = index",
                    "runs": []},
        "shift": {"items": "the 30 black-background captions, then the 30 white; seed = index",
                  "deltas": list(DELTAS), "guidance_scale": 1.0, "runs": []},
        "unconditional": {"items": "the empty prompt, seeds 0..95", "runs": []},
        "seconds": {},
    }  # fmt: skip
    for name in MODELS:
        start = time.perf_counter()
        model = LatentDiffusion.load(f"models/{name}.safetensors")
        phi = 0.7 if model.config["diffusion"]["zero_terminal_snr"] else 0.0
        if "direction" not in result:
            result["direction"] = [round(v, 4) for v in brightness_direction(model).tolist()]
        direction = torch.tensor(result["direction"])
        settings = [(1.0, "trailing"), (5.0, "trailing")] + ([(1.0, "leading")] if name in LEAKY else [])
        for w, spacing in settings:
            y = generate(model, prompts, seeds, w, phi, spacing)
            result["natural"]["runs"].append(
                {"model": name, "guidance_scale": w, "guidance_rescale": phi, "spacing": spacing,
                 "border_luma": rounded(y)}
            )  # fmt: skip
            n = len(y) // 2
            print(f"{name} w={w} {spacing}: black {y[:n].mean():.3f}, white {y[n:].mean():.3f}", flush=True)
        rows = [rounded(shifted(model, shift_prompts, shift_seeds, direction, d, 1.0, phi)) for d in DELTAS]
        result["shift"]["runs"].append({"model": name, "guidance_rescale": phi, "border_luma": rows})
        for resolution in (32, 64):
            model.resolution = resolution
            y = generate(model, [""] * 96, list(range(96)), 1.0, 0.0)
            result["unconditional"]["runs"].append(
                {"model": name, "resolution": resolution, "border_luma": rounded(y)}
            )
        result["seconds"][name] = round(time.perf_counter() - start)
        print(f"{name}: {result['seconds'][name]} s", flush=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
