"""Training checkpoints: one safetensors file holding everything a run needs to continue exactly.

Tensors: ``model.*`` (the trained module: ``unet.*``, and ``text_encoder.*`` when it is trained), ``ema.*``,
``discriminator.*`` (VAE stage with a GAN), ``optimizer.<name>.<param index>.<state>`` (AdamW's
moments and step counts, per optimizer), ``rng.*`` (the CPU, CUDA and the run's generator states).
Metadata (strings): the config as YAML, the step, the EMA update count, the optimizers' param groups
as JSON and the grad scaler's state as YAML. The learning rate is a function of the step (see
``lr_schedule.py``), so the step is the scheduler's whole state.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the final name (``os.replace`` is atomic on POSIX and Windows): a crash while writing leaves the
previous checkpoint intact and never a half-written file under a checkpoint's name.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7})\.safetensors$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.safetensors"


def checkpoint_step(path: str | Path) -> int:
    """The step in a checkpoint's name (``step_0000500.safetensors`` -> 500)."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"{str(path)!r} is not named like a checkpoint, step_NNNNNNN.safetensors")
    return int(match.group(1))


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoints in ``folder``, oldest first (temporary files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, tmp, metadata={"format": "pt", **metadata})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; give it a normal file's mode
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
            fd = os.open(path.parent, os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a checkpoint."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


# -------------------------------------------------------------------- optimizer <-> flat tensors


def optimizer_to_tensors(
    optimizer: torch.optim.Optimizer, prefix: str
) -> tuple[dict[str, torch.Tensor], str]:
    """Flatten ``optimizer.state_dict()``: per-parameter tensors under ``prefix.<index>.<name>``,
    the param groups (hyper-parameters, JSON-serialisable) returned as a JSON string."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"{prefix}.{index}.{name}"] = torch.as_tensor(value)
    return tensors, json.dumps(state["param_groups"])


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str, groups_json: str
) -> None:
    """Load what :func:`optimizer_to_tensors` wrote into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    groups = json.loads(groups_json)
    for group in groups:  # JSON turned tuples into lists
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.``, with the prefix removed."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
