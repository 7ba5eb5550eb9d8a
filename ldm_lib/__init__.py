"""ldm_lib: latent diffusion from scratch.

One concept per module, in the order the course introduces them:

- ``schedules``: betas, alphas_cumprod, SNR, zero-terminal-SNR rescale, timestep spacing
- ``parameterization``: conversions between epsilon, x0 and v
- ``noise``: offset noise and input perturbation
- ``weighting``: min-SNR loss weights
- ``guidance``: classifier-free guidance and guidance rescale
- ``data``: the embedded shapes dataset
- ``exercises``: the checker used by the exercise notebooks
"""

__version__ = "0.1.0"
