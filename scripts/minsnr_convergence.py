r"""Min-SNR's effect on convergence, measured like with like (notebook 13).

The training logs of ``shapes_ldm_eps`` and ``shapes_ldm_eps_minsnr`` cannot be compared directly:
the min-SNR run logs its *weighted* loss, :math:`\min(\mathrm{SNR},\gamma)/\mathrm{SNR}` times the
ε-MSE (Hang et al. 2023, arXiv 2303.09556), which is smaller by construction. So this script measures
both runs on one fixed held-out validation set of (x0, t, ε, caption), with the EMA weights the
samplers use, at several steps of training:

- the unweighted ε-MSE at 16 timesteps (and its mean over them: the ε model's objective),
- the min-SNR-5-weighted mean (the min-SNR model's objective),
- prompt adherence (all four attributes right) of 96 captions x 1 seed, DDIM 20 steps, w = 4.

Early steps come from re-running each config with its own seed (same data, noise and timesteps, so
the same run: the re-run's logged losses are compared with the committed log and the gap is
recorded); it stops at ``--stop`` steps. The last two points are the checkpoints the original run
kept (``runs/<name>/checkpoints``, steps 2500 and 3000; the trainer keeps the newest two), so the
script needs the original runs' folders. Writes a small JSON for the notebook:

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python scripts/minsnr_convergence.py
    # -> models/training_logs/minsnr_convergence.json (70 min on the shared 2-core CPU, both runs)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from ldm_lib.data.shapes import shapes_tensors
from ldm_lib.eval import adherence
from ldm_lib.eval.generation import all_captions
from ldm_lib.interop.diffusers_format import load_vae
from ldm_lib.pipeline import REPO_ROOT, LatentDiffusion
from ldm_lib.training import load_config, read_metrics
from ldm_lib.training.ldm_stage import LDMTrainer
from ldm_lib.weighting import min_snr_weight

NAMES = ("shapes_ldm_eps", "shapes_ldm_eps_minsnr")
EVAL_STEPS = (50, 100, 200, 300, 400, 600, 800, 1000, 1500)
GAMMA = 5.0
NUM_T = 16  # validation timesteps: the middles of 16 equal bins of [0, 1000)
PER_T = 128  # held-out samples per timestep
HELD_OUT_START = 20_000  # the training set is samples 0 .. 19,999 of seed 0


class StopRun(Exception):
    """Raised after the last evaluated step: the rest of the run is the committed one."""


def validation_set(vae_path: Path) -> dict[str, object]:
    """Fixed (x0, t, eps, caption): held-out shapes images encoded by the course VAE."""
    images, captions, _ = shapes_tensors(PER_T, seed=0, start=HELD_OUT_START)
    vae = load_vae(vae_path, subfolder=None).eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        x0 = vae.encode_latents(images, generator=g)
    timesteps = torch.arange(NUM_T) * (1000 // NUM_T) + 1000 // NUM_T // 2  # 31, 93, ..., 968
    noise = torch.randn((NUM_T, *x0.shape), generator=g)
    return {"x0": x0, "captions": captions, "timesteps": timesteps, "noise": noise}


@torch.no_grad()
def evaluate(model: LatentDiffusion, val: dict[str, object]) -> dict[str, object]:
    model.unet.eval()
    schedule = model.schedule
    x0, timesteps, noise = val["x0"], val["timesteps"], val["noise"]
    context = model.encode_prompts(val["captions"])
    per_t = []
    for j, t in enumerate(timesteps.tolist()):
        tt = torch.full((x0.shape[0],), t, dtype=torch.long)
        x_t = schedule.add_noise(x0, noise[j], tt)
        eps_hat = model.unet(x_t, tt, context).float()
        per_t.append((eps_hat - noise[j]).pow(2).mean().item())
    mse = torch.tensor(per_t, dtype=torch.float64)
    weights = min_snr_weight(schedule.snr(timesteps).double(), GAMMA, "epsilon")
    prompts = all_captions()
    images = model.generate(prompts, seeds=0, num_inference_steps=20, guidance_scale=4.0)
    report = adherence(images, prompts)
    return {
        "eps_mse_per_t": [round(v, 6) for v in per_t],
        "eps_mse": round(mse.mean().item(), 6),
        "minsnr_weighted": round((weights * mse).mean().item(), 6),
        "adherence_all": round(report.all, 4),
        "adherence_attribute": round(report.attribute, 4),
    }


class EvaluatingTrainer(LDMTrainer):
    """The library's trainer, unchanged, plus an evaluation of the EMA weights at chosen steps."""

    def __init__(self, config, val, eval_steps, stop) -> None:
        self.val, self.eval_steps, self.stop, self.points = val, set(eval_steps), stop, []
        super().__init__(config)

    def after_step(self) -> dict[str, float]:
        if self.step in self.eval_steps:
            state = torch.random.get_rng_state()
            start = time.perf_counter()
            point = {"step": self.step, **evaluate(self.sampling_model(), self.val)}
            torch.random.set_rng_state(state)  # the evaluation must not change the run
            self.points.append(point)
            print(
                f"  step {self.step}: {point['eps_mse']:.4f} eps-MSE, "
                f"{point['adherence_all']:.3f} adherence ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
        if self.step >= self.stop:
            raise StopRun
        return super().after_step()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--names", nargs="*", default=list(NAMES))
    parser.add_argument("--stop", type=int, default=max(EVAL_STEPS))
    parser.add_argument("--workdir", default="runs/convergence")
    parser.add_argument("--out", default="models/training_logs/minsnr_convergence.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    val = validation_set(REPO_ROOT / "models" / "course_vae")
    result = {
        "command": "nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python scripts/minsnr_convergence.py",
        "gamma": GAMMA,
        "timesteps": val["timesteps"].tolist(),
        "samples_per_t": PER_T,
        "adherence": "96 captions x 1 seed, DDIM 20 steps trailing, guidance 4",
        "runs": {},
    }
    for name in args.names:
        start = time.perf_counter()
        out = Path(args.workdir) / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        cache = Path("runs") / name / "latents.safetensors"
        if cache.is_file():  # the original run's latent cache: the same latents, no re-encoding
            shutil.copy(cache, out / "latents.safetensors")
        config = load_config(
            f"configs/{name}.yaml",
            [
                f"output_dir={out}",
                "logging.progress=false",
                "logging.validate_every=0",
                "logging.checkpoint_every=100000",
            ],
        )
        trainer = EvaluatingTrainer(config, val, EVAL_STEPS, args.stop)
        print(f"{name}: re-running to step {args.stop}", flush=True)
        try:
            trainer.train()
        except StopRun:
            pass
        points = trainer.points
        # The re-run is the committed run: compare the logged losses step for step.
        rerun = {r["step"]: r["loss"] for r in read_metrics(out)}
        original = {r["step"]: r["loss"] for r in read_metrics(Path("runs") / name)}
        common = sorted(set(rerun) & set(original))
        gap = max(abs(rerun[s] - original[s]) for s in common) if common else None
        for ckpt in sorted((Path("runs") / name / "checkpoints").glob("step_*.safetensors")):
            step = int(ckpt.stem.split("_")[1])
            if step > args.stop:
                points.append({"step": step, **evaluate(LatentDiffusion.load(ckpt), val)})
                print(f"  checkpoint {step}: {points[-1]['eps_mse']:.4f} eps-MSE", flush=True)
        result["runs"][name] = {
            "points": points,
            "rerun_steps_compared": len(common),
            "rerun_max_loss_gap": gap,
            "seconds": round(time.perf_counter() - start),
        }
        print(f"{name}: {len(common)} logged losses compared, largest gap {gap}", flush=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
