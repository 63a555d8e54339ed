"""jdjax: JAX/Flax reimplementations of JD.com research methods."""

__version__ = "0.1.0"
