"""Stable Diffusion weight compatibility (ldm_lib.interop), checked against diffusers on tiny random
models: diffusers-format folders both ways, and the original single-file layout with diffusers' own
single-file conversion as the independent reference."""

import dataclasses
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_lib.interop import (
    CheckpointError,
    KeyMismatchError,
    load_single_file,
    load_unet,
    load_unet_single_file,
    load_vae,
    load_vae_single_file,
    save_single_file,
    save_unet,
    save_vae,
    to_single_file_state_dict,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_key_map,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_key_map,
)
from ldm_lib.interop.single_file import UNET_PREFIX, VAE_PREFIX
from ldm_lib.models.presets import unet_config, vae_config
from ldm_lib.models.unet import UNet, UNetConfig, to_diffusers_config
from ldm_lib.models.vae import AutoencoderKL, VAEConfig

# SD1-style: a fixed head count, 1x1-conv projections. SD2-style: a fixed head size, linear projections,
# two transformer blocks, and no attention at the first level (so the original's block numbering shifts).
SD1_TINY = UNetConfig(
    model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=2,
    context_dim=24, norm_num_groups=8, zero_init=False,
)  # fmt: skip
SD2_TINY = dataclasses.replace(
    SD1_TINY, num_heads=None, head_dim=8, use_linear_projection=True, transformer_depth=2, num_res_blocks=2,
    attention_levels=(1,),
)  # fmt: skip
UNETS = pytest.mark.parametrize("cfg", [SD1_TINY, SD2_TINY], ids=["sd1_conv_heads", "sd2_linear_head_dim"])
VAE_TINY = VAEConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=4)
VAE_TINY2 = dataclasses.replace(
    VAE_TINY, channel_mult=(1, 2), num_res_blocks=2, latent_channels=3, scaling_factor=0.5
)
VAES = pytest.mark.parametrize("vcfg", [VAE_TINY, VAE_TINY2], ids=["vae3", "vae2"])
TOL = dict(rtol=1e-5, atol=1e-5)


def diffusers():
    return pytest.importorskip("diffusers", reason="diffusers (the parity reference) is not installed")


def diffusers_unet(cfg: UNetConfig):
    return diffusers().UNet2DConditionModel(**to_diffusers_config(cfg))


def diffusers_vae(cfg: VAEConfig):
    kwargs = {k: v for k, v in vae_config_to_diffusers(cfg).items() if not k.startswith("_")}
    return diffusers().AutoencoderKL(**kwargs)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (norm scales included), so parity is not a fluke of the init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def unet_inputs(cfg: UNetConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]),
            torch.randn(2, 5, cfg.context_dim, generator=g))  # fmt: skip


def unet_outputs(ours: UNet, theirs, cfg: UNetConfig) -> tuple[torch.Tensor, torch.Tensor]:
    x, t, c = unet_inputs(cfg)
    with torch.no_grad():
        a, b = ours(x, t, c), theirs(x, t, c).sample
    assert a.abs().mean() > 0.05  # a real output, not zeros
    return a, b


def assert_vae_parity(ours: AutoencoderKL, theirs, cfg: VAEConfig) -> None:
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        post, ref = ours.encode(x), theirs.encode(x).latent_dist
        torch.testing.assert_close(post.mean, ref.mean, **TOL)
        torch.testing.assert_close(post.logvar, ref.logvar, **TOL)
        z = post.mean
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, **TOL)
    assert ours.config.scaling_factor == theirs.config.scaling_factor


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ===================================================================================== config.json

# The config.json files of the real checkpoints (runwayml/stable-diffusion-v1-5, stabilityai/
# stable-diffusion-2-1), as written by older diffusers versions: not every option is present.
SD15_UNET_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}  # fmt: skip
SD21_UNET_JSON = {
    **SD15_UNET_JSON, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
    "only_cross_attention": False, "resnet_time_scale_shift": "default", "sample_size": 96,
    "upcast_attention": True, "use_linear_projection": True, "class_embed_type": None,
}  # fmt: skip
SD_VAE_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}  # fmt: skip


def test_real_sd_configs_translate_to_the_presets():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every option of the real files is understood
        assert unet_config_from_diffusers(SD15_UNET_JSON) == unet_config("sd15")
        assert unet_config_from_diffusers(SD21_UNET_JSON) == unet_config("sd21")
        assert vae_config_from_diffusers(SD_VAE_JSON) == vae_config("sd")  # scaling_factor: the default


@pytest.mark.parametrize("cfg", [SD1_TINY, SD2_TINY, unet_config("sd15"), unet_config("sd21")])
def test_unet_config_round_trip(cfg):
    as_json = json.loads(json.dumps(unet_config_to_diffusers(cfg)))
    assert unet_config_from_diffusers(as_json, zero_init=False) == dataclasses.replace(cfg, zero_init=False)


@pytest.mark.parametrize(
    "cfg", [VAE_TINY, VAE_TINY2, dataclasses.replace(VAE_TINY, mid_block_attention=False)]
)
def test_vae_config_round_trip(cfg):
    assert vae_config_from_diffusers(json.loads(json.dumps(vae_config_to_diffusers(cfg)))) == cfg


@pytest.mark.parametrize(
    "change, match",
    [
        ({"addition_embed_type": "text_time"}, "addition_embed_type='text_time'"),
        ({"_class_name": "UNet2DModel"}, "_class_name='UNet2DModel'"),
        ({"up_block_types": ["UpBlock2D"] * 4}, "up_block_types"),
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "SimpleCrossAttnDownBlock2D"),
        ({"attention_head_dim": [5, 7, 20, 20]}, r"attention_head_dim=\[5, 7, 20, 20\]"),
    ],
)
def test_unet_configs_we_cannot_represent_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        unet_config_from_diffusers({**SD21_UNET_JSON, **change})


@pytest.mark.parametrize(
    "change, match",
    [
        ({"latents_mean": [0.1] * 4, "latents_std": [1.0] * 4}, r"latents_mean=\[0.1"),
        ({"act_fn": "gelu"}, "act_fn='gelu'"),
        ({"use_quant_conv": False}, "use_quant_conv=False"),
        ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types"),
        ({"block_out_channels": [128, 192, 512, 512]}, "block_out_channels"),
        ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
    ],
)
def test_vae_configs_we_cannot_represent_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        vae_config_from_diffusers({**SD_VAE_JSON, **change})


def test_unknown_options_warn_and_unrepresentable_exports_raise():
    with pytest.warns(UserWarning, match="brand_new_option=3"):
        unet_config_from_diffusers({**SD15_UNET_JSON, "brand_new_option": 3})
    with pytest.raises(ValueError, match="norm_eps=1e-05"):
        vae_config_to_diffusers(dataclasses.replace(VAE_TINY, norm_eps=1e-5))


# ========================================================================= diffusers-format folders


@UNETS
def test_unet_from_diffusers_save_pretrained(cfg, tmp_path):
    theirs = randomize_(diffusers_unet(cfg))
    theirs.save_pretrained(tmp_path / "unet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every option diffusers writes is understood
        ours = load_unet(tmp_path)  # pipeline root: looks in root/unet
    assert ours.config == dataclasses.replace(cfg, zero_init=True)  # zero_init: unused when loading
    assert_same_weights(ours, theirs)
    torch.testing.assert_close(*unet_outputs(ours, theirs, cfg), **TOL)


@UNETS
def test_unet_save_loads_in_diffusers_from_pretrained(cfg, tmp_path):
    ours = randomize_(UNet(cfg))
    save_unet(ours, tmp_path / "unet")
    theirs = diffusers().UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert_same_weights(ours, theirs)
    torch.testing.assert_close(*unet_outputs(ours, theirs, cfg), **TOL)
    again = load_unet(tmp_path / "unet")  # and back: the model folder itself works too
    assert_same_weights(again, ours)


@VAES
def test_vae_both_ways_through_diffusers_folders(vcfg, tmp_path):
    theirs = randomize_(diffusers_vae(vcfg))
    theirs.save_pretrained(tmp_path / "vae")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = load_vae(tmp_path)
    assert ours.config == vcfg
    assert_vae_parity(ours, theirs, vcfg)

    mine = randomize_(AutoencoderKL(vcfg), seed=3)
    save_vae(mine, tmp_path / "mine")
    back = diffusers().AutoencoderKL.from_pretrained(tmp_path / "mine").eval()
    assert_same_weights(mine, back)
    assert_vae_parity(mine, back, vcfg)


def test_bin_sharded_variant_and_dtype(tmp_path):
    theirs = randomize_(diffusers_unet(SD1_TINY))
    theirs.save_pretrained(tmp_path / "bin", safe_serialization=False)  # legacy pickle, weights_only read
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    theirs.save_pretrained(tmp_path / "variant", variant="fp16")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    for folder, kwargs in (("bin", {}), ("sharded", {}), ("variant", {"variant": "fp16"})):
        assert_same_weights(load_unet(tmp_path / folder, **kwargs), theirs)
    half = load_unet(tmp_path / "bin", dtype=torch.float16, attention_backend="math")
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert half.config.attention_backend == "math"
    assert all(p.requires_grad for p in half.parameters())  # loaded weights stay trainable


def test_folder_mismatches_list_missing_unexpected_and_shapes(tmp_path):
    save_unet(randomize_(UNet(SD1_TINY)), tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    good = load_file(weights)

    bad = dict(good)
    del bad["down_blocks.0.resnets.0.conv1.weight"]
    bad["extra.weight"] = torch.zeros(1)
    save_file(bad, weights)
    with pytest.raises(KeyMismatchError, match="1 missing, 1 unexpected, 0 with the wrong shape") as err:
        load_unet(tmp_path)
    assert err.value.missing == ["down_blocks.0.resnets.0.conv1.weight"]
    assert err.value.unexpected == ["extra.weight"]
    assert "extra.weight" in str(err.value) and "down_blocks.0.resnets.0.conv1.weight" in str(err.value)

    # The weights of another architecture: many keys, listed up to 10 each, counted in full.
    json.dump(unet_config_to_diffusers(SD2_TINY), open(tmp_path / "config.json", "w"))
    save_file(good, weights)
    with pytest.raises(KeyMismatchError, match="wrong shape") as err:
        load_unet(tmp_path)
    e = err.value
    assert len(e.missing) > 10 and f"missing ({len(e.missing)})" in str(e) and "more" in str(e)
    assert any(k.endswith("proj_in.weight") for k, *_ in e.mismatched)  # conv (C, C, 1, 1) vs linear (C, C)

    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_unet(tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        load_vae(tmp_path / "nowhere")


# ======================================================================= original single-file layout


def random_original_checkpoint(ucfg: UNetConfig, vcfg: VAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """An original-layout SD checkpoint with random weights: the keys our rule-based map gives, the
    shapes of our parameters (the VAE attention's as 1x1 convs, as SD stores them), plus the entries
    real checkpoints carry besides the UNet and the VAE."""
    g = torch.Generator().manual_seed(seed)

    def draw(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) > 1:  # weights ~ 1/sqrt(fan_in), so activations stay O(1) through the net
            return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        return torch.randn(shape, generator=g) * 0.1 + (1.0 if key.endswith("weight") else 0.0)

    with torch.device("meta"):
        unet_shapes = {k: tuple(v.shape) for k, v in UNet(ucfg).state_dict().items()}
        vae_shapes = {k: tuple(v.shape) for k, v in AutoencoderKL(vcfg).state_dict().items()}
    ckpt = {
        UNET_PREFIX + theirs: draw(theirs, unet_shapes[ours]) for ours, theirs in unet_key_map(ucfg).items()
    }
    for ours, theirs in vae_key_map(vcfg).items():
        shape = vae_shapes[ours]
        conv_1x1 = ".attn_1." in theirs and len(shape) == 2
        ckpt[VAE_PREFIX + theirs] = draw(theirs, (*shape, 1, 1) if conv_1x1 else shape)
    ckpt["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(ucfg.context_dim)
    ckpt["alphas_cumprod"] = torch.linspace(0.99, 0.01, 10)
    ckpt["first_stage_model.loss.logvar"] = torch.zeros(())
    ckpt["model_ema.decay"] = torch.tensor(0.9999)
    return ckpt


def diffusers_from_original(ckpt: dict[str, torch.Tensor], ucfg: UNetConfig, vcfg: VAEConfig):
    """The reference: diffusers' own single-file conversion, loaded strictly into diffusers' models."""
    diffusers()
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet, vae = diffusers_unet(ucfg).eval(), diffusers_vae(vcfg).eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint(dict(ckpt), to_diffusers_config(ucfg)), strict=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(ckpt), vae_config_to_diffusers(vcfg)), strict=True)
    return unet, vae


def write(ckpt: dict[str, torch.Tensor], path) -> None:
    if path.suffix == ".safetensors":
        save_file(ckpt, path)
    else:  # a Lightning-style .ckpt: weights under "state_dict", plus plain metadata
        torch.save({"state_dict": ckpt, "global_step": 470000, "epoch": 3}, path)


@pytest.mark.parametrize(
    "ucfg, vcfg, suffix",
    [
        (SD1_TINY, VAE_TINY, ".safetensors"),
        (SD1_TINY, VAE_TINY, ".ckpt"),
        (SD2_TINY, VAE_TINY2, ".safetensors"),
    ],
    ids=["sd1-safetensors", "sd1-ckpt", "sd2-safetensors"],
)
def test_single_file_matches_diffusers_single_file_conversion(ucfg, vcfg, suffix, tmp_path):
    ckpt = random_original_checkpoint(ucfg, vcfg)
    ref_unet, ref_vae = diffusers_from_original(ckpt, ucfg, vcfg)
    path = tmp_path / f"model{suffix}"
    write(ckpt, path)

    unet_sd, vae_sd = load_single_file(path, ucfg, vcfg)
    assert unet_sd.keys() == ref_unet.state_dict().keys() and vae_sd.keys() == ref_vae.state_dict().keys()
    unet, vae = load_unet_single_file(path, ucfg), load_vae_single_file(path, vcfg)
    torch.testing.assert_close(*unet_outputs(unet, ref_unet, ucfg), **TOL)
    assert_vae_parity(vae, ref_vae, vcfg)


@pytest.mark.parametrize("ucfg, vcfg", [(SD1_TINY, VAE_TINY), (SD2_TINY, VAE_TINY2)], ids=["sd1", "sd2"])
def test_single_file_export_converts_with_diffusers_and_round_trips(ucfg, vcfg, tmp_path):
    unet, vae = randomize_(UNet(ucfg)), randomize_(AutoencoderKL(vcfg), seed=1)
    path = save_single_file(tmp_path / "ours.safetensors", unet, vae)
    exported = load_file(path)
    assert exported["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv, as in SD
    ref_unet, ref_vae = diffusers_from_original(exported, ucfg, vcfg)
    torch.testing.assert_close(*unet_outputs(unet, ref_unet, ucfg), **TOL)
    assert_vae_parity(vae, ref_vae, vcfg)
    assert_same_weights(load_unet_single_file(path, ucfg), unet)
    assert_same_weights(load_vae_single_file(save_single_file(tmp_path / "v.ckpt", vae=vae), vcfg), vae)


def test_real_sd_key_layout_at_full_size():
    """On the meta device (no memory): the key maps of the SD presets have the published sizes, name
    keys as real SD checkpoints do, and diffusers' converter turns them into its own full key set."""
    u, v = unet_key_map(unet_config("sd15")), vae_key_map(vae_config("sd"))
    assert len(u) == 686 and len(v) == 248
    for ours, theirs in [
        ("time_embedding.linear_2.weight", "time_embed.2.weight"),
        ("down_blocks.2.downsamplers.0.conv.weight", "input_blocks.9.0.op.weight"),
        ("down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight",
         "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"),
        ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
        ("up_blocks.2.upsamplers.0.conv.weight", "output_blocks.8.2.conv.weight"),
        ("up_blocks.3.resnets.0.conv_shortcut.weight", "output_blocks.9.0.skip_connection.weight"),
        ("mid_block.resnets.1.time_emb_proj.bias", "middle_block.2.emb_layers.1.bias"),
        ("conv_norm_out.weight", "out.0.weight"),
    ]:  # fmt: skip
        assert u[ours] == theirs
    assert v["decoder.up_blocks.0.upsamplers.0.conv.bias"] == "decoder.up.3.upsample.conv.bias"
    assert v["encoder.mid_block.attentions.0.to_out.0.weight"] == "encoder.mid.attn_1.proj_out.weight"
    assert (
        v["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"]
        == "encoder.down.1.block.0.nin_shortcut.weight"
    )

    diffusers()
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    for name in ("sd15", "sd21"):
        cfg = unet_config(name)
        with torch.device("meta"):
            ours, theirs = UNet(cfg).state_dict(), diffusers_unet(cfg).state_dict()
        original = {UNET_PREFIX + t: ours[k] for k, t in unet_key_map(cfg).items()}
        converted = convert_ldm_unet_checkpoint(original, to_diffusers_config(cfg))
        assert {k: t.shape for k, t in converted.items()} == {k: t.shape for k, t in theirs.items()}
        assert sum(t.numel() for t in ours.values()) == {"sd15": 859_520_964, "sd21": 865_910_724}[name]


def test_ema_weights_are_taken_on_request(tmp_path):
    ckpt = random_original_checkpoint(SD1_TINY, VAE_TINY)
    ema = random_original_checkpoint(SD1_TINY, VAE_TINY, seed=5)
    # LDM's EMA names, in diffusers' words: "model_ema." + "".join(key.split(".")[1:]).
    for key in [k for k in ema if k.startswith(UNET_PREFIX)]:
        ckpt["model_ema." + "".join(key.split(".")[1:])] = ema[key]
    ckpt["model_ema.num_updates"] = torch.tensor(100)
    write(ckpt, tmp_path / "full-ema.ckpt")
    plain, _ = load_single_file(tmp_path / "full-ema.ckpt", SD1_TINY)
    averaged, _ = load_single_file(tmp_path / "full-ema.ckpt", SD1_TINY, ema=True)
    key_map = unet_key_map(SD1_TINY)
    for ours, theirs in key_map.items():
        assert torch.equal(plain[ours], ckpt[UNET_PREFIX + theirs])
        assert torch.equal(averaged[ours], ema[UNET_PREFIX + theirs])
    no_ema = {k: v for k, v in ckpt.items() if not k.startswith("model_ema.")}
    write(no_ema, tmp_path / "pruned.safetensors")
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_single_file(tmp_path / "pruned.safetensors", SD1_TINY, ema=True)


def test_vae_only_single_file(tmp_path):
    ckpt = random_original_checkpoint(SD1_TINY, VAE_TINY)
    bare = {k[len(VAE_PREFIX) :]: v for k, v in ckpt.items() if k.startswith(VAE_PREFIX)}
    write(bare, tmp_path / "vae-ft-mse.safetensors")  # "loss.logvar" included: known, skipped
    vae = load_vae_single_file(tmp_path / "vae-ft-mse.safetensors", VAE_TINY)
    _, ref = diffusers_from_original(ckpt, SD1_TINY, VAE_TINY)
    assert_vae_parity(vae, ref, VAE_TINY)
    with pytest.raises(CheckpointError, match="no UNET weights"):
        load_single_file(tmp_path / "vae-ft-mse.safetensors", SD1_TINY)


def test_single_file_mismatches_are_listed_not_skipped(tmp_path):
    ckpt = random_original_checkpoint(SD1_TINY, VAE_TINY)
    path = tmp_path / "m.safetensors"

    bad = dict(ckpt)
    del bad["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"]
    bad["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(2, 2)  # an SD-upscaler/SDXL part
    bad["conditioner.embedders.0.transformer.x"] = torch.zeros(2)  # SDXL's text encoders: not SD 1/2
    write(bad, path)
    with pytest.raises(KeyMismatchError, match="1 missing, 2 unexpected") as err:
        load_single_file(path, SD1_TINY, VAE_TINY)
    assert err.value.missing == ["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"]
    assert set(err.value.unexpected) == {"model.diffusion_model.label_emb.0.0.weight",
                                         "conditioner.embedders.0.transformer.x"}  # fmt: skip
    # A part not asked for is skipped: the broken UNet does not stop the VAE from loading.
    bad.pop("conditioner.embedders.0.transformer.x")
    write(bad, path)
    assert load_single_file(path, None, VAE_TINY)[0] is None
    # Extra prefixes can be declared known.
    write({**ckpt, "conditioner.x": torch.zeros(1)}, path)
    load_single_file(path, SD1_TINY, VAE_TINY, ignore_prefixes=("conditioner.",))

    # An SD2 file read with the SD1 config: a shape and key mismatch, with a hint about the preset.
    write(random_original_checkpoint(SD2_TINY, VAE_TINY), path)
    with pytest.raises(KeyMismatchError, match="Is the config right") as err:
        load_unet_single_file(path, SD1_TINY)
    assert err.value.missing and err.value.unexpected and err.value.mismatched


def test_pickled_objects_are_refused_never_run(tmp_path):
    ran = []

    class Payload:
        def __reduce__(self):
            return (ran.append, ("unpickled!",))

    ckpt = random_original_checkpoint(SD1_TINY, VAE_TINY)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": ckpt, "callbacks": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to load .*evil.ckpt.*arbitrary code"):
        load_single_file(path, SD1_TINY, VAE_TINY)
    assert ran == []
    # The same holds for a diffusers folder's legacy .bin.
    torch.save({"x": Payload()}, tmp_path / "diffusion_pytorch_model.bin")
    json.dump(unet_config_to_diffusers(SD1_TINY), open(tmp_path / "config.json", "w"))
    with pytest.raises(CheckpointError, match="refused"):
        load_unet(tmp_path)
    assert ran == []


def test_single_file_export_contains_only_weights(tmp_path):
    state = to_single_file_state_dict(vae=AutoencoderKL(VAE_TINY))
    assert all(k.startswith(VAE_PREFIX) for k in state)
    with pytest.raises(ValueError, match="suffix '.pt'"):
        save_single_file(tmp_path / "x.pt", vae=AutoencoderKL(VAE_TINY))
    with pytest.raises(ValueError, match="both None"):
        load_single_file(tmp_path / "x.safetensors")
