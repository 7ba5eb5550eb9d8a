"""Measure the committed tiny models: prompt adherence and background brightness at guidance
scales 1, 3, 5 and 7.5, over every caption of the shapes grammar (96) x 2 seeds, DDIM 25 steps.
Writes models/EVALUATION.md (tables) and models/evaluation.json; models not named with --models
keep the results already in evaluation.json.

    OMP_NUM_THREADS=1 python scripts/evaluate_course_models.py [--models shapes_ldm_eps ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ldm_lib.eval.generation import evaluate_model
from ldm_lib.pipeline import LatentDiffusion

MODELS = (
    "shapes_ldm_eps",
    "shapes_ldm_v",
    "shapes_ldm_eps_offset",
    "shapes_ldm_eps_minsnr",
    "shapes_ldm_v_ztsnr",
    "shapes_ldm_eps_ip",
)
SCALES = (1.0, 3.0, 5.0, 7.5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--folder", default="models")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.folder)
    # Models not measured this time keep their earlier results.
    saved = folder / "evaluation.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for name in args.models:
        model = LatentDiffusion.load(folder / f"{name}.safetensors")
        rescale = 0.7 if model.config["diffusion"]["zero_terminal_snr"] else 0.0
        start = time.perf_counter()
        results[name] = {
            "guidance_rescale": rescale,
            "rows": evaluate_model(model, SCALES, guidance_rescale=rescale),
        }
        print(f"{name}: {time.perf_counter() - start:.0f} s")
        for row in results[name]["rows"]:
            print("  " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    order = [*MODELS, *sorted(set(results) - set(MODELS))]  # the course's models first, then any other
    results = {name: results[name] for name in order if name in results}
    (folder / "evaluation.json").write_text(json.dumps(results, indent=1))

    lines = [
        "# Evaluation of the course models",
        "",
        "Written by `OMP_NUM_THREADS=1 python scripts/evaluate_course_models.py`: every caption of the",
        "shapes grammar (96) x 2 seeds = 192 images per cell, DDIM 25 steps (trailing spacing), scored",
        "by `ldm_lib.eval` (palette colours, a classifier for shape and size).",
        "",
        "## Prompt adherence (fraction of images with all four attributes right)",
        "",
        "| model | " + " | ".join(f"w = {s:g}" for s in SCALES) + " |",
        "| --- | " + " | ".join("---" for _ in SCALES) + " |",
    ]
    for name, result in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row['all']:.1%}" for row in result["rows"]) + " |")
    lines += ["", "## Per attribute at w = 5 (size / color / shape / background)", ""]
    lines += ["| model | size | color | shape | background |", "| --- | --- | --- | --- | --- |"]
    for name, result in results.items():
        row = next(r for r in result["rows"] if r["guidance_scale"] == 5.0)
        cells = " | ".join(f"{row[k]:.1%}" for k in ("size", "color", "shape", "background"))
        lines.append(f"| {name} | {cells} |")
    lines += ["", "## Background brightness error at w = 5 (mean border luma - target; 0 is exact)", ""]
    lines += ["| model | black (target 0) | gray (0.50) | white (1) |", "| --- | --- | --- | --- |"]
    for name, result in results.items():
        row = next(r for r in result["rows"] if r["guidance_scale"] == 5.0)
        cells = " | ".join(f"{row[f'bg_{bg}_error']:+.3f}" for bg in ("black", "gray", "white"))
        lines.append(f"| {name} | {cells} |")
    (folder / "EVALUATION.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {folder / 'EVALUATION.md'}")


if __name__ == "__main__":
    main()
