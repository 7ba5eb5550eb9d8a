"""ldm_lib: latent diffusion from scratch.

One concept per module, in the order the course introduces them:

- ``schedules``: betas, alphas_cumprod, SNR, zero-terminal-SNR rescale, timestep spacing
- ``parameterization``: conversions between epsilon, x0 and v
- ``noise``: offset noise and input perturbation
- ``weighting``: min-SNR loss weights
- ``guidance``: classifier-free guidance and guidance rescale
- ``samplers``: DDIM
- ``models``: the VAE, the UNet and its attention backends, the CLIP text encoder, presets
- ``interop``: Stable Diffusion / diffusers weights in and out
- ``data``: the embedded shapes dataset, hub datasets and image folders, latent caching
- ``training``: the trainer (config, both stages, checkpoints, EMA, DDP); CLI ``python -m ldm_lib.train``
- ``pipeline``: a trained model and generation with CFG; CLI ``python -m ldm_lib.sample``
- ``eval``: prompt adherence and brightness on the shapes set
- ``exercises``: the checker used by the exercise notebooks
"""

__version__ = "0.1.0"
