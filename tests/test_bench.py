"""bench/train_speed.py at a tiny size on the CPU, so the GPU benchmark cannot rot unnoticed: it runs,
its FLOP count is the counter's, its MFU is the formula, the two libraries agree, the peak table
matches device names as intended, and its errors say what to do. No wall-clock number is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


train_speed = _load("train_speed")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_cpu_run_writes_a_consistent_result(tmp_path, capsys):
    pytest.importorskip("diffusers")
    path = tmp_path / "result.json"
    args = ["--device", "cpu", "--tiny", "--threads", "1", "--steps", "2", "--json", str(path)]
    result = train_speed.main([*args, "--peak-tflops", "0.5"])
    out = capsys.readouterr().out
    assert "images/s" in out and "MFU" in out and str(path) in out
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))

    s = result["settings"]
    assert (s["preset"], s["batch"], s["resolution"], s["dtype"], s["attention"]) == (
        "course_tiny",
        4,
        8,
        "fp32",
        "sdpa",
    )
    assert result["versions"]["torch"] == torch.__version__ and result["versions"]["diffusers"]
    assert result["parity_max_rel_diff"] <= train_speed.PARITY_TOLERANCE["fp32"]

    flops = result["flops_per_image"]
    assert flops["diffusers_forward"] == flops["forward"] > 0
    # forward + backward: about 3x the forward (2x for the weight and activation gradients; the input
    # needs no gradient, so a little less)
    assert 2.5 * flops["forward"] < flops["forward_backward"] <= 3 * flops["forward"]

    ours = result["libraries"]["ldm_lib"]
    for name in ("ldm_lib", "diffusers"):
        r = result["libraries"][name]
        assert r["parameters"] == ours["parameters"] == 1_122_628
        assert r["images_per_s"] == pytest.approx(s["batch"] / r["step_s_median"])
        assert r["achieved_tflops"] == pytest.approx(flops["forward_backward"] * r["images_per_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 0.5)
        q1, median, q3 = r["step_s_quartiles"]
        assert q1 <= median <= q3 and median == r["step_s_median"]
        assert r["peak_memory_gb"] is None  # a CUDA statistic
    assert result["ratio_ours_over_diffusers"] == pytest.approx(
        ours["images_per_s"] / result["libraries"]["diffusers"]["images_per_s"]
    )
    assert result["peak_source"] == "--peak-tflops"


def test_flops_are_the_counters_and_checkpointing_adds_a_forward():
    from torch.utils.flop_counter import FlopCounterMode

    from ldm_lib.models.presets import unet_config
    from ldm_lib.models.unet import UNet

    cfg = unet_config("course_tiny", zero_init=False, attention_backend="math")
    flops = train_speed.count_flops(cfg, 8, 77, ["ldm_lib"], recompute=True)
    model = UNet(cfg)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, cfg.context_dim)
    with FlopCounterMode(display=False) as counter:  # on real tensors, not the meta device
        model(x, t, c)
    assert flops["forward"] == counter.get_total_flops()
    # Gradient checkpointing recomputes the forwards of the ResNet and transformer blocks, most of the
    # forward but not all of it (not conv_in, conv_out, the time MLP, down/upsampling, projections).
    extra = flops["forward_backward_recompute"] - flops["forward_backward"]
    assert 0.6 * flops["forward"] < extra < flops["forward"]


def test_gradient_checkpointing_math_attention_and_ours_alone(tmp_path):
    path = tmp_path / "r.json"
    argv = ["--device", "cpu", "--tiny", "--threads", "1", "--steps", "1", "--warmup", "0"]
    argv += ["--libraries", "ldm_lib", "--gradient-checkpointing", "--attention", "math", "--channels-last"]
    result = train_speed.main([*argv, "--json", str(path)])
    assert list(result["libraries"]) == ["ldm_lib"] and result["ratio_ours_over_diffusers"] is None
    r = result["libraries"]["ldm_lib"]
    assert r["mfu"] is None and r["hfu"] is None  # no peak for a CPU unless given
    assert "--peak-tflops" in result["peak_source"]
    assert result["settings"]["gradient_checkpointing"] and result["settings"]["channels_last"]


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.5),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.5),
        ("NVIDIA GH200 480GB", 989.5),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("NVIDIA L40", None),  # not in the table: no guess
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_peak_table(name, peak):
    value, source = train_speed.peak_tflops(name)
    assert value == peak
    assert ("--peak-tflops" in source) == (peak is None)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--batch", "0"], ["--batch=0", "at least 1"]),
        (["--libraries", "ldm_lib,keras"], ["--libraries", "ldm_lib, diffusers"]),
        (["--attention", "flash"], ["invalid choice"]),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(argv, words, capsys):
    with pytest.raises(SystemExit):
        train_speed.parse_args(argv)
    err = capsys.readouterr().err
    for word in words:
        assert word in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(SystemExit, match="no CUDA device"):
        train_speed.main(["--device", "cuda", "--tiny"])


def test_xformers_on_cpu_is_refused_before_any_work():
    with pytest.raises(SystemExit, match="xformers"):
        train_speed.main(["--device", "cpu", "--tiny", "--attention", "xformers", "--libraries", "ldm_lib"])


def test_tiny_defaults_and_real_defaults():
    tiny = train_speed.parse_args(["--tiny"])
    real = train_speed.parse_args([])
    assert (tiny.preset, tiny.batch, tiny.resolution) == ("course_tiny", 4, 8)
    assert (real.preset, real.batch, real.resolution, real.context_len) == ("sd15", 8, 64, 77)
    assert real.libraries == ["ldm_lib", "diffusers"] and real.attention == "sdpa"
    assert math.isclose(train_speed.peak_tflops("NVIDIA H100 PCIe")[0] * 2, 1512.0)
