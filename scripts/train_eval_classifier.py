"""Train the shape/size classifier of ldm_lib.eval and write ldm_lib/eval/shape_classifier.safetensors.

    python scripts/train_eval_classifier.py            # about 85 s of CPU time, one thread
    python scripts/train_eval_classifier.py --out /tmp/c.safetensors --steps 200   # a quick try

The classifier reads a shape's coverage map (ldm_lib.eval.classifier.soft_mask) and must name the
shape and size of images made by a small latent diffusion model: slightly blurry, colours off,
edges wobbly, a little noise. So it is trained on renders of the shapes set (training seeds
1000 and up; the tests and the held-out figures use other seeds) degraded by :func:`augment`,
which mimics those defects, and every training image goes through the same segmentation as at
evaluation time. Held-out accuracies (clean and degraded, at 32 and 64 px) are printed and
stored in the file's metadata (ldm_lib.eval.classifier_metadata()).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from ldm_lib.data.shapes import SHAPES, SIZES, shapes_tensors
from ldm_lib.eval.classifier import (
    SHAPE_CLASSES,
    SIZE_CLASSES,
    WEIGHTS_PATH,
    ShapeClassifier,
    save_classifier,
    segment,
    soft_mask,
)

TRAIN_SEED = 1000  # pools use seeds TRAIN_SEED, TRAIN_SEED + 1, ...
HELD_OUT_SEED = 999


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``x`` (B, C, H, W) with its own Gaussian ``sigma`` (B,) in pixels (0: none)."""
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)  # along rows
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)  # along columns
    return y.reshape(b, c, h, w)


def augment(images: torch.Tensor, generator: torch.Generator, p_clean: float = 0.25) -> torch.Tensor:
    """Degrade ``[-1, 1]`` renders the way a small VAE-decoded diffusion model does (random per image).

    Wobbly geometry (a smooth random warp, up to about 1 px, plus +-4% scale and +-6 degrees
    rotation), blur (sigma up to 1.5 px at 32 px), colour errors (per-channel gain and offset, a
    global brightness shift, partial desaturation), smooth blotches and pixel noise. A fraction
    ``p_clean`` of the images is left untouched.
    """
    b, _, h, w = images.shape

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, *shape, generator=generator)

    # Geometry: affine (scale, rotation) plus a low-frequency displacement field, in grid units
    # (the image spans [-1, 1], so 1 px at 32 px is 1/16).
    angle = uniform(-6, 6) * math.pi / 180
    scale = uniform(0.96, 1.04)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros(b)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, [b, 3, h, w], align_corners=False)
    wobble = torch.randn(b, 2, 4, 4, generator=generator) * uniform(0, 0.04, 1, 1, 1)
    grid = grid + F.interpolate(wobble, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = gaussian_blur(x, uniform(0, 1.5) * h / 32)
    # Colours, in [0, 1].
    x = (x + 1) / 2
    gray = x.mean(dim=1, keepdim=True)
    k = uniform(0, 0.3, 1, 1, 1)
    x = (1 - k) * x + k * gray
    x = x * uniform(0.8, 1.1, 3, 1, 1) + 0.06 * torch.randn(b, 3, 1, 1, generator=generator)
    x = x + uniform(-0.15, 0.15, 1, 1, 1)
    blotches = torch.randn(b, 3, 4, 4, generator=generator) * uniform(0, 0.08, 1, 1, 1)
    x = x + F.interpolate(blotches, size=(h, w), mode="bicubic", align_corners=False)
    x = x + torch.randn(x.shape, generator=generator) * uniform(0, 0.08, 1, 1, 1)
    x = (x * 2 - 1).clamp(-1, 1)
    clean = torch.rand(b, generator=generator) < p_clean
    return torch.where(clean[:, None, None, None], images, x)


def labels(attributes: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Class indices (shape, size) of a list of attribute dicts."""
    shape = torch.tensor([SHAPE_CLASSES.index(a["shape"]) for a in attributes])
    size = torch.tensor([SIZE_CLASSES.index(a["size"]) for a in attributes])
    return shape, size


def pool(num_samples: int, resolution: int, first_seed: int, per_seed: int = 2000):
    """Renders from several seeds (``per_seed`` each): images, shape labels, size labels."""
    images, attributes = [], []
    for k in range(math.ceil(num_samples / per_seed)):
        x, _, a = shapes_tensors(min(per_seed, num_samples - k * per_seed), resolution, seed=first_seed + k)
        images.append(x)
        attributes += a
    return (torch.cat(images), *labels(attributes))


@torch.no_grad()
def accuracy(model: ShapeClassifier, images: torch.Tensor, shape: torch.Tensor, size: torch.Tensor) -> dict:
    """Held-out accuracy of the shape head, the size head and both, on a whole pool."""
    seg = segment(images)
    shape_logits, size_logits = model(soft_mask(images, seg))
    shape_ok = (shape_logits.argmax(1) == shape) & seg.has_shape
    size_ok = (size_logits.argmax(1) == size) & seg.has_shape
    both = shape_ok & size_ok
    return {
        name: round(ok.float().mean().item(), 4)
        for name, ok in (("shape", shape_ok), ("size", size_ok), ("both", both))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(WEIGHTS_PATH), help="safetensors file to write")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (cosine decay)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (init, augmentation, batches)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    assert SHAPE_CLASSES == SHAPES and SIZE_CLASSES == SIZES, "class order must follow the dataset's"

    start, cpu_start = time.time(), time.process_time()
    # Mostly 32 px (the course's generators), some 64 px (the classifier then sees a resize).
    pools = {32: pool(16000, 32, TRAIN_SEED), 64: pool(4000, 64, TRAIN_SEED + 100)}
    p64 = 0.2
    print(f"rendered training pools in {time.time() - start:.1f} s")

    model = ShapeClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.1)
    for step in range(args.steps):
        resolution = 64 if torch.rand((), generator=generator) < p64 else 32
        images, shape, size = pools[resolution]
        index = torch.randint(len(images), (args.batch,), generator=generator)
        x = augment(images[index], generator)
        seg = segment(x)
        with torch.no_grad():
            mask = soft_mask(x, seg)
        shape_logits, size_logits = model(mask)
        keep = seg.has_shape.float()  # an augmentation that erased the shape teaches nothing
        loss_each = F.cross_entropy(shape_logits, shape[index], reduction="none") + F.cross_entropy(
            size_logits, size[index], reduction="none"
        )
        loss = (loss_each * keep).sum() / keep.sum().clamp_min(1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f} s")
    train_seconds, train_cpu_seconds = time.time() - start, time.process_time() - cpu_start
    model.eval()

    held_out = {}
    for resolution, n in ((32, 4000), (64, 1000)):
        images, shape, size = pool(n, resolution, HELD_OUT_SEED, per_seed=n)
        held_out[f"clean_{resolution}"] = accuracy(model, images, shape, size)
        degraded = augment(images, torch.Generator().manual_seed(1), p_clean=0.0)
        held_out[f"augmented_{resolution}"] = accuracy(model, degraded, shape, size)
    for name, scores in held_out.items():
        print(f"held-out {name:14s} " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))

    metadata = {
        "held_out_accuracy": json.dumps(held_out),
        "held_out_seed": str(HELD_OUT_SEED),
        "train_seeds": f"{TRAIN_SEED}-{TRAIN_SEED + 7} (32 px), {TRAIN_SEED + 100}-{TRAIN_SEED + 101} (64)",
        "steps": str(args.steps),
        "batch": str(args.batch),
        "train_seconds": f"{train_seconds:.0f} wall, {train_cpu_seconds:.0f} CPU (1 thread)",
        "script": "scripts/train_eval_classifier.py",
    }
    save_classifier(model, args.out, metadata)
    print(f"wrote {args.out} after {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
