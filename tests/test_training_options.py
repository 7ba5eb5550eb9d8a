"""Tests that each training option changes what it should: prediction type, zero terminal SNR,
offset noise, input perturbation, Min-SNR weights, caption dropout, EMA and learning-rate schedules,
gradient clipping, bf16, gradient checkpointing, torch.compile, attention backends, seeds, a
trained text encoder and cached latents. Most compare the trainer's own loss with one computed
here by hand from the same draw."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_training_helpers import (
    assert_tensors_close,
    last_checkpoint,
    ldm_config,
    make_artefacts,
    max_difference,
    read_checkpoint,
    section,
    train,
)

from ldm_lib.models.text import encode_text, tokenize
from ldm_lib.training import EMA, draw_noise, ema_decay, lr_factor, make_trainer, read_metrics
from ldm_lib.training.build import build_schedule
from ldm_lib.training.ldm_stage import LDMTrainer


@pytest.fixture(scope="session")
def arts(tmp_path_factory):
    return make_artefacts(tmp_path_factory.mktemp("artefacts"))


def first_batch(trainer: LDMTrainer):
    """The first micro-batch, its rows and the step's draw, as the training loop makes them."""
    batch = next(iter(trainer._loader(trainer.dataset)))
    return batch, trainer.draw(), slice(0, trainer.micro)


# ------------------------------------------------------------------------- the random draw


def test_draw_noise_options() -> None:
    shape, n, T = (4, 4, 4), 4000, 1000
    plain = draw_noise(n, shape, T, torch.Generator().manual_seed(0))
    assert plain.noise.shape == plain.noisy_input_noise.shape == plain.posterior_eps.shape == (n, *shape)
    assert plain.timesteps.dtype == torch.int64 and 0 <= plain.timesteps.min() and plain.timesteps.max() < T
    assert plain.timesteps.float().mean() == pytest.approx((T - 1) / 2, rel=0.05)
    assert torch.equal(plain.noisy_input_noise, plain.noise) and not plain.drop_caption.any()

    s, rho = 0.3, 0.2
    both = draw_noise(n, shape, T, torch.Generator().manual_seed(0), noise_offset=s, input_perturbation=rho)
    hw = shape[1] * shape[2]
    # offset noise: each channel's spatial mean varies with variance s^2 + 1/HW (1/HW without it)
    assert plain.noise.mean((2, 3)).var().item() == pytest.approx(1 / hw, rel=0.1)
    assert both.noise.mean((2, 3)).var().item() == pytest.approx(s**2 + 1 / hw, rel=0.1)
    assert both.noise.var().item() == pytest.approx(1 + s**2, rel=0.05)
    # input perturbation: x_t's noise is the target's noise plus rho * fresh noise
    extra = both.noisy_input_noise - both.noise
    assert extra.std().item() == pytest.approx(rho, rel=0.05)
    assert abs(torch.corrcoef(torch.stack([extra.flatten(), both.noise.flatten()]))[0, 1]) < 0.02
    # the same generator state gives the same draw
    again = draw_noise(n, shape, T, torch.Generator().manual_seed(0), noise_offset=s, input_perturbation=rho)
    assert all(torch.equal(getattr(both, f), getattr(again, f)) for f in both.__dataclass_fields__)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_caption_dropout_fraction(p: float) -> None:
    n = 20000
    drop = draw_noise(n, (4, 2, 2), 1000, torch.Generator().manual_seed(1), caption_dropout=p).drop_caption
    assert drop.dtype == torch.bool
    if p in (0.0, 1.0):
        assert drop.all() if p == 1.0 else not drop.any()
    else:
        assert drop.float().mean().item() == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))


# ----------------------------------------------------------------------------- schedules


def test_lr_schedule_values() -> None:
    assert [lr_factor(n, "constant", 4, 10) for n in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    # linear: from 1 at the end of warm-up to 0 at max_steps
    assert [lr_factor(n, "linear", 2, 10) for n in (0, 1, 2, 6, 10)] == pytest.approx([0.5, 1, 1, 0.5, 0])
    # cosine down to min_lr_ratio
    cosine = [lr_factor(n, "cosine", 2, 10, 0.1) for n in (1, 2, 4, 6, 8, 10)]
    expected = [1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75, 1)]
    assert cosine == pytest.approx(expected)
    assert cosine[3] == pytest.approx(0.55)
    with pytest.raises(ValueError, match="lr_schedule='step'"):
        lr_factor(0, "step", 0, 10)


def test_ema_warmup_decay_and_update() -> None:
    assert [ema_decay(n, 0.999) for n in (0, 1, 2, 90)] == pytest.approx([1 / 10, 2 / 11, 3 / 12, 91 / 100])
    assert ema_decay(10_000, 0.999) == 0.999 and ema_decay(0, 0.999, warmup=False) == 0.999
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values())  # an fp32 shadow
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    assert ema.update(model) == pytest.approx(0.1)  # warm-up: min(0.5, 1/10)
    torch.testing.assert_close(ema.shadow["weight"], 0.1 * start["weight"] + 0.9 * model.weight.float())
    torch.testing.assert_close(ema.shadow["bias"], start["bias"])
    assert ema.update(model) == pytest.approx(2 / 11) and ema.num_updates == 2
    target = torch.nn.Linear(3, 2)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, ema.shadow["weight"])


# ------------------------------------------------------------------------------ the loss


def loss_by_hand(trainer: LDMTrainer, batch, draw, rows) -> torch.Tensor:
    """The loss of one micro-batch from the paper formulas, with the trainer's networks and draw."""
    c = trainer.config
    d = draw[rows]
    with torch.no_grad():
        posterior = trainer.vae.encode(batch["pixel_values"])
        z = (
            posterior.mean + posterior.std * d.posterior_eps
            if c.diffusion.sample_posterior
            else posterior.mean
        )
        x0 = (z - trainer.vae.config.shift_factor) * trainer.vae.config.scaling_factor
        captions = ["" if drop else cap for cap, drop in zip(batch["caption"], d.drop_caption, strict=True)]
        context = encode_text(
            trainer.text_encoder, tokenize(trainer.tokenizer, captions)["input_ids"]
        ).float()
    abar = trainer.schedule.alphas_cumprod[d.timesteps].double()
    alpha, sigma = abar.sqrt().float()[:, None, None, None], (1 - abar).sqrt().float()[:, None, None, None]
    x_t = alpha * x0 + sigma * d.noisy_input_noise  # perturbed noise makes x_t ...
    target = {  # ... the unperturbed noise makes the target
        "epsilon": d.noise,
        "v_prediction": alpha * d.noise - sigma * x0,
        "sample": x0,
    }[c.diffusion.prediction_type]
    prediction = trainer.unet(x_t, d.timesteps, context)
    mse = (prediction - target).pow(2).mean((1, 2, 3))
    gamma = c.diffusion.min_snr_gamma
    if gamma is not None:
        snr = (abar / (1 - abar)).float()
        weight = {"epsilon": snr.clamp(max=gamma) / snr, "v_prediction": snr.clamp(max=gamma) / (snr + 1)}
        mse = mse * weight[c.diffusion.prediction_type]
    return mse.mean()


@pytest.mark.parametrize(
    "options",
    [
        (),  # epsilon, no offset, no perturbation, uniform weights
        ("diffusion.prediction_type=v_prediction", "diffusion.zero_terminal_snr=true",
         "diffusion.noise_offset=0.1", "diffusion.input_perturbation=0.1", "diffusion.min_snr_gamma=5",
         "diffusion.caption_dropout=1.0"),
        ("diffusion.min_snr_gamma=2", "diffusion.sample_posterior=false", "diffusion.schedule=cosine"),
    ],
    ids=["eps", "v-ztsnr-offset-ip-minsnr-drop", "eps-minsnr-mean-cosine"],
)  # fmt: skip
def test_loss_follows_the_options(arts, tmp_path: Path, options: tuple[str, ...]) -> None:
    trainer = make_trainer(ldm_config(arts, tmp_path, "optim.batch_size=8", *options))
    d = trainer.config.diffusion
    batch, draw, rows = first_batch(trainer)
    torch.manual_seed(0)
    loss, _ = trainer.micro_loss(batch, draw, rows)
    torch.testing.assert_close(loss, loss_by_hand(trainer, batch, draw, rows), rtol=1e-5, atol=1e-6)

    abar_T = trainer.schedule.alphas_cumprod[-1].item()
    if d.schedule == "scaled_linear":
        assert (abar_T < 1e-12) if d.zero_terminal_snr else (abar_T > 1e-3)
    assert torch.equal(draw.noisy_input_noise, draw.noise) == (d.input_perturbation == 0)
    if d.caption_dropout == 1.0:
        assert draw.drop_caption.all()
    # a different prediction type gives a different loss on the same draw
    trainer.config.diffusion.prediction_type = "sample"
    trainer.config.diffusion.min_snr_gamma = None
    assert not torch.allclose(trainer.micro_loss(batch, draw, rows)[0], loss)


def test_zero_terminal_snr_schedule(arts) -> None:
    plain = build_schedule(ldm_config(arts, "x"))
    zero = build_schedule(
        ldm_config(arts, "x", "diffusion.prediction_type=v_prediction", "diffusion.zero_terminal_snr=true")
    )
    assert plain.alphas_cumprod[-1].item() == pytest.approx(0.0047, abs=2e-4)
    assert zero.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert zero.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-3)
    assert torch.all(zero.alphas_cumprod[1:] < zero.alphas_cumprod[:-1])


def test_caption_dropout_in_training(arts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The captions that reach the text encoder: all empty at p = 1, none at p = 0."""
    seen: list[list[str]] = []
    context = LDMTrainer.context

    def spy(self, captions):
        seen.append(list(captions))
        return context(self, captions)

    monkeypatch.setattr(LDMTrainer, "context", spy)
    for p, expected in ((1.0, True), (0.0, False)):
        seen.clear()
        trainer = make_trainer(ldm_config(arts, tmp_path / str(p), f"diffusion.caption_dropout={p}"))
        trainer.micro_loss(*first_batch(trainer))
        assert seen and all((caption == "") == expected for caption in seen[0]) and len(seen[0]) == 8


# ------------------------------------------------------------------------ the optimizer step


def grad_norm_at_step(optimizer: torch.optim.Optimizer, norms: list[float]):
    """``optimizer.step`` that first appends the global norm of the gradients it is about to use."""
    step = optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        )
        return step(*args, **kwargs)

    return recording_step


def test_gradient_clipping(arts, tmp_path: Path) -> None:
    """The update uses gradients clipped to max_grad_norm; metrics record the norm before clipping."""
    for max_norm in (1e-3, None):
        out = tmp_path / str(max_norm)
        setting = "null" if max_norm is None else max_norm
        trainer = make_trainer(ldm_config(arts, out, "optim.max_steps=2", f"optim.max_grad_norm={setting}"))
        norms: list[float] = []
        trainer.optimizer.step = grad_norm_at_step(trainer.optimizer, norms)
        trainer.train()
        logged = [r["grad_norm"] for r in read_metrics(out)]
        assert len(norms) == len(logged) == 2
        if max_norm is None:
            assert norms == pytest.approx(logged, rel=1e-5)
        else:
            assert all(n > 10 * max_norm for n in logged)
            assert norms == pytest.approx([max_norm, max_norm], rel=1e-3)


def test_bf16_autocast_keeps_trainable_weights_fp32(arts, tmp_path: Path) -> None:
    trainer = make_trainer(ldm_config(arts, tmp_path, "mixed_precision=bf16", "optim.max_steps=2"))
    dtypes = []
    hook = trainer.unet.conv_in.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer.train()
    hook.remove()
    assert dtypes and dtypes[0] == torch.bfloat16  # the UNet ran under autocast
    assert all(p.dtype == torch.float32 for p in trainer.unet.parameters())
    assert next(trainer.text_encoder.parameters()).dtype == torch.bfloat16  # frozen: cast
    tensors, _ = last_checkpoint(tmp_path)
    assert all(v.dtype == torch.float32 for k, v in tensors.items() if k.startswith(("model.", "ema.")))
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path))


def test_gradient_checkpointing(arts, tmp_path: Path) -> None:
    """Same loss and gradients; with it on, each ResNet block's computation runs again in backward."""
    losses, grads, counts = [], [], []
    for flag in (False, True):
        trainer = make_trainer(ldm_config(arts, tmp_path / str(flag), f"model.gradient_checkpointing={flag}"))
        trainer.train_module.train()
        blocks = [m for m in trainer.unet.modules() if type(m).__name__ == "ResnetBlock2D"]
        calls: list[int] = []
        for b in blocks:
            b.block = lambda *args, _f=b.block, _calls=calls: _calls.append(1) or _f(*args)
        loss, _ = trainer.micro_loss(*first_batch(trainer))
        in_forward = len(calls)
        loss.backward()
        counts.append((in_forward, len(calls)))
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in trainer.unet.named_parameters() if p.grad is not None})
    assert blocks and counts == [(len(blocks), len(blocks)), (len(blocks), 2 * len(blocks))]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    assert_tensors_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_compile_runs_and_matches_eager(arts, tmp_path: Path) -> None:
    compiled = train(ldm_config(arts, tmp_path / "c", "optim.max_steps=2", "model.compile=true",
                                "model.compile_backend=eager"))  # fmt: skip
    assert type(compiled.forward_module).__name__ == "OptimizedModule"
    train(ldm_config(arts, tmp_path / "e", "optim.max_steps=2"))
    a, _ = last_checkpoint(tmp_path / "c")
    b, _ = last_checkpoint(tmp_path / "e")
    assert not any(".orig_mod" in k or "_orig_mod" in k for k in a)  # saved without the compile wrapper
    assert_tensors_close(section(a, "model"), section(b, "model"), rtol=1e-5, atol=1e-6)


def test_attention_backends_agree(arts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.attention_backend reaches every attention layer; math and SDPA give the same loss."""
    import torch.nn.functional as F

    in_unet, sdpa_calls = [], []  # SDPA calls made by the UNet (the text encoder uses SDPA too)
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.extend(in_unet) or sdpa(*a, **k)
    )
    losses = {}
    for backend in ("math", "sdpa"):
        trainer = make_trainer(ldm_config(arts, tmp_path / backend, f"model.attention_backend={backend}"))
        assert {m.backend for m in trainer.unet.modules() if hasattr(m, "backend")} == {backend}
        trainer.unet.register_forward_pre_hook(lambda *_: in_unet.append(1))
        trainer.unet.register_forward_hook(lambda *_: in_unet.clear())
        sdpa_calls.clear()
        losses[backend] = trainer.micro_loss(*first_batch(trainer))[0].item()
        assert bool(sdpa_calls) == (backend == "sdpa")
    assert losses["math"] == pytest.approx(losses["sdpa"], rel=1e-5)
    with pytest.raises(ValueError, match="xformers"):
        make_trainer(ldm_config(arts, tmp_path / "x", "model.attention_backend=xformers"))


def test_seed_determinism(arts, tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(ldm_config(arts, tmp_path / name, "optim.max_steps=2", f"seed={seed}"))
    a, b, c = (last_checkpoint(tmp_path / name)[0] for name in "abc")
    assert_tensors_close(a, b)  # everything, RNG states included
    assert max_difference(section(a, "model"), section(c, "model")) > 1e-3


# --------------------------------------------------------------------- text encoder and cache


def test_train_text_encoder(arts, tmp_path: Path) -> None:
    from ldm_lib.models.text import build_text_encoder
    from ldm_lib.pipeline import LatentDiffusion

    # 4 steps: the UNet starts with zero residual branches and output (zero_init), so the caption
    # reaches the loss only from the third step on
    trainer = train(ldm_config(arts, tmp_path, "model.train_text_encoder=true", "optim.text_encoder_lr=5e-4",
                               "optim.max_steps=4", "diffusion.caption_dropout=0"))  # fmt: skip
    initial = build_text_encoder(str(arts.text_encoder)).state_dict()
    groups = trainer.optimizer.param_groups
    assert (
        len(groups) == 2 and groups[1]["lr"] == pytest.approx(5e-4) and groups[0]["lr"] == pytest.approx(1e-3)
    )
    assert all(p.requires_grad and p.dtype == torch.float32 for p in trainer.text_encoder.parameters())

    tensors, _ = last_checkpoint(tmp_path)
    trained = {
        k[len("model.text_encoder.") :]: v for k, v in tensors.items() if k.startswith("model.text_encoder.")
    }
    assert trained and any(k.startswith("ema.text_encoder.") for k in tensors)
    assert any(k.startswith("optimizer.") for k in tensors)
    changed = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert any("token_embedding" in k for k in changed) and any("layers.0" in k for k in changed)

    model = LatentDiffusion.load(tmp_path / "model.safetensors", use_ema=False)
    assert_tensors_close({k: v for k, v in model.text_encoder.state_dict().items() if k in trained}, trained)


def test_cached_latents_train_like_pixels(arts, tmp_path: Path) -> None:
    """Training from the latent cache gives the weights of training from pixels: the cache stores
    each posterior's mean and std, z = mean + std * eps uses the same eps, and the flips match."""
    common = ("optim.max_steps=3", "seed=1", "data.random_flip=true")
    train(ldm_config(arts, tmp_path / "pixels", *common))
    cached = train(ldm_config(arts, tmp_path / "cached", *common, "data.cache_latents=true"))
    cache = tmp_path / "cached" / "latents.safetensors"
    assert cache.is_file() and cached.cached
    a, _ = last_checkpoint(tmp_path / "pixels")
    b, _ = last_checkpoint(tmp_path / "cached")
    assert_tensors_close(section(a, "model"), section(b, "model"), rtol=1e-4, atol=1e-5)
    assert_tensors_close(section(a, "ema"), section(b, "ema"), rtol=1e-4, atol=1e-5)
    # a second run in the same folder reads the cache instead of encoding again
    stamp = cache.stat().st_mtime_ns
    train(ldm_config(arts, tmp_path / "cached", *common, "data.cache_latents=true", "optim.max_steps=4"))
    assert cache.stat().st_mtime_ns == stamp
    assert read_checkpoint(tmp_path / "cached" / "model.safetensors")[1]["step"] == "4"


def test_vae_encodes_in_its_own_dtype_under_bf16(arts, tmp_path: Path) -> None:
    """model.vae_dtype holds under autocast: the frozen VAE encodes pixels in fp32, not bf16."""
    trainer = make_trainer(ldm_config(arts, tmp_path, "mixed_precision=bf16"))
    dtypes = []
    hook = trainer.vae.quant_conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    batch, draw, rows = first_batch(trainer)
    with trainer.autocast():
        trainer.latents(batch, draw[rows].posterior_eps)
    hook.remove()
    assert dtypes == [torch.float32]


def test_uncached_text_embeddings_equal_cached(arts, tmp_path: Path) -> None:
    cached = make_trainer(ldm_config(arts, tmp_path / "a"))
    direct = make_trainer(ldm_config(arts, tmp_path / "b", "model.cache_text_embeddings=false"))
    captions = ["a small blue square on a black background", "", "a small blue square on a black background"]
    torch.testing.assert_close(direct.context(captions), cached.context(captions))
    assert not direct._context_cache and len(cached._context_cache) == 2


def test_checkpoint_files_get_a_normal_mode(arts, tmp_path: Path) -> None:
    import os
    import stat

    train(ldm_config(arts, tmp_path, "optim.max_steps=1"))
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp_path / "model.safetensors", *(tmp_path / "checkpoints").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
