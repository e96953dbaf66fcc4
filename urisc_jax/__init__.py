"""urisc_jax: cell-membrane segmentation of ultra-high-resolution EM images (U-RISC) in JAX/Flax."""

__version__ = "0.1.0"
