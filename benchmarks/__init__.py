"""Reproducible speed and memory measurements; each prints one JSON object per line (`python -m benchmarks.<name>`).

Every benchmark runs with the project's XLA:CPU options, as `python -m urisc_jax.main` does: they are set here, when
`python -m benchmarks.<name>` imports this package, before anything starts JAX's backend.
"""

from urisc_jax import xla_flags

xla_flags.apply()
