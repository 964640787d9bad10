"""harmonica: learned feature caching for Diffusion Transformers."""

__version__ = "0.1.0"
