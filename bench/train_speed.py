"""Training speed of a Stable Diffusion 1.5-sized UNet on a GPU: images/s, peak memory and model FLOPs
utilisation (MFU), ldm_lib's UNet and diffusers' UNet2DConditionModel side by side, in the same run.

One training step, as the trainer does it (ldm_lib/training/trainer.py), without data loading, the VAE
or the text encoder (their cost depends on caching, see notebook 15): forward under bf16 autocast with
fp32 master weights, MSE loss in fp32, backward, global gradient-norm clipping at 1.0, AdamW step
(fused). Inputs are fixed random latents (batch x 4 x res x res), timesteps and text tokens
(77 x 768 for SD 1.5), made once on the device.

Both networks come from the same preset (``to_diffusers_config`` translates it) and start from the
same weights (``--init same``: the state dicts share their names); before timing, the script checks
that their outputs agree. Attention is PyTorch's SDPA in both (ours ``attention_backend="sdpa"``,
diffusers ``AttnProcessor2_0``) unless ``--attention`` says otherwise. The libraries run one after the
other, each alone on the device, so that peak memory is each one's own.

Model FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` runs the forward and
backward of one image on the meta device (no memory, no compute), with attention written out as matmuls
so that it is counted too; recomputation by gradient checkpointing is not model FLOPs (Chowdhery et al.
2022, "PaLM", arXiv 2204.02311, App. B: MFU counts the FLOPs the model needs, not those the hardware
does). MFU = FLOPs per image x images/s / the card's peak dense bf16 tensor FLOP/s (table below, or
``--peak-tflops``).

    python bench/train_speed.py                               # SD 1.5, batch 8, 64x64 latents (512 px), bf16
    python bench/train_speed.py --batch 32 --resolution 32    # 256 px, as configs/gpu_sd_256.yaml
    python bench/train_speed.py --compile --channels-last     # the options, one flag each
    python bench/train_speed.py --device cpu --tiny           # a tiny model on the CPU in seconds (the test)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, with ldm_lib installed or not
    sys.path.insert(0, str(REPO))

from ldm_lib import __version__ as ldm_lib_version  # noqa: E402
from ldm_lib.models.attention import resolve_backend  # noqa: E402
from ldm_lib.models.presets import PRESETS, unet_config  # noqa: E402
from ldm_lib.models.unet import UNet, UNetConfig, to_diffusers_config  # noqa: E402

LIBRARIES = ("ldm_lib", "diffusers")

# Peak dense bf16 tensor-core FLOP/s (fp32 accumulate), in TFLOP/s, by device name (a regex on
# torch.cuda.get_device_name; the first match wins). NVIDIA's datasheets quote bf16 "with sparsity";
# dense is half of that. Sources: H100 datasheet (SXM 1,979 / PCIe 1,513 / NVL 1,671 sparse), H200
# datasheet (SXM 1,979 / NVL 1,671 sparse), A100 datasheet (312 dense), L40S datasheet (362 dense),
# L4 datasheet (242 sparse), A10 datasheet (125 dense), NVIDIA Ada architecture whitepaper (GeForce
# RTX 4090: 165.2 with fp32 accumulate; 330 is the fp16-accumulate figure, which bf16 training does
# not use). Anything else: pass --peak-tflops.
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    (r"H100.*PCIe", 756.0, "H100 PCIe datasheet, 1,513 TFLOPS bf16 with sparsity / 2"),
    (r"H100.*NVL", 835.5, "H100 NVL datasheet, 1,671 TFLOPS bf16 with sparsity / 2"),
    (r"H200.*NVL", 835.5, "H200 NVL datasheet, 1,671 TFLOPS bf16 with sparsity / 2"),
    (r"GH200|H100|H200", 989.5, "H100/H200 SXM datasheet, 1,979 TFLOPS bf16 with sparsity / 2"),
    (r"A100", 312.0, "A100 datasheet, 312 TFLOPS bf16 dense"),
    (r"L40S", 362.0, "L40S datasheet, 362 TFLOPS bf16 dense"),
    (r"\bL4\b", 121.0, "L4 datasheet, 242 TFLOPS bf16 with sparsity / 2"),
    (r"\bA10\b", 125.0, "A10 datasheet, 125 TFLOPS bf16 dense"),
    (r"RTX 4090", 165.2, "Ada whitepaper, RTX 4090, 165.2 TFLOPS bf16 with fp32 accumulate"),
)

# Largest accepted max |ours - diffusers| / max |ours| on the same weights and inputs. fp32: both run
# the same kernels (on CPU the outputs agree exactly; cuDNN may choose different TF32 algorithms);
# bf16: rounding of 8-bit mantissas in a different order of operations.
PARITY_TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2}

TINY = {"preset": "course_tiny", "batch": 4, "resolution": 8, "steps": 3, "warmup": 1}


def peak_tflops(device_name: str) -> tuple[float | None, str]:
    """The card's peak dense bf16 TFLOP/s from :data:`PEAK_BF16_TFLOPS`, and where it comes from;
    ``(None, reason)`` for a device not in the table."""
    for pattern, value, source in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return value, source
    return None, f"{device_name!r} is not in the table; pass --peak-tflops for an MFU"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default=None, choices=PRESETS["unet"], help="UNet preset (default sd15)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 8)")
    p.add_argument("--resolution", type=int, default=None, help="latent height = width (default 64: 512 px)")
    p.add_argument("--context-len", type=int, default=77, help="text tokens per image (CLIP: 77)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per library (default 20)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default 5; compile runs here)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument(
        "--attention", default="sdpa", choices=["sdpa", "math", "xformers"], help="attention, both libraries"
    )
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (model, input)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model (default mode, inductor)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--libraries", default=",".join(LIBRARIES), help="comma-separated: ldm_lib,diffusers")
    p.add_argument(
        "--init", default="same", choices=["same", "random"], help="same weights in both, or each its own"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, overrides the table")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--tiny", action="store_true", help="course_tiny, batch 4, 8x8 latents, 3 steps: seconds on a CPU"
    )
    p.add_argument("--json", default=None, help="result file (default runs/bench/train_speed-....json)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    defaults = (
        TINY if args.tiny else {"preset": "sd15", "batch": 8, "resolution": 64, "steps": 20, "warmup": 5}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch", "resolution", "context_len", "steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}={getattr(args, key)} must be at least 1")
    if args.warmup < 0:
        p.error(f"--warmup={args.warmup} must be 0 or more")
    libraries = [name.strip() for name in args.libraries.split(",") if name.strip()]
    unknown = sorted(set(libraries) - set(LIBRARIES))
    if unknown or not libraries:
        p.error(f"--libraries={args.libraries!r}: choose from {', '.join(LIBRARIES)}")
    args.libraries = list(dict.fromkeys(libraries))
    return args


# ------------------------------------------------------------------------------------- the models


def build_model(name: str, cfg: UNetConfig, attention: str) -> torch.nn.Module:
    """Our UNet or diffusers' UNet2DConditionModel of the same config, with the chosen attention
    (built on the current default device)."""
    if name == "ldm_lib":
        return UNet(dataclasses.replace(cfg, attention_backend=attention))
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

    model = UNet2DConditionModel(**to_diffusers_config(cfg))
    processor = {"sdpa": AttnProcessor2_0, "math": AttnProcessor, "xformers": XFormersAttnProcessor}[
        attention
    ]
    model.set_attn_processor(processor())
    return model


def predict(name: str, model: torch.nn.Module, x, t, context) -> torch.Tensor:
    if name == "diffusers":
        return model(x, t, encoder_hidden_states=context, return_dict=False)[0]
    return model(x, t, context)


def count_flops(
    cfg: UNetConfig, resolution: int, context_len: int, libraries: list[str], recompute: bool = False
) -> dict[str, Any]:
    """Model FLOPs of one image, counted on the meta device: forward, forward + backward (weights'
    gradients; the input needs none), and (``recompute``) forward + backward with gradient
    checkpointing's recomputation. Attention is the written-out math (two matmuls) so the counter
    sees it; SDPA does the same arithmetic. With ``"diffusers"`` in ``libraries``, its forward too."""
    from torch.utils.flop_counter import FlopCounterMode

    def run(model, name, backward):
        x = torch.randn(1, cfg.in_channels, resolution, resolution, device="meta")
        t = torch.zeros(1, dtype=torch.long, device="meta")
        c = torch.randn(1, context_len, cfg.context_dim, device="meta")
        with FlopCounterMode(display=False) as counter:
            out = predict(name, model, x, t, c)
            if backward:
                out.backward(torch.ones_like(out))
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    with torch.device("meta"):
        ours = build_model("ldm_lib", cfg, "math")
    flops = {
        "forward": run(ours, "ldm_lib", False),
        "forward_backward": run(ours, "ldm_lib", True),
    }
    if recompute:
        ours.set_gradient_checkpointing(True)
        flops["forward_backward_recompute"] = run(ours.train(), "ldm_lib", True)
    if "diffusers" in libraries:  # the same architecture: the same count, or the comparison is void
        with torch.device("meta"):
            theirs = build_model("diffusers", cfg, "math")
        flops["diffusers_forward"] = run(theirs, "diffusers", False)
    return flops


# ------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_library(
    name: str,
    args: argparse.Namespace,
    cfg: UNetConfig,
    state: dict[str, torch.Tensor] | None,
    inputs: dict[str, torch.Tensor],
    probe: dict[str, torch.Tensor],
    device: torch.device,
    reference: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Build one library's model on the device, compute its output on ``probe`` (and compare it with
    the other library's ``reference``, before any timing), then time training steps."""
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.dtype == "bf16" else nullcontext
    )
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(args.seed + (0 if name == "ldm_lib" else 1))
    with torch.device(device):
        model = build_model(name, cfg, args.attention)
    if state is not None:
        model.load_state_dict(state, strict=True)
    if args.gradient_checkpointing:
        if name == "ldm_lib":
            model.set_gradient_checkpointing(True)
        else:
            model.enable_gradient_checkpointing()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    params = [p for p in model.parameters() if p.requires_grad]

    with torch.no_grad(), autocast():  # the output the other library must reproduce
        output = predict(name, model.eval(), *probe.values()).float().cpu()
    model.train()
    parity = None
    if reference is not None:
        parity = relative_difference(reference, output)
        tolerance = PARITY_TOLERANCE[args.dtype]
        if not (math.isfinite(parity) and parity <= tolerance):
            raise SystemExit(
                f"{name} disagrees with the other library: relative difference {parity:.2e} > {tolerance} "
                "on the same weights and inputs; not the same function, so no timing"
            )

    forward = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=True)  # as the trainer
    x = inputs["x"].to(memory_format=memory_format)
    t, context, target = inputs["t"], inputs["context"], inputs["target"]

    def step() -> None:
        with autocast():
            pred = predict(name, forward, x, t, context)
        loss = F.mse_loss(pred.float(), target)  # the loss in fp32, as the trainer does
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for _ in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    timed = times[args.warmup :]
    step_s = statistics.median(timed)
    result = {
        "parameters": sum(p.numel() for p in params),
        "first_step_s": times[0],  # compile and kernel choice happen here
        "step_s_median": step_s,
        "step_s_quartiles": _quartiles(timed),
        "images_per_s": args.batch / step_s,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    return result | {"_output": output, "_parity": parity}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0]] * 3
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return [q1, q2, q3]


# ------------------------------------------------------------------------------------------ reporting


def versions(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ldm_lib": ldm_lib_version,
        "ldm_lib_commit": _git_commit(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    try:
        import diffusers

        out["diffusers"] = diffusers.__version__
    except ImportError:
        out["diffusers"] = None
    out["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return out


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def default_json_path(args: argparse.Namespace, device_name: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower() or "device"
    name = f"train_speed-{slug}-{args.preset}-b{args.batch}-r{args.resolution}-{args.dtype}.json"
    return REPO / "runs" / "bench" / name


def _si(value: float) -> str:
    """``803.3 G`` for 8.033e11."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.4g} {prefix}"
    return f"{value:.4g} "


def print_report(result: dict[str, Any]) -> None:
    s, v, f = result["settings"], result["versions"], result["flops_per_image"]
    print(f"device  : {v['device_name']} ({s['device']}), torch {v['torch']}, diffusers {v['diffusers']}, "
          f"ldm_lib {v['ldm_lib']} ({v['ldm_lib_commit']})")  # fmt: skip
    print(f"model   : {s['preset']}, batch {s['batch']}, latents 4x{s['resolution']}x{s['resolution']} "
          f"({8 * s['resolution']} px with SD's VAE), context {s['context_len']}x{s['context_dim']}, "
          f"{s['dtype']}, "
          f"attention {s['attention']}, channels_last {s['channels_last']}, compile {s['compile']}, "
          f"checkpointing {s['gradient_checkpointing']}")  # fmt: skip
    print(f"FLOPs   : {_si(f['forward'])}FLOP forward, {_si(f['forward_backward'])}FLOP forward + backward "
          "per image (counted on the meta device)")  # fmt: skip
    peak = result["peak_tflops"]
    print(f"peak    : {peak} TFLOP/s bf16 dense ({result['peak_source']})")
    if result.get("parity_max_rel_diff") is not None:
        print(f"parity  : max |ours - diffusers| / max |ours| = {result['parity_max_rel_diff']:.2e}")
    header = f"{'library':<10} {'step ms':>9} {'images/s':>10} {'TFLOP/s':>9} {'MFU':>7} {'peak GB':>8}"
    print(header)
    for name, r in result["libraries"].items():
        if "error" in r:
            print(f"{name:<10} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        print(f"{name:<10} {1000 * r['step_s_median']:9.1f} {r['images_per_s']:10.2f} "
              f"{r['achieved_tflops']:9.3g} {mfu:>7} {mem:>8}")  # fmt: skip
    for name, r in result["libraries"].items():
        if r.get("hfu") is not None:
            print(f"{name:<10} HFU {100 * r['hfu']:.1f}% (hardware FLOPs: recomputation included)")
    if result.get("ratio_ours_over_diffusers") is not None:
        print(
            f"ratio   : ours / diffusers images/s = {result['ratio_ours_over_diffusers']:.3f} "
            "(>1: ours faster)"
        )


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit(
            "--device cuda: no CUDA device is available here (torch "
            f"{torch.__version__}); run on a GPU machine, or --device cpu --tiny to try the script"
        )
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit(
            "this GPU has no bf16 support: run with --dtype fp32 (and no MFU against a bf16 peak)"
        )
    if args.compile and device.type == "cpu":
        print("note: --compile on a CPU compiles C++ kernels; expect minutes", file=sys.stderr)
    if "diffusers" in args.libraries:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise SystemExit(
                "diffusers is not installed: pip install -e '.[dev]', or --libraries ldm_lib to time "
                "ours alone"
            ) from None
    try:
        resolve_backend(args.attention, device)
    except ValueError as err:
        raise SystemExit(f"--attention {args.attention}: {err}") from None

    cfg = unet_config(args.preset, zero_init=False, attention_backend=args.attention)
    flops = count_flops(cfg, args.resolution, args.context_len, args.libraries, args.gradient_checkpointing)
    if "diffusers_forward" in flops and flops["diffusers_forward"] != flops["forward"]:
        raise SystemExit(f"the two networks differ: {flops['diffusers_forward']} vs {flops['forward']} FLOPs")

    info = versions(device)
    peak, source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else (None, "")
    if peak is None:
        if device.type == "cuda":
            peak, source = peak_tflops(info["device_name"])
        else:
            source = "no table for CPUs; pass --peak-tflops for an MFU"
    if peak is not None and args.dtype != "bf16" and not args.peak_tflops:
        peak, source = None, f"--dtype {args.dtype}: the table holds bf16 peaks; pass --peak-tflops"

    g = torch.Generator().manual_seed(args.seed)
    B, R = args.batch, args.resolution
    inputs = {
        "x": torch.randn(B, cfg.in_channels, R, R, generator=g),
        "t": torch.randint(0, 1000, (B,), generator=g),
        "context": torch.randn(B, args.context_len, cfg.context_dim, generator=g),
        "target": torch.randn(B, cfg.out_channels, R, R, generator=g),
    }
    inputs = {k: v.to(device) for k, v in inputs.items()}
    probe = {k: inputs[k][:1] for k in ("x", "t", "context")}
    state = None
    if args.init == "same":
        torch.manual_seed(args.seed)
        with torch.device(device):
            state = {k: v.cpu() for k, v in UNet(cfg).state_dict().items()}
        free(device)

    libraries: dict[str, dict[str, Any]] = {}
    reference, parity = None, None
    for name in args.libraries:
        try:
            r = run_library(name, args, cfg, state, inputs, probe, device, reference)
            free(device)  # the model, its gradients and AdamW's state went with run_library's frame
        except torch.cuda.OutOfMemoryError as err:  # the next run_library frees what this one held
            libraries[name] = {
                "error": f"out of memory ({str(err).splitlines()[0]}); try a smaller --batch or "
                "--gradient-checkpointing"
            }
            continue
        output, checked = r.pop("_output"), r.pop("_parity")
        if state is not None:  # same weights: the next library must give the same output
            reference = output if reference is None else reference
            parity = checked if checked is not None else parity
        achieved = flops["forward_backward"] * r["images_per_s"]
        r["achieved_tflops"] = achieved / 1e12
        r["mfu"] = achieved / (peak * 1e12) if peak else None
        if args.gradient_checkpointing:
            r["hfu"] = (
                flops["forward_backward_recompute"] * r["images_per_s"] / (peak * 1e12) if peak else None
            )
        libraries[name] = r

    ok = [libraries[n] for n in LIBRARIES if n in libraries and "error" not in libraries[n]]
    ratio = ok[0]["images_per_s"] / ok[1]["images_per_s"] if len(ok) == 2 else None
    result = {
        "settings": {
            "preset": args.preset,
            "batch": B,
            "resolution": R,
            "pixels": 8 * R,
            "context_len": args.context_len,
            "context_dim": cfg.context_dim,
            "device": str(device),
            "dtype": args.dtype,
            "attention": args.attention,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "gradient_checkpointing": args.gradient_checkpointing,
            "init": args.init,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": torch.get_num_threads(),
            "optimizer": "AdamW (fused), clip_grad_norm 1.0",
        },
        "versions": info,
        "flops_per_image": flops,
        "peak_tflops": peak,
        "peak_source": source,
        "parity_max_rel_diff": parity,
        "libraries": libraries,
        "ratio_ours_over_diffusers": ratio,
    }
    print_report(result)
    path = Path(args.json) if args.json else default_json_path(args, info["device_name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote   : {path}")
    return result


if __name__ == "__main__":
    main()
