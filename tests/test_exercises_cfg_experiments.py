"""Exercise of notebook 12_cfg_experiments: the reference is the pipeline's guided model (one UNet
call on a batch of 2B, CFG, rescale), the cases cover the edges (w = 0 and 1, one scale per sample,
phi = 0, 0.7, 1, uncond of one row or expanded, samples of different std), right answers written
another way pass, and the known mistakes, two UNet passes included, get their hint."""

import subprocess
import sys

import pytest
import torch

import ldm_lib.exercises.cfg_experiments as ex12  # registers the exercise (also when __init__ does not)
from ldm_lib.exercises import EXERCISES, ExerciseFailure, check
from ldm_lib.pipeline import LatentDiffusion

NAME = "cfg_model_output"


def _todo(*args):
    raise NotImplementedError


def _by_hand(unet, x_t, t, cond, uncond, w, phi):
    """Two passes, in float64, from the equations (no library guidance)."""
    b = x_t.shape[0]
    y_u = unet(x_t, t, uncond.expand(b, -1, -1)).double()
    y_c = unet(x_t, t, cond).double()
    w = w.double().reshape(-1, 1, 1, 1) if isinstance(w, torch.Tensor) else w
    guided = y_u + w * (y_c - y_u)
    std_c = y_c.flatten(1).std(dim=1).reshape(-1, 1, 1, 1)
    std_g = guided.flatten(1).std(dim=1).reshape(-1, 1, 1, 1)
    return (phi * guided * std_c / std_g + (1 - phi) * guided).float()


def test_registered_for_notebook_12_and_reference_passes(capsys):
    ex = EXERCISES[NAME]
    assert ex.notebook == "12_cfg_experiments" and ex.verify is not None
    assert check(NAME, ex.reference) is True
    assert check(NAME, _todo) is False
    assert "still to do" in capsys.readouterr().out


def test_reference_is_the_equations_and_calls_the_unet_once():
    ex = EXERCISES[NAME]
    for case in ex.cases():
        unet = case.args[0]
        unet.calls = 0
        got = ex.reference(*case.args)
        assert unet.calls == 1, case.description
        assert got.shape == case.args[1].shape and got.dtype == torch.float32
        torch.testing.assert_close(got, _by_hand(*case.args), rtol=1e-4, atol=1e-5)


def test_cases_cover_the_edges():
    cases = EXERCISES[NAME].cases()
    scales = [c.args[5] for c in cases]
    floats = {w for w in scales if not isinstance(w, torch.Tensor)}
    assert {0.0, 1.0} <= floats and max(floats) >= 7.5
    assert sum(isinstance(w, torch.Tensor) for w in scales) >= 2  # one scale per sample
    assert {0.0, 1.0} <= {c.args[6] for c in cases} and any(0 < c.args[6] < 1 for c in cases)
    batches = {c.args[1].shape[0] for c in cases}
    assert 1 in batches and 8 not in batches  # (B,) never broadcasts silently along the width 8
    unconds = {c.args[4].shape[0] for c in cases}
    assert 1 in unconds and any(u > 1 for u in unconds)  # (1, L, D) to expand, and already expanded
    # the per-sample std differs within a batch, so a batch-wide std gives a different rescale
    x_t = next(c.args[1] for c in cases if c.args[6] == 0.7)
    stds = x_t.flatten(1).std(dim=1)
    assert stds.max() > 2 * stds.min()


def test_cases_are_deterministic():
    a, b = EXERCISES[NAME].cases(), EXERCISES[NAME].cases()
    for ca, cb in zip(a, b, strict=True):
        for x, y in zip(ca.args, cb.args, strict=True):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y)


def test_each_known_mistake_fails_with_its_hint():
    for mistake, meaning in EXERCISES[NAME].mistakes:
        with pytest.raises(ExerciseFailure) as info:
            check(NAME, mistake)
        message = str(info.value)
        assert "on input:" in message and "Hint:" in message
        assert f"Your result matches a known mistake: {meaning}" in message, (meaning, message)


def test_two_passes_are_caught_by_counting_calls():
    with pytest.raises(ExerciseFailure, match="the values are right, but the UNet was called 2 times"):
        check(NAME, ex12._two_passes)


def test_right_answers_written_another_way_pass():
    def with_lerp_and_population_std(unet, x_t, t, cond, uncond, w, phi):
        b = x_t.shape[0]
        out = unet(
            torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond.repeat(b // len(uncond), 1, 1), cond])
        )
        y_u, y_c = out[:b], out[b:]
        if isinstance(w, torch.Tensor):
            w = w.view(b, 1, 1, 1)
        guided = torch.lerp(y_u, y_c, w) if isinstance(w, torch.Tensor) else y_u + w * (y_c - y_u)
        std_c = y_c.std(dim=(1, 2, 3), keepdim=True, correction=0)
        std_g = guided.std(dim=(1, 2, 3), keepdim=True, correction=0)
        return phi * (guided * std_c / std_g) + (1 - phi) * guided

    def skipping_uncond_at_w_1(unet, x_t, t, cond, uncond, w, phi):
        if not isinstance(w, torch.Tensor) and w == 1:
            return unet(x_t, t, cond)  # guided = y_c, so the rescale changes nothing
        b = x_t.shape[0]
        y_u, y_c = unet(
            torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond.expand(b, -1, -1), cond])
        ).chunk(2)
        w = w[:, None, None, None] if isinstance(w, torch.Tensor) else w
        guided = w * y_c + (1 - w) * y_u
        ratio = y_c.std(dim=(1, 2, 3), keepdim=True) / guided.std(dim=(1, 2, 3), keepdim=True)
        return guided * (phi * ratio + 1 - phi)

    def with_the_library(unet, x_t, t, cond, uncond, w, phi):
        from ldm_lib.guidance import classifier_free_guidance, rescale_guidance

        context = torch.cat([uncond.expand_as(cond), cond])
        y_u, y_c = unet(x_t.repeat(2, 1, 1, 1), t.repeat(2), context).chunk(2)
        return rescale_guidance(classifier_free_guidance(y_u, y_c, w), y_c, phi)

    for answer in (with_lerp_and_population_std, skipping_uncond_at_w_1, with_the_library):
        assert check(NAME, answer) is True, answer.__name__


def test_other_wrong_answers_are_explained():
    def unexpanded_uncond(unet, x_t, t, cond, uncond, w, phi):
        y_u, y_c = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
        return y_u + w * (y_c - y_u)

    with pytest.raises(ExerciseFailure, match="expand uncond to B rows"):
        check(NAME, unexpanded_uncond)

    def single_t(unet, x_t, t, cond, uncond, w, phi):
        context = torch.cat([uncond.expand_as(cond), cond])
        y_u, y_c = unet(torch.cat([x_t, x_t]), t, context).chunk(2)
        return y_u + w * (y_c - y_u)

    with pytest.raises(ExerciseFailure, match="needs t twice"):
        check(NAME, single_t)

    def broadcast_error(unet, x_t, t, cond, uncond, w, phi):
        y_u, y_c = ex12._halves(unet, x_t, t, cond, uncond)
        return y_u + w * (y_c - y_u)  # a (B,) w against (B, C, H, W)

    with pytest.raises(ExerciseFailure, match=r"(?s)raised RuntimeError.*reshape it to \(B, 1, 1, 1\)"):
        check(NAME, broadcast_error)

    def in_place(unet, x_t, t, cond, uncond, w, phi):
        result = EXERCISES[NAME].reference(unet, x_t, t, cond, uncond, w, phi)
        x_t.zero_()
        return result

    with pytest.raises(ExerciseFailure, match="changed its input in place"):
        check(NAME, in_place)


def test_toy_unet_is_per_sample_depends_on_every_input_and_counts_calls():
    unet = ex12.ToyUNet()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *ex12.LATENT, generator=g)
    t = torch.tensor([0, 500, 999])
    c = torch.randn(3, ex12.TOKENS, ex12.WIDTH, generator=g)
    full = unet(x, t, c)
    rows = torch.cat([unet(x[i : i + 1], t[i : i + 1], c[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(full, rows)  # one batch equals row by row: two passes give the same values
    assert unet.calls == 4
    assert not torch.allclose(full, unet(1.1 * x, t, c))
    assert not torch.allclose(full, unet(x, torch.tensor([1, 1, 1]), c))
    assert not torch.allclose(full, unet(x, t, 0.5 * c))
    with pytest.raises(ValueError, match="one timestep per row"):
        unet(x, t[:2], c)
    with pytest.raises(ValueError, match="one context per row"):
        unet(x, t, c[:1])
    assert repr(unet) == "ToyUNet(x_t, t, context)"


@pytest.fixture(scope="module")
def eps_model():
    return LatentDiffusion.load("models/shapes_ldm_eps.safetensors")


@pytest.mark.parametrize(("w", "phi"), [(4.0, 0.0), (7.5, 0.7), (0.0, 0.0)])
def test_reference_is_the_pipelines_guided_model(eps_model, w, phi):
    prompts = ["a large red circle on a white background", "a small blue square on a black background"]
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([900, 300])
    cond, uncond = eps_model.encode_prompts(prompts), eps_model.encode_prompts([""])
    with torch.no_grad():
        pipeline = eps_model.guided_model(prompts, w, phi)(x_t, t)
        mine = EXERCISES[NAME].reference(eps_model.unet, x_t, t, cond, uncond, w, phi)
    torch.testing.assert_close(mine, pipeline, rtol=1e-4, atol=1e-5)


def test_one_scale_per_sample_equals_one_run_per_scale(eps_model):
    prompt = "a large yellow triangle on a gray background"
    scales = torch.tensor([0.0, 3.0, 10.0])
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(1, 4, 8, 8, generator=g).expand(3, -1, -1, -1)
    t = torch.full((3,), 700)
    cond, uncond = eps_model.encode_prompts([prompt] * 3), eps_model.encode_prompts([""])
    with torch.no_grad():
        batched = EXERCISES[NAME].reference(eps_model.unet, x_t, t, cond, uncond, scales, 0.7)
        for i, w in enumerate(scales.tolist()):
            one = eps_model.guided_model([prompt], w, 0.7)(x_t[:1], t[:1])
            torch.testing.assert_close(batched[i : i + 1], one, rtol=1e-4, atol=1e-5)


def test_exercise_module_is_cheap_to_import():
    """Every exercise notebook imports the registry: it must not pull in the pipeline, the trainer,
    matplotlib or transformers."""
    code = (
        "import sys, ldm_lib.exercises.cfg_experiments; "
        "heavy = ('ldm_lib.pipeline', 'ldm_lib.training', 'matplotlib', 'transformers', 'yaml'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
