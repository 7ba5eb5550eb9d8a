"""The committed course models (models/): each loads, was made by its config in configs/, and the
text-to-image models do what the course says they do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ldm_lib.interop.diffusers_format import load_vae
from ldm_lib.pipeline import REPO_ROOT, LatentDiffusion
from ldm_lib.training.checkpoint import read_metadata
from ldm_lib.training.config import config_from_dict, read_yaml

MODELS = REPO_ROOT / "models"
LDM_NAMES = (
    "shapes_ldm_eps",
    "shapes_ldm_v",
    "shapes_ldm_eps_offset",
    "shapes_ldm_eps_minsnr",
    "shapes_ldm_v_ztsnr",
    "shapes_ldm_eps_ip",
)
# Set on the command line by scripts/train_course_models.sh; they change no weight.
COMMAND_LINE = {("logging", "progress")}


def _without_command_line(config: dict) -> dict:
    config = yaml.safe_load(yaml.safe_dump(config))
    for section, key in COMMAND_LINE:
        config[section].pop(key, None)
    return config


@pytest.mark.parametrize("name", LDM_NAMES)
def test_model_matches_its_config(name: str) -> None:
    path = MODELS / f"{name}.safetensors"
    assert path.is_file(), f"{path} is missing; scripts/train_course_models.sh makes it"
    recorded = yaml.safe_load(read_metadata(path)["config"])
    expected = config_from_dict(
        read_yaml(REPO_ROOT / "configs" / f"{name}.yaml"), check_paths=False
    ).to_dict()
    recorded = config_from_dict(recorded, check_paths=False).to_dict()
    assert _without_command_line(recorded) == _without_command_line(expected)
    model = LatentDiffusion.load(path)
    assert model.config["model"]["vae"] == "models/course_vae"
    assert model.resolution == 32 and model.prediction_type == recorded["diffusion"]["prediction_type"]
    with pytest.raises(ValueError, match="only the EMA weights"):  # exported with export_ema
        LatentDiffusion.load(path, use_ema=False)


def test_vae_reconstructs_shapes() -> None:
    from ldm_lib.data.shapes import shapes_tensors

    vae = load_vae(MODELS / "course_vae", subfolder=None)
    recorded = read_yaml(MODELS / "course_vae" / "train_config.yaml")
    assert recorded == read_yaml(REPO_ROOT / "configs" / "shapes_vae.yaml")
    x, _, _ = shapes_tensors(64, seed=123)
    with torch.no_grad():
        latents = vae.encode_latents(x, generator=torch.Generator().manual_seed(0))
        recon = vae.decode_latents(vae.encode_latents(x, sample=False))
    assert 0.8 < latents.std().item() < 1.2  # the stored scale factor gives unit-variance latents
    assert ((recon - x) ** 2).mean().item() < 0.03


def test_text_encoder_is_shared_and_frozen() -> None:
    from ldm_lib.models.text import build_text_encoder

    encoder = build_text_encoder(str(MODELS / "course_text_encoder"))
    assert encoder.config.hidden_size == 64
    for name in LDM_NAMES:
        config = yaml.safe_load(read_metadata(MODELS / f"{name}.safetensors")["config"])
        assert config["model"]["text_encoder"] == "models/course_text_encoder"
        assert config["model"]["train_text_encoder"] is False


def test_eps_model_follows_prompts() -> None:
    """A quick version of models/EVALUATION.md: 48 captions, guidance 4, 20 DDIM steps."""
    from ldm_lib.eval import adherence
    from ldm_lib.eval.generation import all_captions

    torch.manual_seed(0)
    model = LatentDiffusion.load(MODELS / "shapes_ldm_eps.safetensors")
    prompts = all_captions()[::2]
    images = model.generate(prompts, seeds=0, num_inference_steps=20, guidance_scale=4.0)
    report = adherence(images, prompts)
    assert report.all >= 0.7, str(report)
    assert Path(MODELS / "EVALUATION.md").is_file()
