r"""The classifier-free guidance panel of notebook 12, as plain functions and one widget builder.

A widget's callback is hard to test where it lives: nbval runs a notebook's cells but never moves
a slider. So the panel's work is done by functions that take the panel's values and can be called
(and unit-tested) without any widget:

- :func:`check_settings`: validate prompt, guidance scale :math:`w`, guidance rescale
  :math:`\phi`, sampler, steps and seed, with a message that names the bad value;
- :func:`generate_images` / :func:`generate_grid`: those values in, the images (a tensor) or
  the panel's picture (a PIL row of them) out, from
  :meth:`ldm_lib.pipeline.LatentDiffusion.generate`, i.e.
  :math:`\hat y = y_u + w\,(y_c - y_u)` (Ho & Salimans 2022, arXiv 2207.12598), then the rescale
  :math:`\phi\,\hat y\,\mathrm{std}(y_c)/\mathrm{std}(\hat y) + (1-\phi)\,\hat y` (Lin et al. 2023,
  arXiv 2305.08891), then the sampler's step;
- :func:`load_model`: a committed model by name (``"shapes_ldm_eps"``) or a path, loaded once and
  cached, so moving a slider does not reload it.

:func:`cfg_panel` builds the ipywidgets panel (model, prompt, guidance, rescale, sampler, steps,
seed, and an image) wired to those functions, and renders it once when built, so a notebook run by
nbval exercises the callback. The image is an ``ipywidgets.Image`` holding PNG bytes, with the CSS
class ``ldm-cfg-image`` (the guidance slider has ``ldm-cfg-guidance``, the status line under the
image ``ldm-cfg-status``): a browser test finds them by those classes and sees the image change
when the slider moves (``tests/test_browser_widgets.py``).
"""

from __future__ import annotations

import functools
import html
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._checks import check_choice, check_number
from .pipeline import REPO_ROOT, LatentDiffusion, resolve_path
from .samplers import SAMPLERS

if TYPE_CHECKING:  # ipywidgets is imported when a panel is built, not when the module is
    import ipywidgets
    from PIL import Image

MODELS_DIR = REPO_ROOT / "models"
DEFAULT_MODEL = "shapes_ldm_eps"
DEFAULT_PROMPT = "a large red circle on a white background"
MAX_STEPS = 100  # the panel's slider stops at 50; more is allowed from code, not a thousand
MAX_IMAGES = 16
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer
# CSS classes of the image and of the guidance slider, for a browser test to find them.
IMAGE_CLASS = "ldm-cfg-image"
GUIDANCE_CLASS = "ldm-cfg-guidance"
STATUS_CLASS = "ldm-cfg-status"


def committed_models(models_dir: str | Path = MODELS_DIR) -> dict[str, Path]:
    """The text-to-image models committed in ``models/``: ``{"shapes_ldm_eps": path, ...}``, sorted
    with ``shapes_ldm_eps`` (the reference model) first."""
    paths = sorted(Path(models_dir).glob("shapes_ldm_*.safetensors"))
    names = {p.stem: p for p in paths}
    return dict(sorted(names.items(), key=lambda item: (item[0] != DEFAULT_MODEL, item[0])))


@functools.lru_cache(maxsize=8)
def _load(path: str) -> LatentDiffusion:
    return LatentDiffusion.load(path)


def load_model(model: str | Path = DEFAULT_MODEL) -> LatentDiffusion:
    """A model by committed name (a key of :func:`committed_models`) or by path, loaded once.

    Repeated calls with the same model return the same object (the cache holds 8 models).
    """
    if not isinstance(model, (str, Path)):
        raise ValueError(f"model must be a committed model's name or a path, got {type(model).__name__}")
    models = committed_models()
    if isinstance(model, str) and model in models:
        path = models[model]
    else:
        try:
            path = resolve_path(model)
        except FileNotFoundError:
            raise ValueError(
                f"model={str(model)!r} is neither a committed model ({', '.join(models)}) nor a file"
            ) from None
    return _load(str(Path(path).resolve()))


@dataclass(frozen=True)
class PanelSettings:
    """The panel's values, checked (see :func:`check_settings`)."""

    prompt: str
    guidance_scale: float
    guidance_rescale: float
    sampler: str
    steps: int
    seed: int
    num_images: int = 4


def check_settings(
    prompt: Any,
    guidance_scale: Any,
    guidance_rescale: Any,
    sampler: Any,
    steps: Any,
    seed: Any,
    num_images: Any = 4,
) -> PanelSettings:
    r"""Validate the panel's values and return them as :class:`PanelSettings`.

    - ``prompt``: a non-empty string (leading and trailing spaces dropped);
    - ``guidance_scale`` :math:`w \ge 0`; ``guidance_rescale`` :math:`\phi \in [0, 1]`;
    - ``sampler``: a key of :data:`ldm_lib.samplers.SAMPLERS`;
    - ``steps``: an integer in ``[1, 100]``; ``seed``: an integer ``>= 0``; ``num_images`` in ``[1, 16]``.

    Raises ``ValueError`` naming the option, the value and what is allowed.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    if not prompt.strip():
        raise ValueError("prompt is empty; type a caption, e.g. " + repr(DEFAULT_PROMPT))
    check_number("guidance_scale", guidance_scale, low=0.0)
    check_number("guidance_rescale", guidance_rescale, low=0.0, high=1.0)
    check_choice("sampler", sampler, tuple(SAMPLERS))
    check_number("steps", steps, low=1, high=MAX_STEPS, integer=True)
    check_number("seed", seed, low=0, high=MAX_SEED, integer=True)
    check_number("num_images", num_images, low=1, high=MAX_IMAGES, integer=True)
    return PanelSettings(
        prompt.strip(), float(guidance_scale), float(guidance_rescale), sampler, steps, seed, num_images
    )


def sampling_spacing(model: LatentDiffusion) -> str:
    """The timestep spacing the model's config samples with (``"trailing"`` when it names none)."""
    return ((model.config or {}).get("logging") or {}).get("validation_spacing", "trailing")


def generate_images(
    model: LatentDiffusion,
    prompt: str,
    guidance_scale: float,
    guidance_rescale: float,
    sampler: str,
    steps: int,
    seed: int,
    num_images: int = 4,
) -> torch.Tensor:
    """``num_images`` images (B, 3, H, W) in [-1, 1] of ``prompt``, seeds ``seed, seed + 1, ...``.

    The values are checked first (:func:`check_settings`, before any work); the images come from
    :meth:`LatentDiffusion.generate` with the model's own timestep spacing. The same values give
    the same images.
    """
    if not isinstance(model, LatentDiffusion):
        raise ValueError(f"model must be a LatentDiffusion (see load_model), got {type(model).__name__}")
    s = check_settings(prompt, guidance_scale, guidance_rescale, sampler, steps, seed, num_images)
    return model.generate(
        [s.prompt] * s.num_images,
        seeds=[s.seed + i for i in range(s.num_images)],
        sampler=s.sampler,
        num_inference_steps=s.steps,
        guidance_scale=s.guidance_scale,
        guidance_rescale=s.guidance_rescale,
        spacing=sampling_spacing(model),
    )


def generate_grid(
    model: LatentDiffusion,
    prompt: str,
    guidance_scale: float,
    guidance_rescale: float,
    sampler: str,
    steps: int,
    seed: int,
    num_images: int = 4,
    scale: int = 4,
) -> Image.Image:
    """The panel's callback without the panel: :func:`generate_images` as one PIL row, each image
    upscaled ``scale`` times (nearest) by :func:`ldm_lib.viz.image_grid`."""
    from .viz import image_grid

    check_number("scale", scale, low=1, high=16, integer=True)
    images = generate_images(
        model, prompt, guidance_scale, guidance_rescale, sampler, steps, seed, num_images
    )
    return image_grid(images, ncols=len(images), scale=scale)


def png_bytes(image: Image.Image) -> bytes:
    """A PIL image encoded as PNG (what ``ipywidgets.Image(format="png")`` displays)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def adherence_summary(grid_images: Any, prompt: str) -> str:
    """``"all four attributes right in k of n images"`` for a prompt of the shapes grammar, else ``""``.

    ``grid_images``: the (B, 3, H, W) images in [-1, 1]; scored by :func:`ldm_lib.eval.adherence`.
    """
    from .data.shapes import parse_caption
    from .eval import adherence

    try:
        parse_caption(prompt)
    except ValueError:
        return ""
    report = adherence(grid_images, [prompt] * len(grid_images))
    return f"all four attributes right in {round(report.all * report.n)} of {report.n} images"


class CFGPanel:
    """The widgets of the guidance panel and the callback that redraws its image.

    ``controls``: the input widgets by name (``model``, ``prompt``, ``guidance_scale``,
    ``guidance_rescale``, ``sampler``, ``steps``, ``seed``); ``image``: the ``ipywidgets.Image``;
    ``status``: an ``HTML`` line (timing, adherence, or the error of a bad value); ``widget``: the
    whole panel, to display. Changing any control calls :meth:`render`.
    """

    def __init__(self, controls: dict[str, ipywidgets.Widget], num_images: int = 4) -> None:
        import ipywidgets as widgets

        self.controls = controls
        self.num_images = num_images
        self.image = widgets.Image(format="png", layout=widgets.Layout(width=f"{128 * num_images}px"))
        self.image.add_class(IMAGE_CLASS)
        self.status = widgets.HTML()
        self.status.add_class(STATUS_CLASS)
        self.renders = 0  # how many grids were drawn (a test can count them)
        self.error: str | None = None  # the last bad value's message, None after a good render
        self.grid: Image.Image | None = None
        left = widgets.VBox([controls[k] for k in ("model", "prompt", "guidance_scale", "guidance_rescale")])
        right = widgets.VBox([controls[k] for k in ("sampler", "steps", "seed")])
        self.widget = widgets.VBox([widgets.HBox([left, right]), self.image, self.status])
        for control in controls.values():
            control.observe(self._changed, names="value")

    def values(self) -> dict[str, Any]:
        """The controls' current values, by name."""
        return {name: control.value for name, control in self.controls.items()}

    def _changed(self, change: dict) -> None:
        self.render(raise_errors=False)

    def render(self, raise_errors: bool = True) -> Image.Image | None:
        """Draw the grid for the current values into the image widget and return it.

        With ``raise_errors=False`` (what a slider callback uses: an exception in a callback is
        lost in the browser's log) a bad value is shown in ``status`` and the image is kept.
        """
        values = self.values()
        start = time.perf_counter()
        settings = dict(values, num_images=self.num_images)
        del settings["model"]
        try:
            images = generate_images(load_model(values["model"]), **settings)
        except ValueError as error:
            self.error = str(error)
            self.status.value = f'<span style="color:#b00">{html.escape(self.error)}</span>'
            if raise_errors:
                raise
            return None
        from .viz import image_grid

        self.grid = image_grid(images, ncols=len(images), scale=4)
        self.image.value = png_bytes(self.grid)
        self.renders += 1
        self.error = None
        seconds = time.perf_counter() - start
        summary = adherence_summary(images, values["prompt"].strip())
        self.status.value = html.escape(
            f"{values['model']}: w = {values['guidance_scale']:g}, phi = {values['guidance_rescale']:g}, "
            f"{values['steps']} {values['sampler']} steps, seeds {values['seed']}-"
            f"{values['seed'] + len(images) - 1}; {seconds:.1f} s" + (f"; {summary}" if summary else "")
        )
        return self.grid


def cfg_panel(
    model: str = DEFAULT_MODEL,
    prompt: str = DEFAULT_PROMPT,
    guidance_scale: float = 4.0,
    guidance_rescale: float = 0.0,
    sampler: str = "ddim",
    steps: int = 20,
    seed: int = 0,
    num_images: int = 4,
) -> CFGPanel:
    """Build the guidance panel and draw its first grid (so it runs once under nbval too).

    Controls: a Dropdown of the committed models, a Text prompt, FloatSliders for the guidance
    scale (0 to 20) and the rescale (0 to 1), a Dropdown of :data:`ldm_lib.samplers.SAMPLERS`, an
    IntSlider of steps (1 to 50) and an IntText seed. Sliders update when released (or on each
    arrow key press), not while dragged. Bad initial values raise ``ValueError``.
    """
    import ipywidgets as widgets

    check_settings(prompt, guidance_scale, guidance_rescale, sampler, steps, seed, num_images)
    models = list(committed_models())
    if model not in models:
        raise ValueError(f"model={model!r} is not a committed model; expected one of {', '.join(models)}")
    style = {"description_width": "110px"}
    wide = widgets.Layout(width="420px")
    controls = {
        "model": widgets.Dropdown(options=models, value=model, description="model", style=style, layout=wide),
        "prompt": widgets.Text(
            value=prompt, description="prompt", continuous_update=False, style=style, layout=wide
        ),
        "guidance_scale": widgets.FloatSlider(
            value=guidance_scale,
            min=0.0,
            max=20.0,
            step=0.5,
            description="guidance w",
            continuous_update=False,
            style=style,
            layout=wide,
        ),
        "guidance_rescale": widgets.FloatSlider(
            value=guidance_rescale,
            min=0.0,
            max=1.0,
            step=0.05,
            description="rescale phi",
            continuous_update=False,
            style=style,
            layout=wide,
        ),
        "sampler": widgets.Dropdown(options=list(SAMPLERS), value=sampler, description="sampler"),
        "steps": widgets.IntSlider(value=steps, min=1, max=50, description="steps", continuous_update=False),
        "seed": widgets.IntText(value=seed, description="seed"),
    }
    controls["guidance_scale"].add_class(GUIDANCE_CLASS)
    panel = CFGPanel(controls, num_images=num_images)
    panel.render(raise_errors=True)
    return panel


__all__ = [
    "CFGPanel",
    "DEFAULT_MODEL",
    "DEFAULT_PROMPT",
    "GUIDANCE_CLASS",
    "IMAGE_CLASS",
    "PanelSettings",
    "adherence_summary",
    "cfg_panel",
    "check_settings",
    "committed_models",
    "generate_grid",
    "generate_images",
    "load_model",
    "png_bytes",
    "sampling_spacing",
]
