"""Training and sampling speed of ldm_lib's UNet against diffusers' UNet2DConditionModel.

Both networks are built from the same preset (``to_diffusers_config`` translates it) and hold the same
weights (the state dicts share their names), so they do the same arithmetic: the script checks that
their outputs agree before it times anything. Both use PyTorch's scaled_dot_product_attention (SDPA):
ours with ``attention_backend="sdpa"``, diffusers with ``AttnProcessor2_0``.

Measured, per library:
- training steps/s: forward, MSE loss against a fixed target, backward, AdamW step;
- sampling forwards/s: one forward under ``torch.no_grad`` in eval mode (a sampler calls this per step).
``--dtype bf16`` runs both under bf16 autocast (weights stay fp32); it is the default on CUDA.

The libraries take turns, one step at a time (A B B A A B ...), so a machine whose load changes during
the run slows both alike. Reported: the median rate, its spread (25th-75th percentile), and the median
of the paired ratios ours/diffusers (each ratio from two neighbouring steps). On CPU the rate per
CPU-second of this process is reported too: it depends much less on other work on the machine.

    python bench/unet_speed.py --preset course_tiny --batch 32 --resolution 8 --threads 1
    python bench/unet_speed.py --preset course_small --batch 16 --resolution 16 --profile
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ldm_lib.models.attention import resolve_backend
from ldm_lib.models.presets import PRESETS, unet_config
from ldm_lib.models.unet import UNet, to_diffusers_config


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="course_tiny", choices=PRESETS["unet"], help="UNet preset, presets.py")
    p.add_argument("--batch", type=int, default=32, help="batch size")
    p.add_argument("--resolution", type=int, default=8, help="latent height and width")
    p.add_argument("--context-len", type=int, default=77, help="text tokens per sample (CLIP: 77)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per library and per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per library and mode, first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA, else fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--adamw", default="default", choices=["default", "foreach", "fused"], help="AdamW kernel")
    p.add_argument("--profile", action="store_true", help="profile ours with torch.profiler, print top ops")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def build(args: argparse.Namespace, device: torch.device) -> dict[str, torch.nn.Module]:
    """Our UNet and diffusers' with the same config and weights, both on SDPA attention."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    # zero_init=False: random last layers, so the parity check below compares non-trivial outputs.
    cfg = unet_config(args.preset, zero_init=False, attention_backend="sdpa")
    ours = UNet(cfg)
    theirs = UNet2DConditionModel(**to_diffusers_config(cfg))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.set_attn_processor(AttnProcessor2_0())
    return {"ldm_lib": ours.to(device), "diffusers": theirs.to(device)}


def predict(name: str, model: torch.nn.Module, x, t, context) -> torch.Tensor:
    if name == "diffusers":
        return model(x, t, encoder_hidden_states=context, return_dict=False)[0]
    return model(x, t, context)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_steps(models, optimizers, x, t, context, target, autocast):
    """For each library, a function doing one training step and one doing one sampling forward."""

    def train(name):
        model = models[name].train()
        with autocast():
            pred = predict(name, model, x, t, context)
        loss = F.mse_loss(pred.float(), target)  # the loss in fp32, as the trainer does
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    def sample(name):
        model = models[name].eval()
        with torch.no_grad(), autocast():
            predict(name, model, x, t, context)

    return {"train": train, "sample": sample}


def measure(step, names, n_steps, warmup, device, desc) -> dict[str, dict[str, list[float]]]:
    """Steps/s of ``step(name)`` for each library, taking turns; wall-clock and per CPU-second."""
    rates = {name: {"wall": [], "cpu": []} for name in names}
    for i in tqdm(range(-warmup, n_steps), desc=f"{desc} ({warmup} warm-up + {n_steps} steps)", leave=False):
        for name in names if i % 2 == 0 else names[::-1]:  # A B, B A, ...: neither always goes first
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            step(name)
            sync(device)
            if i >= 0:  # negative i: warm-up (allocator, oneDNN/cuDNN kernel choice, optimizer state)
                rates[name]["wall"].append(1.0 / (time.perf_counter() - wall))
                rates[name]["cpu"].append(1.0 / max(time.process_time() - cpu, 1e-9))
    return rates


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q1, q2, q3


def report(mode: str, rates, device: torch.device) -> None:
    ours, theirs = rates["ldm_lib"], rates["diffusers"]
    cols = ["wall"] + (["cpu"] if device.type == "cpu" else [])
    for name, r in rates.items():
        line = f"  {mode:<6} {name:<10}"
        for col in cols:
            q1, med, q3 = quartiles(r[col])
            line += f"  {col}: {med:7.3f}/s [{q1:.3f}-{q3:.3f}]"
        print(line)
    line = f"  {mode:<6} {'ratio':<10}"
    for col in cols:
        q1, med, q3 = quartiles([a / b for a, b in zip(ours[col], theirs[col], strict=True)])
        line += f"  {col}: {med:7.3f}   [{q1:.3f}-{q3:.3f}]"
    print(line + "   (ours/diffusers, >1 = ours faster)")


def profile(steps: dict, device: torch.device, n: int = 5, rows: int = 20) -> None:
    """Top ops of ours by self time, for training and for sampling."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for mode, step in steps.items():
        step("ldm_lib")  # warm
        with torch_profile(activities=activities) as prof:
            for _ in range(n):
                step("ldm_lib")
            sync(device)
        print(f"\n== profile of ldm_lib, {mode}, {n} steps, by {sort} ==")
        print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device is available here")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")

    def autocast():
        return torch.autocast(device.type, torch.bfloat16) if dtype == "bf16" else nullcontext()

    try:
        import diffusers
    except ImportError:
        raise SystemExit("this benchmark compares against diffusers: pip install -e '.[dev]'") from None

    torch.manual_seed(args.seed)
    models = build(args, device)
    cfg = models["ldm_lib"].config
    B, R = args.batch, args.resolution
    x = torch.randn(B, cfg.in_channels, R, R, device=device)
    t = torch.randint(0, 1000, (B,), device=device)
    context = torch.randn(B, args.context_len, cfg.context_dim, device=device)
    target = torch.randn(B, cfg.out_channels, R, R, device=device)

    with torch.no_grad():  # same weights, same inputs: the same function, or the comparison is void
        a, b = (predict(n, m.eval(), x, t, context).float() for n, m in models.items())
        err = (a - b).abs().max().item()
    n_params = sum(p.numel() for p in models["ldm_lib"].parameters())
    processors = {type(p).__name__ for p in models["diffusers"].attn_processors.values()}
    print(f"machine : {cpu_model()}, {torch.get_num_threads()} torch threads, device {device}", end="")
    print(f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, ", end="")
    print(f"diffusers {diffusers.__version__}")
    print(f"model   : {args.preset}, {n_params:,} parameters, batch {B}, latents {cfg.in_channels}x{R}x{R},")
    print(f"          context {args.context_len}x{cfg.context_dim}, {dtype}, AdamW ({args.adamw} kernel)")
    print(f"attention: ldm_lib {resolve_backend('sdpa', device)}, diffusers {', '.join(sorted(processors))}")
    print(f"parity  : max |ours - diffusers| = {err:.2e}")
    if err > (1e-2 if dtype == "bf16" else 1e-3):
        raise SystemExit("the two networks disagree: not the same config or weights; no timing")

    kernel = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[args.adamw]
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, **kernel) for n, m in models.items()}
    steps = make_steps(models, optimizers, x, t, context, target, autocast)
    names = list(models)
    results = {
        mode: measure(step, names, args.steps, args.warmup, device, desc=mode) for mode, step in steps.items()
    }
    unit = "steps/s (train) and forwards/s (sample): median [25th-75th percentile]"
    print(f"\n{unit}; {args.steps} steps each, interleaved")
    for mode, rates in results.items():
        report(mode, rates, device)
    if args.profile:
        profile(steps, device)


if __name__ == "__main__":
    main()
