"""urisc_jax: cell-membrane segmentation of ultra-high-resolution EM images (U-RISC) in JAX/Flax."""

from urisc_jax import xla_flags

# Before anything imports jax and runs a computation: the CPU backend reads XLA_FLAGS once, when it starts.
xla_flags.apply()

__version__ = "0.1.0"
