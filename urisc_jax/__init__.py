"""urisc_jax: cell-membrane segmentation of ultra-high-resolution EM images (U-RISC) in JAX/Flax.

Importing the package changes no global state. `python -m urisc_jax.main` sets the project's XLA:CPU options before
JAX starts; a script that wants them calls `urisc_jax.configure_xla_cpu()` before its first JAX computation.
"""

from urisc_jax.xla_flags import apply as configure_xla_cpu

__version__ = "0.1.0"
