"""Generate images from a trained model: ``python -m ldm_lib.sample CHECKPOINT --prompt TEXT ...``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = """\
Generate a PNG grid from a model trained with python -m ldm_lib.train: its model.safetensors, or a
checkpoint from its checkpoints/ folder (the EMA weights are used unless --no-ema). The VAE and
text encoder come from the paths recorded in the model's config. Each image starts from the noise
of its own seed, so an image does not change with the batch it is in.

  python -m ldm_lib.sample models/shapes_ldm_eps.safetensors -p "a large red circle on a white background"
  python -m ldm_lib.sample runs/try/model.safetensors -p "a small blue square on a black background" \\
      -p "a large yellow triangle on a gray background" --num-images 4 --guidance-scale 5 --out grid.png

  python -m ldm_lib.sample models/shapes_ldm_v_ztsnr.safetensors \\
      -p "a small green circle on a black background" --sampler dpmpp_2m --steps 15 \\
      --guidance-scale 5 --guidance-rescale 0.7 --seed 7

Samplers (ldm_lib.samplers): ddim (deterministic unless --eta > 0), ddpm, euler, euler_ancestral,
heun (two network calls per step), dpmpp_2m. Classifier-free guidance: --guidance-scale 1 is the
conditional model alone, larger values follow the prompt more closely (and saturate colours).
Each caption in the grid names its prompt and seed.
"""


# The names of ldm_lib.samplers.SAMPLERS, listed here so that --help needs no torch import
# (tests/test_cli.py checks they agree).
SAMPLER_NAMES = ("ddim", "ddpm", "euler", "euler_ancestral", "heun", "dpmpp_2m")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldm_lib.sample",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="model.safetensors or a checkpoint written by the trainer")
    parser.add_argument(
        "-p", "--prompt", action="append", required=True, help="a caption; repeat for several"
    )
    parser.add_argument("-n", "--num-images", type=int, default=2, help="images per prompt (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; the others count up")
    parser.add_argument(
        "--sampler", default="ddim", choices=SAMPLER_NAMES, help="the sampler (default ddim)", metavar="NAME"
    )
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    parser.add_argument("--guidance-scale", type=float, default=4.0, help="CFG scale w (default 4)")
    parser.add_argument(
        "--guidance-rescale",
        type=float,
        default=None,
        help="guidance rescale phi in [0, 1]; default 0.7 for zero-terminal-SNR models, else 0",
    )
    parser.add_argument("--spacing", default="trailing", help="timestep spacing: leading, trailing, linspace")
    parser.add_argument(
        "--eta",
        type=float,
        default=None,
        help="fresh noise per step, for ddim (default 0: deterministic; 1 is like DDPM) and "
        "euler_ancestral (default 1)",
    )
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their EMA")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("-o", "--out", default="samples.png", help="the PNG grid to write")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.steps < 1:
        parser.error(f"--num-images={args.num_images} and --steps={args.steps} must be at least 1")

    import torch

    from .pipeline import LatentDiffusion
    from .viz import image_grid

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"error: --device {args.device} but CUDA is not available here; use --device cpu", file=sys.stderr
        )
        return 2
    try:
        model = LatentDiffusion.load(args.checkpoint, use_ema=not args.no_ema, device=args.device)
        rescale = args.guidance_rescale
        if rescale is None:  # Lin et al. 2023 pair zero terminal SNR with rescale 0.7
            rescale = 0.7 if (model.config or {}).get("diffusion", {}).get("zero_terminal_snr") else 0.0
        prompts = [p for p in args.prompt for _ in range(args.num_images)]
        seeds = [args.seed + i for i in range(len(prompts))]
        with torch.no_grad():
            images = model.generate(
                prompts,
                seeds=seeds,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                guidance_rescale=rescale,
                sampler=args.sampler,
                spacing=args.spacing,
                eta=args.eta,
                progress=True,
            )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    captions = [f"{p} (seed {s})" for p, s in zip(prompts, seeds, strict=True)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, captions, ncols=args.num_images).save(out)
    print(f"wrote {out} ({len(prompts)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
