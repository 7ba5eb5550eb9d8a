"""Small, exact or fast-to-train stand-ins used by the notebooks' experiments: they make a concept
measurable in seconds on a CPU (a 2-D Gaussian mixture with closed-form scores, a tiny denoiser)."""
