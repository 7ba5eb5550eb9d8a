"""Training data: the embedded shapes set, Hugging Face datasets and image folders, one pipeline to
model-ready tensors (``images``), and latent caching (``latents``). ``datasets`` is imported only
when a hub dataset is used."""

from .images import (
    DataConfig,
    ImageDataset,
    ImageTransform,
    UnreadableImageError,
    build_dataset,
    check_cacheable,
    draw_flip,
    item_generator,
)
from .latents import (
    LatentCache,
    StaleCacheError,
    cache_latents,
    data_identity,
    load_latent_cache,
    scaled_latents,
    vae_identity,
)

__all__ = [
    "DataConfig",
    "ImageDataset",
    "ImageTransform",
    "LatentCache",
    "StaleCacheError",
    "UnreadableImageError",
    "build_dataset",
    "cache_latents",
    "check_cacheable",
    "data_identity",
    "draw_flip",
    "item_generator",
    "load_latent_cache",
    "scaled_latents",
    "vae_identity",
]
