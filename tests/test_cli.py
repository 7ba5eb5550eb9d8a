"""Tests of the command lines ``python -m ldm_lib.train`` and ``python -m ldm_lib.sample`` and of
``LatentDiffusion.load``/``generate`` on a model trained here: help, errors before any work, exit
codes, --print-config, a tiny train-then-sample round trip, and seeds that fix each image."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_training_helpers import PROMPT, ldm_dict, make_artefacts

from ldm_lib import sample as sample_cli
from ldm_lib import train as train_cli
from ldm_lib.pipeline import LatentDiffusion
from ldm_lib.training import load_config
from ldm_lib.training.ldm_stage import LDMTrainer
from ldm_lib.viz import to_image

REPO = Path(__file__).resolve().parents[1]
PROMPT_2 = "a small blue square on a black background"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def arts(tmp_path_factory):
    return make_artefacts(tmp_path_factory.mktemp("artefacts"))


@pytest.fixture
def config_file(arts, tmp_path: Path) -> Path:
    """A tiny stage-2 config written as YAML, output in tmp_path/run."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(ldm_dict(arts, tmp_path / "run")))
    return path


@pytest.fixture(scope="module")
def trained(arts, tmp_path_factory) -> Path:
    """``model.safetensors`` of 3 steps trained through the CLI."""
    folder = tmp_path_factory.mktemp("trained")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(ldm_dict(arts, folder / "run")))
    assert train_cli.main([str(config), "optim.max_steps=3", "diffusion.caption_dropout=0.5"]) == 0
    return folder / "run" / "model.safetensors"


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120
    )


# ----------------------------------------------------------------------------------- train


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (
            "ldm_lib.train",
            ["usage: python -m ldm_lib.train", "key=value", "--print-config", "torchrun", "resumes"],
        ),
        (
            "ldm_lib.sample",
            [
                "usage: python -m ldm_lib.sample",
                "--prompt",
                "--sampler",
                "--guidance-scale",
                "--seed",
                "--out",
            ],
        ),
    ],
)
def test_help(module: str, expected: list[str]) -> None:
    result = run_module(module, "--help")
    assert result.returncode == 0, result.stderr
    for part in expected:
        assert part in result.stdout


def test_bad_key_exits_2_before_any_work(config_file: Path) -> None:
    result = run_module("ldm_lib.train", str(config_file), "optim.lr_rate=0.1")
    assert result.returncode == 2
    assert "error: unknown key(s) ['lr_rate'] in section 'optim'; allowed:" in result.stderr
    assert "'lr'" in result.stderr and "Traceback" not in result.stderr and result.stdout == ""
    assert not (config_file.parent / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["diffusion.prediction_type=x0"], "diffusion.prediction_type='x0' is not supported"),
        (["optim.lr=3e-4x"], "optim.lr='3e-4x' must be a number"),
        (["optim.lr"], "override 'optim.lr' must look like key=value"),
        (
            ["model.unet_overrides.context_dim=48"],
            "model.unet_overrides.context_dim=48 must equal the text encoder's width 32",
        ),
    ],
)
def test_bad_values_exit_2(config_file: Path, capsys, overrides: list[str], message: str) -> None:
    assert train_cli.main([str(config_file), *overrides]) == 2
    captured = capsys.readouterr()
    assert f"error: {message}" in captured.err
    assert not list((config_file.parent / "run").glob("checkpoints/*"))


def test_missing_config_file(tmp_path: Path, capsys) -> None:
    assert train_cli.main([str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml' does not exist" in capsys.readouterr().err


def test_print_config(config_file: Path, capsys) -> None:
    assert train_cli.main([str(config_file), "optim.lr=3e-4", "seed=7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(config_file, ["optim.lr=3e-4", "seed=7"]).to_dict()
    assert printed == expected
    assert printed["optim"]["lr"] == pytest.approx(3e-4) and printed["seed"] == 7
    assert printed["ema"]["decay"] == 0.99 and "warmup_steps" in printed["optim"]  # defaults shown too
    assert not (config_file.parent / "run").exists()


def test_non_finite_loss_exits_3(config_file: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    micro_loss = LDMTrainer.micro_loss

    def poisoned(self, batch, draw, rows):
        loss, extras = micro_loss(self, batch, draw, rows)
        return (loss * float("inf") if self.step == 1 else loss), extras

    monkeypatch.setattr(LDMTrainer, "micro_loss", poisoned)
    code = train_cli.main([str(config_file), "optim.max_steps=3", "logging.checkpoint_every=1"])
    err = capsys.readouterr().err
    assert code == 3
    assert "error: the loss is inf at step 2:" in err and "step_0000001.safetensors" in err
    assert "optim.lr" in err


# ------------------------------------------------------------------------------ round trip


def test_train_then_sample(trained: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "grids" / "grid.png"
    args = [
        str(trained),
        "-p",
        PROMPT,
        "-p",
        PROMPT_2,
        "-n",
        "2",
        "--steps",
        "3",
        "--seed",
        "10",
        "--sampler",
        "dpmpp_2m",
        "--guidance-scale",
        "3",
        "--guidance-rescale",
        "0.5",
        "-o",
        str(out),
    ]
    assert sample_cli.main(args) == 0
    assert f"wrote {out} (4 images)" in capsys.readouterr().out
    with Image.open(out) as grid:
        grid = grid.convert("RGB")
    tile = 16 * 4  # 16 px images, upscaled 4x
    assert grid.width == 2 * tile and grid.height > 2 * tile and grid.height % 2 == 0  # 2 x 2, with captions

    # each tile is the model's image for its prompt and seed (row = prompt, column = seed)
    model = LatentDiffusion.load(trained)
    images = model.generate(
        [PROMPT, PROMPT, PROMPT_2, PROMPT_2],
        seeds=[10, 11, 12, 13],
        num_inference_steps=3,
        sampler="dpmpp_2m",
        guidance_scale=3.0,
        guidance_rescale=0.5,
    )
    row_height = grid.height // 2
    for i, image in enumerate(images):
        expected = (to_image(image) * 255).round().astype(np.uint8).repeat(4, axis=0).repeat(4, axis=1)
        x, y = (i % 2) * tile, (i // 2) * row_height
        np.testing.assert_array_equal(np.asarray(grid)[y : y + tile, x : x + tile], expected)


def test_sample_cli_names_every_sampler() -> None:
    from ldm_lib.samplers import SAMPLERS

    assert sample_cli.SAMPLER_NAMES == tuple(SAMPLERS)


def test_sample_errors(trained: Path, tmp_path: Path, capsys) -> None:
    assert sample_cli.main([str(tmp_path / "missing.safetensors"), "-p", PROMPT]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        sample_cli.main([str(trained), "-p", PROMPT, "--steps", "0"])
    assert info.value.code == 2
    assert "--steps=0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_cli.main([str(trained), "-p", PROMPT, "--sampler", "plms"])
    assert "invalid choice: 'plms'" in capsys.readouterr().err
    assert sample_cli.main([str(trained), "-p", PROMPT, "--sampler", "heun", "--eta", "1"]) == 2
    assert "eta applies only to" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("sampler", "eta"),
    [("ddim", 0.0), ("ddim", 1.0), ("ddpm", None), ("euler", None), ("euler_ancestral", None),
     ("heun", None), ("dpmpp_2m", None)],
)  # fmt: skip
def test_generate_is_fixed_by_seed_not_batch(trained: Path, sampler: str, eta: float | None) -> None:
    model = LatentDiffusion.load(trained)
    assert model.config["optim"]["max_steps"] == 3 and model.prediction_type == "epsilon"
    kwargs = {"num_inference_steps": 3, "sampler": sampler, "eta": eta, "guidance_scale": 3.0}
    batch = model.generate([PROMPT, PROMPT_2, PROMPT], seeds=[1, 2, 3], **kwargs)
    again = model.generate([PROMPT, PROMPT_2, PROMPT], seeds=[1, 2, 3], **kwargs)
    assert batch.shape == (3, 3, 16, 16) and batch.min() >= -1 and batch.max() <= 1
    torch.testing.assert_close(batch, again, rtol=0, atol=0)
    alone = model.generate([PROMPT_2], seeds=[2], **kwargs)
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-5)
    reordered = model.generate([PROMPT, PROMPT], seeds=[3, 1], **kwargs)
    torch.testing.assert_close(reordered[0], batch[2], rtol=0, atol=1e-5)
    torch.testing.assert_close(reordered[1], batch[0], rtol=0, atol=1e-5)
    assert (batch[0] - batch[2]).abs().max() > 1e-3  # another seed, another image


def test_guided_model_is_cfg_of_two_separate_passes(trained: Path) -> None:
    """One batch of 2B gives what the unconditional and conditional passes give one by one."""
    from ldm_lib.guidance import classifier_free_guidance, rescale_guidance

    model = LatentDiffusion.load(trained)
    x_t = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 900])
    cond = model.encode_prompts([PROMPT, PROMPT_2])
    uncond = model.encode_prompts(["", ""])
    with torch.no_grad():
        out_c, out_u = model.unet(x_t, t, cond), model.unet(x_t, t, uncond)
        guided = classifier_free_guidance(out_u, out_c, 5.0)
        torch.testing.assert_close(model.guided_model([PROMPT, PROMPT_2], 5.0)(x_t, t), guided)
        rescaled = model.guided_model([PROMPT, PROMPT_2], 5.0, 0.7)(x_t, t)
        torch.testing.assert_close(rescaled, rescale_guidance(guided, out_c, 0.7))
        torch.testing.assert_close(model.guided_model([PROMPT, PROMPT_2], 1.0)(x_t, t), out_c)


def test_generate_reports_steps_and_refuses_bad_options(trained: Path) -> None:
    model = LatentDiffusion.load(trained)
    seen = []
    latents = model.generate(
        [PROMPT], sampler="heun", num_inference_steps=3, callback=lambda i, t, x0: seen.append((i, t)),
        return_latents=True,
    )  # fmt: skip
    assert latents.shape == (1, 4, 4, 4) and [i for i, _ in seen] == [0, 1, 2]
    for bad, message in [
        ({"sampler": "plms"}, "sampler"),
        ({"sampler": "euler", "eta": 0.5}, "eta applies only to"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"spacing": "random"}, "spacing"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_rescale": 1.5}, "guidance_rescale"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.generate([PROMPT], **bad)


def test_load_uses_ema_weights(trained: Path) -> None:
    from ldm_lib.training.checkpoint import read_checkpoint

    tensors, _ = read_checkpoint(trained)
    ema = LatentDiffusion.load(trained).unet.state_dict()
    raw = LatentDiffusion.load(trained, use_ema=False).unet.state_dict()
    name = "conv_out.weight"
    torch.testing.assert_close(ema[name], tensors[f"ema.unet.{name}"], rtol=0, atol=0)
    torch.testing.assert_close(raw[name], tensors[f"model.unet.{name}"], rtol=0, atol=0)
    assert not torch.equal(ema[name], raw[name])
    # a training checkpoint loads too, with the same EMA weights at the same step
    checkpoint = sorted((trained.parent / "checkpoints").glob("step_*.safetensors"))[-1]
    torch.testing.assert_close(LatentDiffusion.load(checkpoint).unet.state_dict()[name], ema[name])
