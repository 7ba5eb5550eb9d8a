"""Multi-process training on the CPU (gloo): ``torchrun --nproc_per_node 2 -m ldm_lib.train`` with
micro-batches of b and two accumulation steps trains the weights of one process with micro-batches
of 2b, and DDP all-reduces the gradients once per optimizer step, not once per micro-batch. The
text encoder is trained too, read SD2-style at its penultimate layer (its last block gets no
gradient, which DDP must be told about).

The two processes run ``ldm_lib.train`` as ``-m`` does (``runpy.run_module(..., "__main__")``)
through a small launcher that first registers a DDP communication hook counting the all-reduces.
About 15-30 s: two fresh interpreters import torch and transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from test_training_helpers import (
    TEXT_WIDTH,
    assert_tensors_close,
    last_checkpoint,
    ldm_config,
    ldm_dict,
    make_artefacts,
    read_checkpoint,
    section,
    train,
)
from torch.testing import assert_close

from ldm_lib.models.text import TextEncoderConfig, build_text_encoder
from ldm_lib.training import read_metrics
from ldm_lib.training.config import apply_overrides

REPO = Path(__file__).resolve().parents[1]
STEPS = 4  # the zero-initialised UNet passes gradients to the text encoder from step 3 on
# Micro-batches of 2 per process, 2 accumulation steps, 2 processes: 8 images per optimizer step.
COMMON = (
    f"optim.max_steps={STEPS}",
    "optim.grad_accum_steps=2",
    "diffusion.noise_offset=0.1",
    "diffusion.input_perturbation=0.1",
    "logging.checkpoint_every=2",
    "model.train_text_encoder=true",
    "model.text_encoder_layer=penultimate",
)

LAUNCHER = """\
import json, os, runpy
from pathlib import Path

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

calls = []  # one entry per all-reduce of the first gradient bucket
init = DistributedDataParallel.__init__


def counting_init(self, *args, **kwargs):
    init(self, *args, **kwargs)

    def hook(state, bucket):
        if bucket.index() == 0:
            calls.append(1)
        return default_hooks.allreduce_hook(state, bucket)

    self.register_comm_hook(None, hook)


DistributedDataParallel.__init__ = counting_init
try:
    runpy.run_module("ldm_lib.train", run_name="__main__", alter_sys=True)
finally:
    out = Path(os.environ["COUNT_DIR"]) / f"rank{os.environ['RANK']}.json"
    out.write_text(json.dumps({"allreduces": len(calls), "world_size": int(os.environ["WORLD_SIZE"])}))
"""


def test_ddp_matches_one_process_and_syncs_once_per_step(tmp_path_factory, tmp_path: Path) -> None:
    arts = make_artefacts(tmp_path_factory.mktemp("artefacts"))
    encoder = two_layer_text_encoder(tmp_path / "text_encoder")
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    common = (*COMMON, f"model.text_encoder={encoder}")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(apply_overrides(ldm_dict(arts, ddp_out), [*common, "optim.batch_size=2"]))
    )
    launcher = tmp_path / "launch_train.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COUNT_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(launcher), str(config), "logging.progress=false"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"done: step {STEPS}" in result.stdout  # printed once, by rank 0
    assert result.stdout.count("done: step") == 1

    # gradients are all-reduced on the last micro-batch of each step only (no_sync before)
    counts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert counts == [{"allreduces": STEPS, "world_size": 2}] * 2

    # one process with micro-batches of 2b sees the same images and noise and trains the same weights
    single = train(ldm_config(arts, single_out, *common, "optim.batch_size=4"))
    a, meta_a = last_checkpoint(single_out)
    b, meta_b = last_checkpoint(ddp_out)
    assert meta_a["step"] == meta_b["step"] == str(STEPS)
    for prefix in ("model", "ema", "optimizer"):
        assert_tensors_close(section(a, prefix), section(b, prefix), rtol=1e-4, atol=1e-5)
    final_a, _ = read_checkpoint(single_out / "model.safetensors")
    final_b, _ = read_checkpoint(ddp_out / "model.safetensors")
    assert_tensors_close(final_a, final_b, rtol=1e-4, atol=1e-5)
    # the logged loss is the mean over both processes: the big batch's loss
    losses_a = [r["loss"] for r in read_metrics(single_out)]
    losses_b = [r["loss"] for r in read_metrics(ddp_out)]
    assert [r["step"] for r in read_metrics(ddp_out)] == list(range(1, STEPS + 1))
    assert_close(losses_b, losses_a, rtol=1e-5, atol=0)
    assert (ddp_out / "samples" / f"step_{STEPS:07d}.png").is_file()

    # the text encoder was trained, except its last block, which cannot affect the loss
    initial = build_text_encoder(str(encoder)).state_dict()
    trained = {
        k[len("model.text_encoder.") :]: v for k, v in b.items() if k.startswith("model.text_encoder.")
    }
    changed = {k for k in trained if not torch.equal(trained[k], initial[k])}
    assert any(".layers.0." in k for k in changed) and not any(".layers.1." in k for k in changed)
    last_block = [k for k in initial if ".layers.1." in k]
    assert len(single.optimizer.param_groups[1]["params"]) == len(initial) - len(last_block) > 0


def two_layer_text_encoder(folder: Path) -> Path:
    """A 2-block encoder (penultimate needs two), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        config = TextEncoderConfig(hidden_size=TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64)  # fmt: skip
        build_text_encoder(config).save_pretrained(folder)
    return folder
