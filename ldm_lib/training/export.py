"""Smaller files for sharing a trained model: keep only what sampling uses.

``model.safetensors`` from the trainer holds the raw weights and their EMA (twice the size of the
network). :func:`export_ema` writes a copy with the EMA weights only (plus the buffers, which EMA
does not average), the config and the step: what ``LatentDiffusion.load`` needs. The course's
committed models (``models/shapes_ldm_*.safetensors``) are made this way.

    python -m ldm_lib.training.export runs/shapes_ldm_eps/model.safetensors models/shapes_ldm_eps.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .checkpoint import atomic_save, read_checkpoint

EMA_ONLY = "ema-only"


def export_ema(source: str | Path, target: str | Path) -> Path:
    """Copy ``source`` (a trainer's model file or checkpoint) to ``target`` with only the EMA
    weights; raises ``ValueError`` when ``source`` has no EMA."""
    tensors, metadata = read_checkpoint(source)
    ema = {k: v for k, v in tensors.items() if k.startswith("ema.")}
    if not ema:
        raise ValueError(f"{source} has no EMA weights (trained with ema.enabled=false): nothing to export")
    averaged = {k[len("ema.") :] for k in ema}
    buffers = {
        k: v for k, v in tensors.items() if k.startswith("model.") and k[len("model.") :] not in averaged
    }
    frozen = {k: v for k, v in tensors.items() if k.startswith("frozen_text_encoder.")}
    keep = {"stage", "step", "config"}
    meta = {k: v for k, v in metadata.items() if k in keep}
    meta["weights"] = EMA_ONLY
    return atomic_save({**ema, **buffers, **frozen}, target, meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_lib.training.export", description=__doc__)
    parser.add_argument("source", help="model.safetensors or a checkpoint written by the trainer")
    parser.add_argument("target", help="the file to write")
    args = parser.parse_args(argv)
    path = export_ema(args.source, args.target)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
