"""The guidance panel's callbacks (ldm_lib.widgets) as plain functions: validation, the grid they
return, the model cache, and the ipywidgets panel driven from Python (nbval never moves a slider;
tests/test_browser_widgets.py does it in a real browser)."""

import io

import ipywidgets as widgets
import pytest
import torch
from PIL import Image

from ldm_lib import widgets as lw
from ldm_lib.pipeline import LatentDiffusion
from ldm_lib.samplers import SAMPLERS

PROMPT = "a large red circle on a white background"
FAST = dict(sampler="ddim", steps=4, seed=3)  # a few steps: these tests check wiring, not quality


@pytest.fixture(scope="module")
def eps_model():
    return lw.load_model("shapes_ldm_eps")


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(bytes(data)))
    image.load()
    return image


def test_committed_models_lists_every_model_with_eps_first():
    models = lw.committed_models()
    assert list(models)[0] == "shapes_ldm_eps"
    variants = ("eps", "v", "eps_offset", "eps_minsnr", "v_ztsnr", "eps_ip")
    assert set(models) == {f"shapes_ldm_{n}" for n in variants}
    assert all(p.is_file() and p.suffix == ".safetensors" for p in models.values())


def test_load_model_caches_by_name_and_path(eps_model):
    assert isinstance(eps_model, LatentDiffusion) and eps_model.prediction_type == "epsilon"
    assert lw.load_model("shapes_ldm_eps") is eps_model
    assert lw.load_model(lw.committed_models()["shapes_ldm_eps"]) is eps_model
    assert lw.load_model("models/shapes_ldm_eps.safetensors") is eps_model
    with pytest.raises(ValueError, match="neither a committed model"):
        lw.load_model("shapes_ldm_nope")
    with pytest.raises(ValueError, match="name or a path"):
        lw.load_model(3)


def test_check_settings_accepts_good_values_and_strips_the_prompt():
    s = lw.check_settings(f"  {PROMPT} ", 7, 0.7, "euler", 10, 0, 2)
    assert s == lw.PanelSettings(PROMPT, 7.0, 0.7, "euler", 10, 0, 2)
    assert isinstance(s.guidance_scale, float)
    for sampler in SAMPLERS:
        assert lw.check_settings(PROMPT, 0.0, 1.0, sampler, 1, 2**40).sampler == sampler


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": None}, "prompt must be a string"),
        ({"guidance_scale": -1.0}, r"guidance_scale=-1.0 is out of range"),
        ({"guidance_scale": float("nan")}, "guidance_scale=nan must be finite"),
        ({"guidance_scale": "7"}, "guidance_scale='7' must be a number"),
        ({"guidance_rescale": 1.5}, r"guidance_rescale=1.5 is out of range; allowed: \[0.0, 1.0\]"),
        ({"guidance_rescale": -0.1}, "guidance_rescale=-0.1 is out of range"),
        ({"sampler": "plms"}, "sampler='plms' is not supported; expected one of 'ddim'"),
        ({"steps": 0}, "steps=0 is out of range"),
        ({"steps": 101}, "steps=101 is out of range"),
        ({"steps": 2.5}, "steps=2.5 must be an integer"),
        ({"steps": True}, "steps=True must be an integer"),
        ({"seed": -1}, "seed=-1 is out of range"),
        ({"seed": 1.0}, "seed=1.0 must be an integer"),
        ({"num_images": 0}, "num_images=0 is out of range"),
        ({"num_images": 17}, "num_images=17 is out of range"),
    ],
)
def test_check_settings_names_each_bad_value(changes, message):
    values = dict(prompt=PROMPT, guidance_scale=4.0, guidance_rescale=0.0, sampler="ddim", steps=20, seed=0)
    values.update(changes)
    with pytest.raises(ValueError, match=message):
        lw.check_settings(**values)


def test_generate_images_is_the_pipeline_with_the_models_spacing(eps_model):
    images = lw.generate_images(eps_model, PROMPT, 5.0, 0.0, num_images=2, **FAST)
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    direct = eps_model.generate(
        [PROMPT] * 2,
        seeds=[3, 4],
        sampler="ddim",
        num_inference_steps=4,
        guidance_scale=5.0,
        spacing=eps_model.config["logging"]["validation_spacing"],
    )
    torch.testing.assert_close(images, direct)
    assert lw.sampling_spacing(eps_model) == "trailing"


def test_generate_grid_returns_a_deterministic_png_row_that_follows_the_values(eps_model):
    grid = lw.generate_grid(eps_model, PROMPT, 4.0, 0.0, num_images=3, scale=2, **FAST)
    assert isinstance(grid, Image.Image) and grid.size == (3 * 32 * 2, 32 * 2)
    again = lw.generate_grid(eps_model, PROMPT, 4.0, 0.0, num_images=3, scale=2, **FAST)
    assert lw.png_bytes(grid) == lw.png_bytes(again)  # same values, same picture
    assert _png(lw.png_bytes(grid)).size == grid.size
    stronger = lw.generate_grid(eps_model, PROMPT, 12.0, 0.0, num_images=3, scale=2, **FAST)
    rescaled = lw.generate_grid(eps_model, PROMPT, 12.0, 1.0, num_images=3, scale=2, **FAST)
    other_seed = lw.generate_grid(
        eps_model, PROMPT, 4.0, 0.0, num_images=3, scale=2, sampler="ddim", steps=4, seed=9
    )
    pictures = {lw.png_bytes(g) for g in (grid, stronger, rescaled, other_seed)}
    assert len(pictures) == 4  # guidance, rescale and seed each change the grid


def test_bad_values_fail_before_any_sampling(eps_model, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("generate must not run for bad values")

    monkeypatch.setattr(eps_model, "generate", no_sampling)
    with pytest.raises(ValueError, match="guidance_rescale"):
        lw.generate_grid(eps_model, PROMPT, 4.0, 2.0, **FAST)
    with pytest.raises(ValueError, match="scale=0 is out of range"):
        lw.generate_grid(eps_model, PROMPT, 4.0, 0.0, scale=0, **FAST)
    with pytest.raises(ValueError, match="must be a LatentDiffusion"):
        lw.generate_grid("shapes_ldm_eps", PROMPT, 4.0, 0.0, **FAST)


def test_adherence_summary_only_for_prompts_of_the_grammar():
    images = torch.full((2, 3, 32, 32), 1.0)  # all white: a white background and no shape
    assert lw.adherence_summary(images, PROMPT) == "all four attributes right in 0 of 2 images"
    assert lw.adherence_summary(images, "a cat") == ""


@pytest.fixture(scope="module")
def panel():
    return lw.cfg_panel(prompt=PROMPT, guidance_scale=4.0, steps=4, seed=3, num_images=2)


def test_panel_has_every_control_and_renders_once_when_built(panel):
    c = panel.controls
    assert isinstance(c["model"], widgets.Dropdown) and list(c["model"].options) == list(
        lw.committed_models()
    )
    assert isinstance(c["prompt"], widgets.Text) and c["prompt"].value == PROMPT
    assert isinstance(c["guidance_scale"], widgets.FloatSlider) and (
        c["guidance_scale"].min,
        c["guidance_scale"].max,
    ) == (0, 20)
    assert isinstance(c["guidance_rescale"], widgets.FloatSlider) and c["guidance_rescale"].max == 1
    assert isinstance(c["sampler"], widgets.Dropdown) and list(c["sampler"].options) == list(SAMPLERS)
    assert isinstance(c["steps"], widgets.IntSlider) and isinstance(c["seed"], widgets.IntText)
    assert panel.renders == 1 and panel.error is None
    assert isinstance(panel.image, widgets.Image) and panel.image.format == "png"
    assert _png(panel.image.value).size == (2 * 32 * 4, 32 * 4)
    # stable CSS classes: the browser test finds the image and the slider by them
    assert lw.IMAGE_CLASS in panel.image._dom_classes
    assert lw.GUIDANCE_CLASS in c["guidance_scale"]._dom_classes
    assert "2 of 2" in panel.status.value and "w = 4" in panel.status.value
    assert isinstance(panel.widget, widgets.VBox) and panel.image in panel.widget.children


def test_moving_the_guidance_slider_redraws_the_image(panel):
    before, renders = bytes(panel.image.value), panel.renders
    panel.controls["guidance_scale"].value = 10.0  # what a slider move does, from Python
    assert panel.renders == renders + 1 and bytes(panel.image.value) != before
    assert "w = 10" in panel.status.value
    expected = lw.generate_grid(lw.load_model("shapes_ldm_eps"), PROMPT, 10.0, 0.0, num_images=2, **FAST)
    assert bytes(panel.image.value) == lw.png_bytes(expected)  # the callback is generate_grid
    panel.controls["guidance_scale"].value = 4.0


def test_a_bad_value_in_the_panel_is_shown_not_raised(panel):
    before, renders = bytes(panel.image.value), panel.renders
    panel.controls["prompt"].value = "   "
    assert panel.renders == renders and bytes(panel.image.value) == before
    assert panel.error is not None and "prompt is empty" in panel.status.value
    panel.controls["prompt"].value = PROMPT
    assert panel.error is None and panel.renders == renders + 1
    with pytest.raises(ValueError, match="prompt is empty"):  # an explicit render does raise
        panel.controls["prompt"].value = ""
        panel.render()
    panel.controls["prompt"].value = PROMPT


def test_switching_model_and_sampler_uses_the_cache(panel):
    panel.controls["model"].value = "shapes_ldm_v"
    assert "shapes_ldm_v:" in panel.status.value
    assert lw.load_model("shapes_ldm_v") is lw.load_model("shapes_ldm_v")
    panel.controls["sampler"].value = "euler"
    assert "euler" in panel.status.value and panel.error is None
    panel.controls["model"].value = "shapes_ldm_eps"
    panel.controls["sampler"].value = "ddim"


def test_cfg_panel_rejects_bad_initial_values():
    with pytest.raises(ValueError, match="not a committed model"):
        lw.cfg_panel(model="shapes_ldm_nope")
    with pytest.raises(ValueError, match="guidance_scale"):
        lw.cfg_panel(guidance_scale=-2.0)
