"""The training loop shared by both stages: accumulation, mixed precision, clipping, EMA, learning
rate, checkpoints with exact resume, NaN stop, metrics, progress and validation.

One optimizer step (COURSE.md §4):

1. draw every random input of the global batch (timesteps, noise, dropout) from the run's generator;
2. for each of the ``grad_accum_steps`` micro-batches: forward under autocast, loss / accum,
   backward (DDP all-reduces only on the last micro-batch: ``no_sync`` before);
3. stop if the loss is not finite (nothing is updated; the last checkpoint stays the good one);
4. unscale (fp16), clip the global norm, optimizer step at the step's learning rate, EMA update.

A stage subclass builds its networks and data and says what one micro-batch's loss is.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import __version__
from ..models.attention import resolve_backend
from .checkpoint import (
    atomic_save,
    checkpoint_name,
    checkpoint_step,
    list_checkpoints,
    optimizer_from_tensors,
    optimizer_to_tensors,
    prefixed,
    read_checkpoint,
)
from .config import TrainConfig, config_from_dict
from .distributed import all_reduce_mean, barrier, cleanup, setup_distributed
from .ema import EMA
from .lr_schedule import lr_factor
from .metrics import MetricsLog
from .sampler import EpochItems, StepSampler, micro_slice

AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Keys that may change when a run is resumed (where the run writes, how long, how it logs, and
# switches of how, not what, is computed); anything else would not continue the same run.
RESUMABLE_CHANGES = (
    "output_dir",
    "resume",
    "num_workers",
    "device",
    "optim.max_steps",
    "logging.",
    "model.fused_groupnorm_silu",
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without updating the weights."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("unet_overrides", "overrides"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep strings and ints as lists."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


class Trainer:
    """Base class: ``build()`` sets ``self.model`` (the network the stage is about: UNet or VAE),
    ``self.train_module`` (what the loss calls, wrapped by DDP, saved as ``model.*`` and averaged by
    EMA), ``self.dataset`` and ``self.param_groups``; ``micro_loss()`` returns one micro-batch's mean
    loss."""

    stage = ""

    def __init__(self, config: TrainConfig) -> None:
        self.config = c = config
        self.dist, self.device = setup_distributed(c.device)
        if c.mixed_precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"mixed_precision='fp16' needs a CUDA device; this run is on {self.device}")
        if c.mixed_precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("mixed_precision='bf16' is not supported by this GPU; use 'fp16'")
        resolve_backend(c.model.attention_backend, self.device)  # fails now, not at the first forward
        self.out = Path(c.output_dir)
        self.autocast_dtype = AUTOCAST[c.mixed_precision]
        torch.manual_seed(c.seed)  # identical initial weights on every process
        self.generator = torch.Generator().manual_seed(c.seed + 1)  # the run's randomness, same on all ranks
        self.micro, self.accum = c.optim.batch_size, c.optim.grad_accum_steps
        self.global_batch = self.micro * self.accum * self.dist.world_size

        self.build()
        self.model.to(self.device)
        self.train_module.to(self.device)
        self.forward_module: nn.Module = self.train_module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_module = DistributedDataParallel(self.train_module, device_ids=ids)
        if c.model.compile:
            self.forward_module = torch.compile(self.forward_module, backend=c.model.compile_backend)

        o = c.optim
        fused = o.fused if o.fused is not None else self.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(
            self.param_groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=fused
        )
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.scaler = torch.amp.GradScaler("cuda") if c.mixed_precision == "fp16" else None
        self.ema = EMA(self.train_module, c.ema.decay, c.ema.warmup) if c.ema.enabled else None
        self.step = 0
        self.last_checkpoint: Path | None = None
        if c.resume:
            found = list_checkpoints(self.out / "checkpoints")
            if found:
                self.load_checkpoint(found[-1])

    # ----------------------------------------------------------------------- stage interface

    def build(self) -> None:
        raise NotImplementedError

    def draw(self) -> Any:
        """The random inputs of one optimizer step's global batch (sliced per micro-batch)."""
        raise NotImplementedError

    def micro_loss(
        self, batch: dict[str, Any], draw: Any, rows: slice
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self) -> dict[str, float]:
        """Extra work after the optimizer step (the VAE's discriminator); returns metrics."""
        return {}

    def validate(self) -> Path | None:
        return None

    def finish(self) -> None:
        """Write the stage's product (``model.safetensors`` or ``vae/``) at the end of the run."""

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        pass

    # ------------------------------------------------------------------------- checkpoints

    def checkpoint_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {f"model.{k}": v for k, v in self.train_module.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        opt_tensors, groups = optimizer_to_tensors(self.optimizer, "optimizer")
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.generator"] = self.generator.get_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        extra_tensors, extra_meta = self.extra_state()
        tensors.update(extra_tensors)
        metadata = {
            "stage": self.stage,
            "step": str(self.step),
            "config": self.config.to_yaml(),
            "optimizer_groups": groups,
            "ema_updates": str(self.ema.num_updates if self.ema else 0),
            "scaler": yaml.safe_dump(self.scaler.state_dict()) if self.scaler else "",
            "ldm_lib_version": __version__,
            **extra_meta,
        }
        return tensors, metadata

    def save_checkpoint(self) -> Path:
        path = self.out / "checkpoints" / checkpoint_name(self.step)
        if self.dist.is_main:
            tensors, metadata = self.checkpoint_tensors()
            atomic_save(tensors, path, metadata)
            for old in list_checkpoints(path.parent)[: -self.config.logging.keep_checkpoints]:
                old.unlink()
        barrier(self.dist)
        self.last_checkpoint = path
        return path

    def load_checkpoint(self, path: Path) -> None:
        tensors, metadata = read_checkpoint(path)
        if metadata.get("stage") != self.stage:
            raise ValueError(
                f"{path} is a stage {metadata.get('stage')!r} checkpoint; this run is stage {self.stage!r}"
            )
        saved = config_from_dict(yaml.safe_load(metadata["config"]), check_paths=False)
        old, new = _flatten(saved.to_dict()), _flatten(self.config.to_dict())
        changed = sorted(
            k for k in set(old) | set(new) if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)
        )
        if changed:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise ValueError(
                f"cannot resume from {path}: the config changed ({details}). Use another output_dir, "
                "or resume=false to start over"
            )
        before, after, schedule = (
            old.get("optim.max_steps"),
            new.get("optim.max_steps"),
            new.get("optim.lr_schedule"),
        )
        if before != after and schedule != "constant":
            warnings.warn(
                f"optim.max_steps changed from {before} to {after} on resume: the {schedule} learning-rate "
                "schedule is stretched, so the rate jumps",
                stacklevel=2,
            )
        self.train_module.load_state_dict(prefixed(tensors, "model"))
        if self.ema is not None:
            self.ema.load_state_dict(prefixed(tensors, "ema"), int(metadata["ema_updates"]))
        optimizer_from_tensors(self.optimizer, tensors, "optimizer", metadata["optimizer_groups"])
        if self.scaler is not None and metadata.get("scaler"):
            self.scaler.load_state_dict(yaml.safe_load(metadata["scaler"]))
        torch.set_rng_state(tensors["rng.torch"])
        self.generator.set_state(tensors["rng.generator"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.load_extra_state(tensors, metadata)
        self.step = int(metadata["step"])
        self.last_checkpoint = path

    # --------------------------------------------------------------------------------- loop

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loader(self, dataset: Dataset) -> DataLoader:
        sampler = StepSampler(
            len(dataset),
            self.micro,
            self.accum,
            self.dist.world_size,
            self.dist.rank,
            self.config.seed,
            self.step,
        )
        # Its own generator: by default a DataLoader iterator draws its workers' base seed from the
        # global RNG, which would shift the dropout masks of a resumed run against an uninterrupted one.
        return DataLoader(
            EpochItems(dataset),
            batch_size=self.micro,
            sampler=sampler,
            num_workers=self.config.num_workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def train(self) -> dict[str, Any]:
        """Run from the current step to ``optim.max_steps``; returns the last metrics record."""
        c, o, g = self.config, self.config.optim, self.config.logging
        main = self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(c.to_yaml())
            # Checkpoints past this run's step belong to a run that was started over (resume=false):
            # kept, they would outrank this run's own when pruning and when resuming.
            for stale in list_checkpoints(self.out / "checkpoints"):
                if checkpoint_step(stale) > self.step:
                    stale.unlink()
        log = MetricsLog(self.out, self.step) if main else None
        batches = iter(self._loader(self.dataset))
        bar = tqdm(
            total=o.max_steps,
            initial=self.step,
            disable=not (g.progress and main),
            desc=f"train {self.stage}",
        )
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        start_time = window_start
        record: dict[str, Any] = {}
        self.train_module.train()
        try:
            while self.step < o.max_steps:
                factor = lr_factor(self.step, o.lr_schedule, o.warmup_steps, o.max_steps, o.min_lr_ratio)
                for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                    group["lr"] = base * factor
                draw = self.draw()
                total = torch.zeros((), device=self.device)
                extras: dict[str, float] = {}
                for micro in range(self.accum):
                    batch = next(batches)
                    rows = micro_slice(micro, self.dist.rank, self.dist.world_size, self.micro)
                    last = micro == self.accum - 1
                    sync = (
                        contextlib.nullcontext()
                        if (last or not self.dist.enabled)
                        else self.forward_module.no_sync()
                    )
                    with sync:
                        with self.autocast():
                            loss, extras = self.micro_loss(batch, draw, rows)
                        scaled = loss.float() / self.accum
                        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                    total += scaled.detach()
                total = all_reduce_mean(total, self.dist)
                loss_value = float(total)
                if not math.isfinite(loss_value):
                    self.optimizer.zero_grad(set_to_none=True)
                    kept = (
                        f"the last good checkpoint is {self.last_checkpoint}"
                        if self.last_checkpoint
                        else ("no checkpoint had been written yet")
                    )
                    raise NonFiniteLossError(
                        f"the loss is {loss_value} at step {self.step + 1}: stopping without updating the "
                        f"weights; {kept}. Try a lower optim.lr (now {o.lr}), optim.warmup_steps, "
                        "optim.max_grad_norm, "
                        "or bf16 instead of fp16"
                    )
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                max_norm = o.max_grad_norm if o.max_grad_norm is not None else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)  # skipped (and the scale lowered) on inf/NaN grads
                    self.scaler.update()
                elif not math.isfinite(grad_norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(
                        f"the gradient norm is {grad_norm} at step {self.step + 1} (loss {loss_value}); "
                        f"stopping without updating the weights; last checkpoint: {self.last_checkpoint}"
                    )
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                ema_decay = None
                if self.ema is not None and self.step % c.ema.update_every == 0:
                    ema_decay = self.ema.update(self.train_module)
                extras.update(self.after_step())

                window_loss += loss_value
                window_steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                if self.step % g.log_every == 0 or self.step == o.max_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": self.step,
                        "loss": window_loss / window_steps,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "grad_norm": grad_norm,
                        "steps_per_s": window_steps / elapsed,
                        "samples_per_s": window_steps * self.global_batch / elapsed,
                        "time_s": time.perf_counter() - start_time,  # wall time of this process's training
                        **({"ema_decay": ema_decay} if ema_decay is not None else {}),
                        **extras,
                    }
                    if log:
                        log.write(record)
                    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                if self.step % g.checkpoint_every == 0 or self.step == o.max_steps:
                    self.save_checkpoint()
                if main and (
                    (g.validate_every and self.step % g.validate_every == 0) or self.step == o.max_steps
                ):
                    self.validate()
            if main:
                self.finish()
            barrier(self.dist)
        finally:
            bar.close()
        return record

    def close(self) -> None:
        cleanup(self.dist)
