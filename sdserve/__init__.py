"""sdserve: a multi-tenant inference server for Stable-Diffusion-family models."""

__version__ = "0.1.0"
