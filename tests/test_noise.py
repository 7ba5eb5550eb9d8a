import pytest
import torch

from ldm_lib.noise import offset_noise, perturb_noise


def test_offset_noise_per_channel_statistics():
    like = torch.zeros(2000, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    noise = offset_noise(like, 0.5, generator=g)
    means = noise.mean(dim=(2, 3))  # (B, C)
    # The spatial mean of each (sample, channel) has variance strength**2 + 1/(H*W).
    torch.testing.assert_close(means.var(dim=0), torch.full((3,), 0.25 + 1 / 64), rtol=0.1, atol=0)
    # Offsets are independent across channels and across samples.
    assert torch.corrcoef(means.T).fill_diagonal_(0).abs().max() < 0.1
    # Within a channel the noise is standard normal around that channel's offset.
    residual = noise - means[..., None, None]
    assert abs(residual.var().item() * 64 / 63 - 1) < 0.02
    assert abs(noise.var().item() - 1.25) < 0.03


def test_offset_noise_zero_strength_is_standard_normal():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    like = torch.empty(4, 2, 5, 5)
    torch.testing.assert_close(offset_noise(like, 0.0, g1), torch.randn(4, 2, 5, 5, generator=g2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_offset_noise_lands_on_likes_dtype_and_device(dtype):
    like = torch.ones(2, 4, 3, 3, dtype=dtype)
    out = offset_noise(like, 0.1)
    assert out.dtype == dtype and out.device == like.device and out.shape == like.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offset_noise_on_cuda_with_cpu_generator():
    like = torch.zeros(2, 4, 3, 3, device="cuda", dtype=torch.bfloat16)
    out = offset_noise(like, 0.1, torch.Generator().manual_seed(0))
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16


def test_same_seed_same_noise_whatever_the_dtype():
    a = offset_noise(torch.zeros(2, 3, 4, 4), 0.1, torch.Generator().manual_seed(9))
    b = offset_noise(torch.zeros(2, 3, 4, 4, dtype=torch.float64), 0.1, torch.Generator().manual_seed(9))
    torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-6)


def test_perturb_noise():
    noise = torch.randn(100000, generator=torch.Generator().manual_seed(1))
    perturbed = perturb_noise(noise, 0.1, torch.Generator().manual_seed(2))
    assert abs((perturbed - noise).std().item() - 0.1) < 0.002
    assert abs(perturbed.var().item() - (noise.var().item() + 0.01)) < 0.003  # variance 1 + rho**2
    assert perturb_noise(noise, 0.0) is noise


@pytest.mark.parametrize("fn", [offset_noise, perturb_noise])
def test_negative_strength_is_refused(fn):
    with pytest.raises(ValueError, match=r"strength=-0.1 is out of range; allowed: \[0.0, inf\]"):
        fn(torch.zeros(1, 1, 2, 2), -0.1)


def test_offset_noise_needs_batch_and_channel():
    with pytest.raises(ValueError, match="batch and a channel"):
        offset_noise(torch.zeros(5), 0.1)
