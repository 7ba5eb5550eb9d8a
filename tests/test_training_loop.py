"""Tests of the shared training loop (ldm_lib.training.trainer) through tiny real runs on the CPU:
gradient accumulation equals the big batch (both stages), exact resume, atomic checkpoints and their
pruning and contents, the NaN stop, metrics and validation grids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from test_training_helpers import (
    assert_tensors_close,
    last_checkpoint,
    ldm_config,
    make_artefacts,
    section,
    train,
    vae_train_config,
)

from ldm_lib.training import NonFiniteLossError, make_trainer, plot_metrics, read_metrics
from ldm_lib.training import checkpoint as checkpoint_module
from ldm_lib.training.checkpoint import list_checkpoints, optimizer_from_tensors, read_checkpoint
from ldm_lib.training.ldm_stage import LDMTrainer
from ldm_lib.training.trainer import Trainer


@pytest.fixture(scope="session")
def arts(tmp_path_factory):
    return make_artefacts(tmp_path_factory.mktemp("artefacts"))


def steps_of(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out)]


def checkpoint_steps(out: Path) -> list[int]:
    return [int(p.stem.split("_")[1]) for p in list_checkpoints(out / "checkpoints")]


# ------------------------------------------------------------------------ gradient accumulation


def compare_runs(
    big: Path, accumulated: Path, rtol: float, atol: float, noise_only: tuple[str, ...] = ()
) -> None:
    """``noise_only``: parameters whose true gradient is exactly zero; AdamW turns the round-off in
    their gradients into steps of about lr, so their values are compared with atol ~ lr x steps."""
    a, _ = last_checkpoint(big)
    b, _ = last_checkpoint(accumulated)
    for prefix in ("model", "ema", "optimizer"):
        sa, sb = section(a, prefix), section(b, prefix)
        assert sa, prefix
        noisy = [k for k in sa if any(name in k for name in noise_only)]
        assert_tensors_close({k: sa[k] for k in noisy}, {k: sb[k] for k in noisy}, rtol=0, atol=1e-2)
        exact = [k for k in sa if k not in noisy]
        assert_tensors_close({k: sa[k] for k in exact}, {k: sb[k] for k in exact}, rtol=rtol, atol=atol)
    # The loss and the gradient norm of every step are those of the big batch: a loss not divided by
    # the number of micro-batches would double both (AdamW alone would hide it).
    for ra, rb in zip(read_metrics(big), read_metrics(accumulated), strict=True):
        assert ra["step"] == rb["step"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)


def test_ldm_accumulation_equals_the_big_batch(arts, tmp_path: Path) -> None:
    common = ("optim.max_steps=3", "diffusion.noise_offset=0.1", "diffusion.input_perturbation=0.1",
              "diffusion.min_snr_gamma=5", "optim.max_grad_norm=0.5")  # fmt: skip
    train(ldm_config(arts, tmp_path / "big", *common, "optim.batch_size=8"))
    train(ldm_config(arts, tmp_path / "acc", *common, "optim.batch_size=4", "optim.grad_accum_steps=2"))
    compare_runs(tmp_path / "big", tmp_path / "acc", rtol=1e-5, atol=1e-6)


def test_vae_accumulation_equals_the_big_batch(tmp_path: Path) -> None:
    train(vae_train_config(tmp_path / "big", "optim.batch_size=8"))
    train(vae_train_config(tmp_path / "acc", "optim.batch_size=2", "optim.grad_accum_steps=4"))
    # the key bias of the VAE's attention: softmax is invariant to it, its gradient is round-off
    # (its loss is a per-image sum of hundreds: gradients carry more round-off than the LDM's)
    compare_runs(tmp_path / "big", tmp_path / "acc", rtol=1e-4, atol=1e-5, noise_only=("to_k.bias",))
    for name in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "acc" / name).is_file()


# ---------------------------------------------------------------------------------- resume


RESUME = (
    "optim.max_steps=6",
    "optim.warmup_steps=3",  # the warm-up crosses both restarts: the lr is a function of the step
    "logging.checkpoint_every=3",
    "logging.keep_checkpoints=5",
    "model.unet_overrides.dropout=0.1",  # uses the global RNG: its state must be restored exactly
    "diffusion.noise_offset=0.1",
    "diffusion.input_perturbation=0.1",
)


def test_resume_is_exact(arts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """6 steps in one go == 2 steps, then a run extended to 6 that dies after step 5 (checkpoint at
    3, metrics logged up to 4), then the same command again, which resumes from step 3."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(ldm_config(arts, whole, *RESUME))

    train(ldm_config(arts, parts, *RESUME, "optim.max_steps=2"))  # stops at 2: a checkpoint, then model
    assert checkpoint_steps(parts) == [2] and steps_of(parts) == [1, 2]

    def crash(self: Trainer) -> dict:
        if self.step == 5:
            raise KeyboardInterrupt("killed")
        return {}

    with monkeypatch.context() as patch:
        patch.setattr(LDMTrainer, "after_step", crash)
        with pytest.raises(KeyboardInterrupt):
            train(ldm_config(arts, parts, *RESUME))
    assert checkpoint_steps(parts) == [2, 3] and steps_of(parts) == [1, 2, 3, 4]

    trainer = train(ldm_config(arts, parts, *RESUME))
    assert trainer.step == 6
    a, meta_a = last_checkpoint(whole)
    b, meta_b = last_checkpoint(parts)
    assert meta_a["step"] == meta_b["step"] == "6" and meta_a["ema_updates"] == meta_b["ema_updates"] == "6"
    assert_tensors_close(a, b)  # model, EMA, AdamW moments and steps, RNG states: bit for bit
    final_a, _ = read_checkpoint(whole / "model.safetensors")
    final_b, _ = read_checkpoint(parts / "model.safetensors")
    assert_tensors_close(final_a, final_b)

    # metrics.jsonl: each step once; the records after the checkpoint resumed from were replaced
    assert steps_of(parts) == [1, 2, 3, 4, 5, 6]
    losses_a = {r["step"]: r["loss"] for r in read_metrics(whole)}
    assert {r["step"]: r["loss"] for r in read_metrics(parts)} == losses_a


def test_resume_refuses_a_changed_config(arts, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(ldm_config(arts, out, "optim.max_steps=1"))
    with pytest.raises(ValueError, match=r"config changed \(optim\.lr: 0\.001 -> 0\.002\).*resume=false"):
        make_trainer(ldm_config(arts, out, "optim.max_steps=2", "optim.lr=0.002"))
    with pytest.raises(ValueError, match=r"diffusion\.prediction_type: 'epsilon' -> 'v_prediction'"):
        make_trainer(ldm_config(arts, out, "diffusion.prediction_type=v_prediction"))
    # the step budget, logging and where it runs may change; the run continues from its checkpoint
    trainer = make_trainer(ldm_config(arts, out, "optim.max_steps=5", "logging.log_every=2", "num_workers=0"))
    assert trainer.step == 1 and trainer.last_checkpoint == out / "checkpoints" / "step_0000001.safetensors"
    # resume=false starts over
    assert make_trainer(ldm_config(arts, out, "optim.lr=0.002", "resume=false")).step == 0


def test_resume_false_starts_over(arts, tmp_path: Path) -> None:
    """A run started over in a folder that holds a longer run's checkpoints keeps its own
    checkpoints, and resuming later continues it, not the abandoned run."""
    out = tmp_path / "run"
    ckpt = ("logging.checkpoint_every=1", "logging.keep_checkpoints=2")
    train(ldm_config(arts, out, *ckpt, "optim.max_steps=4"))
    assert checkpoint_steps(out) == [3, 4]
    restarted = train(ldm_config(arts, out, *ckpt, "optim.max_steps=2", "resume=false", "seed=1"))
    assert checkpoint_steps(out) == [1, 2] and steps_of(out) == [1, 2]
    again = make_trainer(ldm_config(arts, out, *ckpt, "optim.max_steps=2", "seed=1"))
    assert again.step == 2
    assert_tensors_close(again.train_module.state_dict(), restarted.train_module.state_dict())


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_write_is_atomic(arts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while writing the step-3 checkpoint (after part of the file is on disk) leaves the
    step-2 checkpoint intact, no temporary file, and a run that resumes from step 2."""
    out = tmp_path / "run"
    real_save = checkpoint_module.save_file
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            Path(filename).write_bytes(b"\x00" * 1000)  # a partial write, then the disk is full
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save)
    config = ldm_config(arts, out, "optim.max_steps=4", "logging.checkpoint_every=1")
    with pytest.raises(OSError, match="No space left"):
        train(config)
    assert Path(calls[2]).parent == out / "checkpoints" and Path(calls[2]).name != "step_0000003.safetensors"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_0000001.safetensors",
        "step_0000002.safetensors",
    ]
    tensors, metadata = read_checkpoint(out / "checkpoints" / "step_0000002.safetensors")
    assert metadata["step"] == "2" and section(tensors, "model")

    monkeypatch.setattr(checkpoint_module, "save_file", real_save)
    resumed = make_trainer(config)
    assert resumed.step == 2
    assert_tensors_close(
        resumed.train_module.state_dict(), {k[6:]: v for k, v in section(tensors, "model").items()}
    )


def test_checkpoints_pruned_and_complete(arts, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = train(
        ldm_config(
            arts,
            out,
            "optim.max_steps=4",
            "logging.checkpoint_every=1",
            "logging.keep_checkpoints=2",
            "logging.validate_every=2",
            "logging.validation_seeds=[0, 1]",
        )  # fmt: skip
    )
    assert checkpoint_steps(out) == [3, 4]
    tensors, metadata = read_checkpoint(out / "checkpoints" / "step_0000004.safetensors")

    assert metadata["stage"] == "ldm" and metadata["step"] == "4" and metadata["ema_updates"] == "4"
    assert yaml.safe_load(metadata["config"]) == trainer.config.to_dict()
    assert_tensors_close(
        {k[len("model.") :]: v for k, v in section(tensors, "model").items()},
        trainer.train_module.state_dict(),
    )
    assert_tensors_close(
        {k[len("ema.") :]: v for k, v in section(tensors, "ema").items()}, trainer.ema.state_dict()
    )
    assert all(
        k.startswith("model.unet.") for k in section(tensors, "model")
    )  # the frozen encoder is not saved
    torch.testing.assert_close(tensors["rng.torch"], torch.get_rng_state())  # nothing random ran since
    torch.testing.assert_close(tensors["rng.generator"], trainer.generator.get_state())

    fresh = torch.optim.AdamW(
        [torch.nn.Parameter(p.detach().clone()) for p in trainer.unet.parameters()], lr=1.0
    )
    optimizer_from_tensors(fresh, tensors, "optimizer", metadata["optimizer_groups"])
    saved, live = fresh.state_dict(), trainer.optimizer.state_dict()
    assert fresh.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert len(saved["state"]) == len(live["state"]) == len(list(trainer.unet.parameters()))
    for index, state in live["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(saved["state"][index][name], state[name], rtol=0, atol=0)

    # the product: weights and EMA, the config, no optimizer
    final, final_meta = read_checkpoint(out / "model.safetensors")
    assert sorted({k.split(".")[0] for k in final}) == ["ema", "model"]
    assert final_meta["step"] == "4" and yaml.safe_load(final_meta["config"]) == trainer.config.to_dict()

    # validation grids at validate_every and at the end: one 16 px image per prompt and seed, x4
    for step in (2, 4):
        with Image.open(out / "samples" / f"step_{step:07d}.png") as grid:
            assert grid.width % 64 == 0 and grid.width >= 2 * 64 and grid.height > 64
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    assert not list((out / "checkpoints").glob(".*"))  # no temporary files left


# ------------------------------------------------------------------------------- NaN stop


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_non_finite_stops_without_updating(
    arts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """At the 4th step the loss (or only its gradient) becomes non-finite: the run stops with a
    message naming the step and the last good checkpoint, which is the newest on disk, and the
    weights in memory are still those of step 3."""
    out = tmp_path / "run"
    micro_loss = LDMTrainer.micro_loss

    class InfiniteGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    def poisoned(self, batch, draw, rows):
        loss, extras = micro_loss(self, batch, draw, rows)
        if self.step == 3:
            loss = loss * float("nan") if what == "loss" else InfiniteGradient.apply(loss)
        return loss, extras

    monkeypatch.setattr(LDMTrainer, "micro_loss", poisoned)
    trainer = make_trainer(
        ldm_config(
            arts,
            out,
            "optim.max_steps=6",
            "logging.checkpoint_every=1",
            "logging.keep_checkpoints=5",
            "optim.grad_accum_steps=2",
            "optim.batch_size=4",
        )  # fmt: skip
    )
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    assert "step 4" in message and "step_0000003.safetensors" in message
    assert ("loss is nan" in message) if what == "loss" else ("gradient norm is nan" in message)
    assert checkpoint_steps(out) == [1, 2, 3] and steps_of(out) == [1, 2, 3]
    assert trainer.step == 3
    tensors, _ = read_checkpoint(out / "checkpoints" / "step_0000003.safetensors")
    assert_tensors_close(
        {k[6:]: v for k, v in section(tensors, "model").items()}, trainer.train_module.state_dict()
    )
    assert_tensors_close({k[4:]: v for k, v in section(tensors, "ema").items()}, trainer.ema.state_dict())
    assert all(p.grad is None for p in trainer.unet.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.unet.parameters())
    assert not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------- metrics


def test_metrics_and_plot(arts, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(ldm_config(arts, out, "optim.max_steps=5", "logging.log_every=2", "optim.warmup_steps=4"))
    records = read_metrics(out)
    assert [r["step"] for r in records] == [2, 4, 5]  # every log_every steps and the last
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "steps_per_s", "samples_per_s", "ema_decay"} <= set(r)
        assert all(isinstance(r[k], float) and r[k] > 0 for k in ("loss", "lr", "grad_norm", "steps_per_s"))
        assert r["samples_per_s"] == pytest.approx(8 * r["steps_per_s"])
    # the lr of the last step of each window: warm-up (n + 1)/4, then constant
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * 2 / 4, 1e-3, 1e-3])
    assert [r["ema_decay"] for r in records] == pytest.approx([2 / 11, 4 / 13, 5 / 14])

    import matplotlib.pyplot as plt

    fig = plot_metrics(out, keys=("loss", "lr", "grad_norm"))
    try:
        assert len(fig.axes) == 3
        for ax, key in zip(fig.axes, ("loss", "lr", "grad_norm"), strict=True):
            (line,) = ax.get_lines()
            assert list(line.get_xdata()) == [2, 4, 5]
            assert list(line.get_ydata()) == pytest.approx([r[key] for r in records])
        assert fig.axes[0].get_yscale() == "log"
    finally:
        plt.close(fig)
    fig = plot_metrics({"a": out, "b": out}, keys=("loss",), smooth=2)
    try:
        assert [
            line.get_label() for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")
        ] == [
            "a",
            "b",
        ]
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="no metrics"):
        plot_metrics(tmp_path / "empty")


def test_vae_resume_with_gan_is_exact(tmp_path: Path) -> None:
    """Stage 1 with the patch GAN on: the discriminator, its BatchNorm statistics and its Adam state
    are part of the checkpoint, so 2 + 2 steps give the weights of 4 in one go."""
    gan = ("vae_loss.adversarial_weight=0.5", "vae_loss.disc_start=1", "vae_loss.disc_layers=1",
           "vae_loss.disc_channels=8", "optim.max_steps=4", "logging.checkpoint_every=2")  # fmt: skip
    train(vae_train_config(tmp_path / "whole", *gan))
    train(vae_train_config(tmp_path / "parts", *gan, "optim.max_steps=2"))
    train(vae_train_config(tmp_path / "parts", *gan))
    a, _ = last_checkpoint(tmp_path / "whole")
    b, _ = last_checkpoint(tmp_path / "parts")
    assert section(a, "discriminator") and section(a, "optimizer_d")
    assert any(k.endswith("running_mean") for k in section(a, "discriminator"))
    assert_tensors_close(a, b)
    assert [r["step"] for r in read_metrics(tmp_path / "parts")] == [1, 2, 3, 4]
    assert all("d_loss" in r for r in read_metrics(tmp_path / "parts") if r["step"] >= 2)


def test_data_workers_do_not_change_training(arts, tmp_path: Path) -> None:
    """Items and their random flips are a function of (seed, epoch, index), not of the process
    that loads them."""
    common = ("optim.max_steps=2", "data.random_flip=true", "optim.batch_size=4", "optim.grad_accum_steps=2")
    train(ldm_config(arts, tmp_path / "main", *common))
    train(ldm_config(arts, tmp_path / "workers", *common, "num_workers=2"))
    a, _ = last_checkpoint(tmp_path / "main")
    b, _ = last_checkpoint(tmp_path / "workers")
    assert_tensors_close(a, b)
