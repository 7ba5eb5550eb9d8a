r"""Exercises of notebook 15_scaling_up: counting a training step's FLOPs, and the MFU of a run.

- ``conv2d_flops(batch, in_channels, out_channels, height, width, kernel_size, stride)``: the FLOPs of
  a 2-D convolution with "same" padding (``kernel_size // 2``, odd kernels), bias not counted. The
  output is :math:`H_o = \lfloor (H - 1)/s \rfloor + 1` high (:math:`W_o` likewise), and each output
  value is a dot product of length :math:`C_{in}k^2`, a multiply and an add per term:

  .. math:: \mathrm{FLOPs} = 2\,B\,C_{in}\,C_{out}\,k^2\,H_o W_o

- ``attention_flops(batch, heads, n_queries, n_keys, head_dim)``: the FLOPs of
  :math:`\mathrm{softmax}(QK^\top/\sqrt d)\,V` (Vaswani et al. 2017, arXiv 1706.03762), counting the
  two matrix products, :math:`QK^\top` and :math:`PV` (the softmax is elementwise and not counted):

  .. math:: \mathrm{FLOPs} = 2\cdot 2\,B\,h\,N M d = 4\,B\,h\,N M d

- ``model_flops_utilization(flops_per_image, images_per_second, peak_tflops)``: the fraction of the
  hardware's peak a training run uses (Chowdhery et al. 2022, "PaLM", arXiv 2204.02311, App. B):

  .. math:: \mathrm{MFU} = \frac{\text{FLOPs per image}\times\text{images/s}}
            {\text{peak TFLOP/s}\times 10^{12}}

The references of the two counts are PyTorch's own FLOP counter
(``torch.utils.flop_counter.FlopCounterMode``) run on meta tensors (shapes only, no memory, no
arithmetic), so an answer that passes agrees with what the notebook counts for the whole UNet.
"""

from __future__ import annotations

import torch

from .checker import Case, Exercise, register

NOTEBOOK = "15_scaling_up"


def _counted(fn) -> int:
    """FLOPs that torch's counter sees while ``fn()`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------ conv2d_flops


def _conv2d_flops(batch, in_channels, out_channels, height, width, kernel_size, stride):
    x = torch.empty(batch, in_channels, height, width, device="meta")
    w = torch.empty(out_channels, in_channels, kernel_size, kernel_size, device="meta")
    return _counted(lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=kernel_size // 2))


def _out(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def _conv_macs(b, cin, cout, h, w, k, s):
    return b * cin * cout * k * k * _out(h, s) * _out(w, s)


def _conv_input_size(b, cin, cout, h, w, k, s):
    return 2 * b * cin * cout * k * k * h * w


def _conv_no_kernel_area(b, cin, cout, h, w, k, s):
    return 2 * b * cin * cout * _out(h, s) * _out(w, s)


def _conv_divided_by_stride(b, cin, cout, h, w, k, s):
    return 2 * b * cin * cout * k * k * (h // s) * (w // s)


def _conv_cases() -> list[Case]:
    return [
        Case("SD 1.5's conv_in at 512 px: batch 1, 4 -> 320 channels, 64x64, 3x3", (1, 4, 320, 64, 64, 3, 1)),
        Case("a ResNet conv of SD 1.5's second level at 256 px, batch 2", (2, 640, 640, 16, 16, 3, 1)),
        Case("a 1x1 shortcut conv, 320 -> 640 channels, 32x32, batch 4", (4, 320, 640, 32, 32, 1, 1)),
        Case("a stride-2 downsampling conv, 64x64 -> 32x32, batch 1", (1, 320, 320, 64, 64, 3, 2)),
        Case("a stride-2 conv on odd sizes: 7x9 -> 4x5, batch 3", (3, 8, 16, 7, 9, 3, 2)),
        Case("a 5x5 kernel, 13x11, batch 2", (2, 3, 6, 13, 11, 5, 1)),
    ]  # fmt: skip


register(
    Exercise(
        name="conv2d_flops",
        notebook=NOTEBOOK,
        hint=(
            "output size: h_out = (height - 1) // stride + 1, w_out likewise; each of the "
            "batch * out_channels * h_out * w_out outputs is a dot product of in_channels * kernel_size**2 "
            "terms, one multiply and one add each: 2 * batch * in_channels * out_channels * kernel_size**2 "
            "* h_out * w_out."
        ),
        reference=_conv2d_flops,
        cases=_conv_cases,
        mistakes=[
            (_conv_macs, "that is the number of multiply-adds (MACs); a multiply-add is 2 FLOPs"),
            (
                _conv_input_size,
                "the count uses the input's height and width; with stride 2 the output is half as high "
                "and wide: h_out = (height - 1) // stride + 1",
            ),
            (_conv_no_kernel_area, "each output sums over the kernel's k x k window too: multiply by k**2"),
            (
                _conv_divided_by_stride,
                "height // stride rounds down; with padding k // 2 the output has (height - 1) // stride + 1 "
                "rows (7 rows at stride 2 give 4)",
            ),
        ],
        atol=0.5,
        rtol=0.0,
    )
)


# --------------------------------------------------------------------------------- attention_flops


def _attention_flops(batch, heads, n_queries, n_keys, head_dim):
    q = torch.empty(batch, heads, n_queries, head_dim, device="meta")
    k = torch.empty(batch, heads, n_keys, head_dim, device="meta")
    v = torch.empty(batch, heads, n_keys, head_dim, device="meta")
    return _counted(lambda: torch.softmax(q @ k.transpose(-2, -1) * head_dim**-0.5, dim=-1) @ v)


def _attention_cases() -> list[Case]:
    return [
        Case("SD 1.5 self-attention, level 0, 256 px: 1024 tokens, 8 heads x 40", (1, 8, 1024, 1024, 40)),
        Case("SD 1.5 cross-attention, level 0, 512 px: 4096 queries, 77 keys", (1, 8, 4096, 77, 40)),
        Case("batch 4, the middle block at 512 px: 64 tokens, 8 heads of 160", (4, 8, 64, 64, 160)),
        Case("SD 2 style, 64-channel heads: 5 heads, 256 queries, 77 keys, batch 2", (2, 5, 256, 77, 64)),
        Case("a single head, 3 queries, 5 keys of width 7", (1, 1, 3, 5, 7)),
    ]  # fmt: skip


register(
    Exercise(
        name="attention_flops",
        notebook=NOTEBOOK,
        hint=(
            "two matrix products per head: Q K^T is (N x d) by (d x M), 2 N M d FLOPs; P V is (N x M) by "
            "(M x d), 2 N M d more; times batch and heads: 4 * batch * heads * n_queries * n_keys * head_dim."
        ),
        reference=_attention_flops,
        cases=_attention_cases,
        mistakes=[
            (
                lambda b, h, n, m, d: 2 * b * h * n * m * d,
                "that counts one of the two matrix products (or multiply-adds): Q K^T and P V each cost "
                "2 N M d FLOPs",
            ),
            (
                lambda b, h, n, m, d: 4 * b * n * m * d,
                "each of the heads does its own products: multiply by heads",
            ),
            (
                lambda b, h, n, m, d: 4 * b * h * n * n * d,
                "the scores are n_queries x n_keys, not n_queries x n_queries (cross-attention has 77 keys)",
            ),
            (
                lambda b, h, n, m, d: 4 * b * h * n * m * d * h,
                "head_dim is the width of one head; heads * head_dim is the layer's width, so multiply by "
                "heads once",
            ),
        ],
        atol=0.5,
        rtol=0.0,
    )
)


# ------------------------------------------------------------------------- model_flops_utilization


def _mfu(flops_per_image, images_per_second, peak_tflops):
    return flops_per_image * images_per_second / (peak_tflops * 1e12)


def _mfu_cases() -> list[Case]:
    sd15_512 = 3 * 803_273_441_280  # forward + backward of one 512 px image (notebook 15)
    sd15_256 = 3 * 180_106_444_800
    return [
        Case("SD 1.5 at 512 px, 150 images/s on an H100 SXM (989.5 TFLOP/s)", (sd15_512, 150.0, 989.5)),
        Case("SD 1.5 at 256 px, 300 images/s on an A100 (312 TFLOP/s)", (sd15_256, 300.0, 312.0)),
        Case("a small model on a CPU core: 12.2 GFLOP per step of 4 images, 9 images/s, 0.06 TFLOP/s",
             (12.2e9 / 4, 9.0, 0.06)),
        Case("an integer rate: 1e12 FLOPs per image, 2 images/s, 4 TFLOP/s peak", (10**12, 2, 4.0)),
    ]  # fmt: skip


register(
    Exercise(
        name="model_flops_utilization",
        notebook=NOTEBOOK,
        hint=(
            "achieved FLOP/s = flops_per_image * images_per_second; the peak in FLOP/s is "
            "peak_tflops * 1e12; MFU is their ratio, a fraction between 0 and 1 (not a percentage)."
        ),
        reference=_mfu,
        cases=_mfu_cases,
        mistakes=[
            (lambda f, r, p: 100 * _mfu(f, r, p), "that is a percentage; return the fraction (0.4, not 40)"),
            (lambda f, r, p: f * r / p, "peak_tflops is in TFLOP/s: multiply it by 1e12 to get FLOP/s"),
            (lambda f, r, p: p * 1e12 / (f * r), "the ratio is upside down: achieved FLOP/s over the peak"),
            (lambda f, r, p: f / r / (p * 1e12), "images per second multiply the FLOPs per image"),
        ],
        atol=0.0,
        rtol=1e-9,
    )
)
