"""cgtools: compositional generalisation toolkit (RHM data, discrete diffusion, analyses)."""

__version__ = "0.1.0"
