"""Stable Diffusion weight compatibility: load SD 1.x/2.x UNet and VAE weights into ``ldm_lib``'s models,
and write ours back.

- ``diffusers_format``: folders with ``config.json`` + ``diffusion_pytorch_model.safetensors`` (what
  ``save_pretrained``/``from_pretrained`` use): :func:`load_unet`, :func:`load_vae`, :func:`save_unet`,
  :func:`save_vae`, and the config translations.
- ``single_file``: the original CompVis/Stability checkpoints (``.safetensors`` or ``.ckpt``), mapped by
  rule from the config: :func:`load_single_file`, :func:`load_unet_single_file`,
  :func:`load_vae_single_file`, :func:`save_single_file`.
- ``keys``: safe reading (never unpickling arbitrary objects) and strict key checking, shared by both.
"""

from .diffusers_format import (
    load_unet,
    load_vae,
    save_unet,
    save_vae,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
)
from .keys import CheckpointError, KeyMismatchError, read_state_dict
from .single_file import (
    load_single_file,
    load_unet_single_file,
    load_vae_single_file,
    save_single_file,
    to_single_file_state_dict,
    unet_key_map,
    vae_key_map,
)

__all__ = [
    "CheckpointError",
    "KeyMismatchError",
    "load_single_file",
    "load_unet",
    "load_unet_single_file",
    "load_vae",
    "load_vae_single_file",
    "read_state_dict",
    "save_single_file",
    "save_unet",
    "save_vae",
    "to_single_file_state_dict",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "unet_key_map",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
    "vae_key_map",
]
