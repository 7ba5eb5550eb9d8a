"""Tests of the training configuration (ldm_lib.training.config): every bad value is a ConfigError
naming the key, the value and what is allowed; overrides; ``base:`` inheritance; the shipped configs.
No network is built here: these run in about a second."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ldm_lib.training import ConfigError, TrainConfig, config_from_dict, load_config
from ldm_lib.training.config import apply_overrides, read_yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def build(*overrides: str, base: dict | None = None) -> TrainConfig:
    """Defaults (or ``base``) with overrides; paths are not checked (models/ may not exist yet)."""
    return config_from_dict(apply_overrides(base or {}, list(overrides)), check_paths=False)


def error_of(*overrides: str, base: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build(*overrides, base=base)
    return str(info.value)


# ------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # unknown keys: the key, where, and the allowed names
        (["bogus=1"], ["'bogus'", "top level", "allowed:", "'optim'", "'diffusion'"]),
        (["optim.lr_rate=1"], ["'lr_rate'", "section 'optim'", "allowed:", "'lr'", "'warmup_steps'"]),
        (["diffusion.prediction=v"], ["'prediction'", "'diffusion'", "'prediction_type'"]),
        (["data.resolutoin=16"], ["'resolutoin'", "'data'", "'resolution'"]),
        (["logging.log_evry=5"], ["'log_evry'", "'logging'", "'log_every'"]),
        # wrong types: the key, the value, the type expected
        (["optim.batch_size=eight"], ["optim.batch_size='eight'", "integer"]),
        (["optim.batch_size=8.5"], ["optim.batch_size=8.5", "integer"]),
        (["optim.max_steps=true"], ["optim.max_steps=True", "integer"]),
        (["ema.enabled=yes please"], ["ema.enabled='yes please'", "true or false"]),
        (["optim.betas=[0.9]"], ["optim.betas=[0.9]", "2 items"]),
        (["optim.lr=fast"], ["optim.lr='fast'", "number"]),
        (["data=[1, 2]"], ["data=[1, 2]", "mapping"]),
        (["logging.validation_prompts=a prompt"], ["logging.validation_prompts='a prompt'", "list"]),
        (["diffusion.min_snr_gamma=big"], ["diffusion.min_snr_gamma='big'", "a number or null"]),
        # bad choices and ranges: the key, the value, what is allowed
        (["stage=gan"], ["stage='gan'", "'vae'", "'ldm'"]),
        (["device=tpu"], ["device='tpu'", "'cpu'", "'cuda:N'"]),
        (["mixed_precision=fp8"], ["mixed_precision='fp8'", "'bf16'", "'fp16'"]),
        (["diffusion.prediction_type=x0"], ["diffusion.prediction_type='x0'", "'epsilon'", "'v_prediction'"]),
        (["diffusion.schedule=quadratic"], ["diffusion.schedule='quadratic'", "'scaled_linear'", "'cosine'"]),
        (["diffusion.noise_offset=-0.1"], ["diffusion.noise_offset=-0.1", "[0.0, 1.0]"]),
        (["diffusion.caption_dropout=1.5"], ["diffusion.caption_dropout=1.5", "[0.0, 1.0]"]),
        (["diffusion.min_snr_gamma=0"], ["diffusion.min_snr_gamma=0", "(0.0, inf]"]),
        (["diffusion.num_train_timesteps=1"], ["diffusion.num_train_timesteps=1", "[2, inf]"]),
        (["diffusion.beta_end=1.0"], ["diffusion.beta_end=1.0", "(0.0, 1.0)"]),
        (["optim.lr=0"], ["optim.lr=0", "(0.0, inf]"]),
        (["optim.batch_size=0"], ["optim.batch_size=0", "[1, inf]"]),
        (["optim.grad_accum_steps=0"], ["optim.grad_accum_steps=0", "[1, inf]"]),
        (["optim.betas=[0.9, 1.0]"], ["optim.betas[1]=1.0", "[0.0, 1.0)"]),
        (["optim.max_grad_norm=0"], ["optim.max_grad_norm=0", "(0.0, inf]"]),
        (["optim.lr_schedule=step"], ["optim.lr_schedule='step'", "'constant'", "'cosine'"]),
        (["optim.min_lr_ratio=2"], ["optim.min_lr_ratio=2", "[0.0, 1.0]"]),
        (["ema.decay=1.0"], ["ema.decay=1.0", "[0.0, 1.0)"]),
        (["ema.update_every=0"], ["ema.update_every=0", "[1, inf]"]),
        (["logging.keep_checkpoints=0"], ["logging.keep_checkpoints=0", "[1, inf]"]),
        (["logging.validate_every=-1"], ["logging.validate_every=-1", "[0, inf]"]),
        (["logging.validation_spacing=uniform"], ["logging.validation_spacing='uniform'", "'trailing'"]),
        (["logging.validation_guidance_rescale=2"], ["logging.validation_guidance_rescale=2", "[0.0, 1.0]"]),
        (["model.attention_backend=flash"], ["model.attention_backend='flash'", "'math'", "'sdpa'"]),
        (["model.text_encoder_layer=first"], ["model.text_encoder_layer='first'", "'penultimate'"]),
        (["model.vae_dtype=int8"], ["model.vae_dtype='int8'", "'bfloat16'"]),
        (["model.unet=huge"], ["model.unet='huge'", "'course_tiny'", "'sd15'"]),
        (["model.unet_overrides={foo: 1}"], ["model.unet_overrides", "'foo'", "'context_dim'"]),
        (["data.resolution=4"], ["data.resolution=4", "[8, inf]"]),
        (["data.source=s3"], ["data.source='s3'", "'shapes'", "'imagefolder'"]),
        (["data.crop=random", "data.cache_latents=true"], ["data.crop='random'", "cache"]),
        (["vae_loss.reconstruction=l3"], ["vae_loss.reconstruction='l3'", "'l1'", "'l2'"]),
        (["stage=vae", "vae.preset=huge"], ["vae.preset='huge'", "'course'"]),
        (["stage=vae", "data.cache_latents=true"], ["data.cache_latents=true", "'ldm'"]),
        (["seed=-1"], ["seed=-1", "[0, inf]"]),
        (["num_workers=-2"], ["num_workers=-2", "[0, inf]"]),
        (["output_dir="], ["output_dir=''"]),
        # values that were accepted but failed late (after building, or after training at validation)
        (["stage=vae", "vae.overrides={foo: 1}"], ["vae.overrides", "'foo'", "'base_channels'"]),
        (["logging.validation_prompts=[]"], ["logging.validation_prompts=[]", "at least one"]),
        (["logging.validation_seeds=[]"], ["logging.validation_seeds=[]", "at least one"]),
        (["model.compile=true", "model.compile_backend=bogus"], ["model.compile_backend='bogus'", "'eager'"]),
    ],
)
def test_bad_value_names_key_value_and_allowed(overrides: list[str], expected: list[str]) -> None:
    message = error_of(*overrides)
    for part in expected:
        assert part in message, f"{part!r} missing from: {message}"


def test_epsilon_with_zero_terminal_snr_is_refused_with_the_reason() -> None:
    message = error_of("diffusion.prediction_type=epsilon", "diffusion.zero_terminal_snr=true")
    assert "diffusion.prediction_type='epsilon'" in message and "zero_terminal_snr" in message
    assert "SNR is 0" in message and "v_prediction" in message and "2305.08891" in message
    # v-prediction and x0-prediction are fine with it
    assert build(
        "diffusion.prediction_type=v_prediction", "diffusion.zero_terminal_snr=true"
    ).diffusion.zero_terminal_snr
    build("diffusion.prediction_type=sample", "diffusion.zero_terminal_snr=true")


def test_zero_terminal_snr_with_leading_validation_spacing_is_refused() -> None:
    ztsnr = ("diffusion.prediction_type=v_prediction", "diffusion.zero_terminal_snr=true")
    message = error_of(*ztsnr, "logging.validation_spacing=leading")
    assert "logging.validation_spacing='leading'" in message and "'trailing'" in message
    for spacing in ("trailing", "linspace"):
        build(*ztsnr, f"logging.validation_spacing={spacing}")
    build("logging.validation_spacing=leading")  # without zero terminal SNR, leading is allowed


def test_fp16_on_cpu_is_refused_and_bf16_allowed() -> None:
    message = error_of("device=cpu", "mixed_precision=fp16")
    assert "mixed_precision='fp16'" in message and "CUDA" in message and "'bf16'" in message
    assert build("device=cpu", "mixed_precision=bf16").mixed_precision == "bf16"


def test_compile_backend_is_checked_only_when_compiling() -> None:
    assert (
        build("model.compile_backend=bogus").model.compile_backend == "bogus"
    )  # unused: no import of dynamo
    assert build("model.compile=true", "model.compile_backend=aot_eager").model.compile


def test_paths_are_checked_when_asked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.vae='.*nowhere'.*config\.json"):
        config_from_dict({"model": {"vae": str(tmp_path / "nowhere")}})
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"model\.text_encoder='.*missing'.*'tiny'"):
        config_from_dict({"model": {"vae": str(tmp_path / "vae"), "text_encoder": str(tmp_path / "missing")}})
    with pytest.raises(ConfigError, match=r"model\.tokenizer='.*tok'"):
        config_from_dict(
            {
                "model": {
                    "vae": str(tmp_path / "vae"),
                    "text_encoder": "tiny",
                    "tokenizer": str(tmp_path / "tok"),
                }
            }
        )
    config = config_from_dict({"model": {"vae": str(tmp_path / "vae"), "text_encoder": "tiny"}})
    assert config.model.text_encoder == "tiny"


# -------------------------------------------------------------------------------- overrides


def test_overrides_are_parsed_as_yaml() -> None:
    c = build(
        "optim.lr=3e-4",  # written without a dot (YAML 1.1 reads it as a string), as the CLI help shows
        "optim.text_encoder_lr=1.5e-5",
        "optim.max_grad_norm=null",
        "ema.enabled=false",
        "logging.validation_seeds=[3, 4]",
        "model.unet_overrides.context_dim=64",
        "diffusion.min_snr_gamma=5",
        "output_dir=runs/a=b",  # only the first '=' splits
    )
    assert c.optim.lr == pytest.approx(3e-4) and isinstance(c.optim.lr, float)
    assert c.optim.text_encoder_lr == pytest.approx(1.5e-5)
    assert c.optim.max_grad_norm is None
    assert c.ema.enabled is False
    assert c.logging.validation_seeds == [3, 4]
    assert c.model.unet_overrides == {"context_dim": 64}
    assert c.diffusion.min_snr_gamma == 5.0 and isinstance(c.diffusion.min_snr_gamma, float)
    assert c.output_dir == "runs/a=b"
    assert error_of("optim.lr=1e-4x").startswith("optim.lr='1e-4x' must be a number")


def test_yaml_file_numbers_without_a_dot(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  weight_decay: 1e-2\n")
    config = config_from_dict(read_yaml(path), check_paths=False)
    assert (config.optim.lr, config.optim.weight_decay) == (pytest.approx(3e-4), pytest.approx(1e-2))


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("optim.lr", "override 'optim.lr' must look like key=value"),
        ("optim..lr=1", "empty key part in 'optim..lr'"),
        ("=3", "empty key part"),
        ("optim.lr.scale=2", "'lr' is not a section"),
    ],
)
def test_bad_override_syntax(item: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        apply_overrides({"optim": {"lr": 1e-3}}, [item])


def test_overrides_do_not_change_the_mapping_given() -> None:
    mapping = {"optim": {"lr": 1e-3}}
    out = apply_overrides(mapping, ["optim.lr=0.5", "seed=3"])
    assert mapping == {"optim": {"lr": 1e-3}} and out == {"optim": {"lr": 0.5}, "seed": 3}


def test_yaml_round_trip() -> None:
    c = build(
        "optim.betas=[0.8, 0.95]", "model.unet_overrides={context_dim: 64}", "diffusion.min_snr_gamma=5.0"
    )
    again = config_from_dict(yaml.safe_load(c.to_yaml()), check_paths=False)
    assert again == c and again.optim.betas == (0.8, 0.95)


# ------------------------------------------------------------------------------- inheritance


def test_base_inheritance_merges_sections(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "seed: 3\noptim:\n  lr: 0.002\n  batch_size: 16\n"
        "model:\n  unet_overrides:\n    context_dim: 64\n    num_heads: 2\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text(
        "base: ../base.yaml\noptim:\n  lr: 0.0005\nmodel:\n  unet_overrides:\n    context_dim: 32\n"
    )
    config = load_config_unchecked(tmp_path / "sub" / "child.yaml", ["optim.batch_size=4"])
    assert config.seed == 3  # from the base
    assert config.optim.lr == 0.0005  # the child wins
    assert config.optim.batch_size == 4  # the override wins over both
    # unet_overrides is a value, not a section: the child's dict replaces the base's
    assert config.model.unet_overrides == {"context_dim": 32}


def load_config_unchecked(path: Path, overrides: list[str]) -> TrainConfig:
    return config_from_dict(apply_overrides(read_yaml(path), overrides), check_paths=False)


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match="include each other"):
        read_yaml(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        read_yaml(tmp_path / "self.yaml")


def test_base_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*does not exist"):
        read_yaml(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: 3\n")
    with pytest.raises(ConfigError, match="base=3 must be the path"):
        read_yaml(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        read_yaml(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


# ------------------------------------------------------------------------------ shipped files


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path: Path) -> None:
    course = path.name.startswith("shapes_")  # the GPU configs name weights that are not here
    config = config_from_dict(
        read_yaml(path), check_paths=course and (REPO / "models" / "course_vae").is_dir()
    )
    assert config.output_dir == f"runs/{path.stem}"
    if course:  # the course configs run on a laptop CPU
        assert config.device == "cpu" and config.mixed_precision == "no"


def test_shipped_variants_change_one_thing() -> None:
    """Each shapes_ldm_* variant differs from shapes_ldm_eps only where its name says."""
    assert len(CONFIGS) >= 6
    base = config_from_dict(read_yaml(REPO / "configs" / "shapes_ldm_eps.yaml"), check_paths=False).to_dict()
    expected = {
        "shapes_ldm_eps_minsnr": {"diffusion.min_snr_gamma": 5.0},
        "shapes_ldm_eps_offset": {"diffusion.noise_offset": 0.1},
        "shapes_ldm_v": {"diffusion.prediction_type": "v_prediction"},
        "shapes_ldm_v_ztsnr": {
            "diffusion.prediction_type": "v_prediction",
            "diffusion.zero_terminal_snr": True,
            "logging.validation_guidance_rescale": 0.7,
        },
    }
    for name, changes in expected.items():
        variant = config_from_dict(read_yaml(REPO / "configs" / f"{name}.yaml"), check_paths=False).to_dict()
        diff = {
            f"{s}.{k}": variant[s][k]
            for s in base
            if isinstance(base[s], dict)
            for k in base[s]
            if base[s][k] != variant[s][k]
        }
        assert diff == changes, name
        assert variant["output_dir"] == f"runs/{name}"


def test_combinations_that_run_but_warn(tmp_path) -> None:
    import warnings as _warnings

    base = {"stage": "ldm", "output_dir": str(tmp_path)}
    ztsnr = {"prediction_type": "v_prediction", "zero_terminal_snr": True, "min_snr_gamma": 5.0}
    with pytest.warns(UserWarning, match="min_snr_gamma with zero_terminal_snr"):
        config_from_dict({**base, "diffusion": ztsnr}, check_paths=False)
    with pytest.warns(UserWarning, match="caption_dropout=0"):
        config_from_dict({**base, "diffusion": {"caption_dropout": 0.0}}, check_paths=False)
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        config_from_dict(
            {**base, "diffusion": {"caption_dropout": 0.0}, "logging": {"validation_guidance_scale": 1.0}},
            check_paths=False,
        )


def test_fp16_with_a_gan_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="discriminator has no grad scaler"):
        config_from_dict(
            {"stage": "vae", "output_dir": str(tmp_path), "device": "cuda", "mixed_precision": "fp16",
             "vae_loss": {"adversarial_weight": 0.5}},
            check_paths=False,
        )  # fmt: skip


# ----------------------------------------------------------------------- fused GroupNorm + SiLU


def checked(tmp_path: Path, *overrides: str) -> TrainConfig:
    """A config validated with the checks that look at the files and the machine."""
    (tmp_path / "vae").mkdir(exist_ok=True)
    (tmp_path / "vae" / "config.json").write_text("{}")
    base = {"model": {"vae": str(tmp_path / "vae"), "text_encoder": "tiny"}}
    return config_from_dict(apply_overrides(base, list(overrides)))


def test_fused_groupnorm_silu_is_checked_against_the_device(tmp_path: Path, monkeypatch) -> None:
    import ldm_lib.kernels.groupnorm_silu as gns

    on = "model.fused_groupnorm_silu=true"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(gns, "_triton_installed", lambda: True)  # whether or not this machine has it
    with pytest.raises(ConfigError) as info:
        checked(tmp_path, "device=cpu", on)
    message = str(info.value)
    assert "model.fused_groupnorm_silu=true cannot run with device='cpu'" in message
    assert "TRITON_INTERPRET=1" in message and "GPU" in message
    for stage in ("ldm", "vae"):
        with pytest.raises(ConfigError, match="model.fused_groupnorm_silu=true"):
            checked(tmp_path, f"stage={stage}", "device=cpu", on)
    # With the interpreter (as if triton were first imported under it; this test process may have
    # imported it before), a CPU run is accepted; so is CUDA wherever triton is installed.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(gns, "_compiled_for_gpu", lambda: False)
    assert checked(tmp_path, "device=cpu", on).model.fused_groupnorm_silu
    assert checked(tmp_path, "device=cuda:1", on).model.fused_groupnorm_silu
    monkeypatch.setattr(gns, "_triton_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"device='cuda'.*triton is not installed"):
        checked(tmp_path, "device=cuda", on)
    # A config read back from a model file is not checked against this machine; off is never checked.
    assert build("device=cpu", on).model.fused_groupnorm_silu
    assert not checked(tmp_path, "device=cpu").model.fused_groupnorm_silu
    message = error_of("model.unet_overrides={fused_groupnorm_silu: true}")
    assert "set model.fused_groupnorm_silu instead" in message


def test_the_switch_reaches_the_networks_without_changing_their_weights() -> None:
    from ldm_lib.kernels.groupnorm_silu import GroupNormSiLU
    from ldm_lib.training.build import build_unet, build_vae

    def norms(model):
        return [m.fused for m in model.modules() if isinstance(m, GroupNormSiLU)]

    unet_off, unet_on = build_unet(build()), build_unet(build("model.fused_groupnorm_silu=true"))
    assert unet_on.config.fused_groupnorm_silu and all(norms(unet_on)) and not any(norms(unet_off))
    assert list(unet_on.state_dict()) == list(unet_off.state_dict())
    vae_off = build_vae(build("stage=vae"))
    vae_on = build_vae(build("stage=vae", "model.fused_groupnorm_silu=true"))
    assert all(norms(vae_on)) and not any(norms(vae_off)) and norms(vae_on)
    assert list(vae_on.state_dict()) == list(vae_off.state_dict())
    assert load_config(None, ["model.fused_groupnorm_silu=false"]).model.fused_groupnorm_silu is False
