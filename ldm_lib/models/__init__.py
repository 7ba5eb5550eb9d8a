"""The networks of latent diffusion: the KL autoencoder (``vae``), the text-conditioned UNet
(``unet``), attention with selectable backends (``attention``), CLIP text conditioning (``text``)
and the sizes of the real and course models (``presets``)."""
