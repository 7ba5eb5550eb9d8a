"""Evaluation of generated shapes-set images: prompt adherence and brightness.

- **Prompt adherence** (:func:`adherence`, :func:`predict_attributes`): the fraction of generated
  images whose size, colour, shape and background match their prompt. It is the score of the
  classifier-free guidance experiments (Ho & Salimans 2022, arXiv 2207.12598): does a higher
  guidance scale make the model follow the prompt? Colours and background are read with the public
  palette; shape and size by a small CNN shipped with the library (:mod:`.classifier`).
- **Brightness** (:func:`brightness`, :func:`brightness_stats`, :func:`background_brightness`):
  mean luma of images and of their backgrounds. It is the score of the offset-noise and
  zero-terminal-SNR experiments (Guttenberg 2023, "Diffusion with Offset Noise"; Lin et al. 2023,
  arXiv 2305.08891): a model trained with a schedule that leaks signal at t = T cannot generate the
  pure black and white backgrounds its prompts ask for.

Images are float tensors ``(B, 3, H, W)`` in ``[-1, 1]``, as ``ldm_lib.data.shapes.shapes_tensors``
returns them and as a VAE decodes them.
"""

from .adherence import AdherenceReport, adherence, nearest_color, predict_attributes
from .brightness import (
    background_brightness,
    border_brightness,
    brightness,
    brightness_stats,
    luma,
)
from .classifier import ShapeClassifier, classifier_metadata, load_classifier, segment, soft_mask

__all__ = [
    "AdherenceReport",
    "ShapeClassifier",
    "adherence",
    "background_brightness",
    "border_brightness",
    "brightness",
    "brightness_stats",
    "classifier_metadata",
    "load_classifier",
    "luma",
    "nearest_color",
    "predict_attributes",
    "segment",
    "soft_mask",
]
