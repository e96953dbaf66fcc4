"""XLA:CPU options the project runs with, set in the environment before JAX starts its CPU backend.

`python -m urisc_jax.main` sets them before any JAX computation; scripts, notebooks and benchmarks that want them call
`urisc_jax.configure_xla_cpu()` (this module's `apply`) first thing. Importing the package sets nothing.

The pinned jaxlib (0.10.x) routes single convolutions on the CPU to YNNPACK. Its weight gradients are slow for
the wide, few-channel maps of segmentation networks: the gradient of a 3x3 convolution, a correlation of two
full-resolution maps, took 2-4x its forward pass there, against about 2x with XLA's Eigen convolutions. Measured
with `python -m benchmarks.train` at 1024^2, batch 2: the U-Net-ResNet50 step from 0.076 to 0.085 Mpix/s and the
LinkNet-ResNet18 step from 0.209 to 0.255 Mpix/s; `python -m benchmarks.layers --parts=convolutions`: the 3x3 and
7x7 convolutions of a U-Net-ResNet50 step, weight gradients 9.5 s -> 6.2 s, forward 3.8 s -> 3.5 s, input
gradients 3.8 s -> 3.6 s. Other backends ignore the option.

Nothing is changed where XLA_FLAGS already chooses the YNNPACK fusions, or for another jaxlib series (whose flag
set may differ: XLA stops on a flag it does not know).
"""

import importlib.metadata
import os
import sys
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_CHOICE = "-individual_convolution"
EIGEN_CONVOLUTIONS = f"{YNN_FLAG}={EIGEN_CHOICE}"
TESTED_JAXLIB_SERIES = "0.10."


def with_eigen_convolutions(xla_flags: str, jaxlib_version: str) -> str:
  """XLA_FLAGS with single convolutions taken from YNNPACK back to Eigen, unless the user chose or it is unknown."""
  if YNN_FLAG in xla_flags or not jaxlib_version.startswith(TESTED_JAXLIB_SERIES):
    return xla_flags
  return f"{xla_flags} {EIGEN_CONVOLUTIONS}".strip()


def eigen_convolutions(xla_flags: str | None = None) -> bool:
  """Whether XLA_FLAGS (default: this process's) take single CPU convolutions from YNNPACK to Eigen."""
  xla_flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  values = [flag.split("=", 1)[1] for flag in xla_flags.split() if flag.startswith(f"{YNN_FLAG}=")]
  return bool(values) and EIGEN_CHOICE in values[-1].split(",")


def apply() -> str:
  """Adds the project's XLA:CPU options to this process's XLA_FLAGS (the user's own choices are kept).

  Call it before the first JAX computation: JAX's backend reads XLA_FLAGS once, when it starts (lazily, on the first
  computation or device query; importing jax does not start it). Called later, it warns and the flags reach only
  child processes. GPU and TPU backends ignore the options.

  Returns:
    The XLA_FLAGS value this process now has ("" when none).
  """
  try:
    jaxlib_version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return os.environ.get("XLA_FLAGS", "")
  flags = with_eigen_convolutions(os.environ.get("XLA_FLAGS", ""), jaxlib_version)
  if flags != os.environ.get("XLA_FLAGS", "") and _backend_started():
    warnings.warn("urisc_jax.configure_xla_cpu() was called after JAX's backend started: this process keeps its "
                  "XLA flags; call it before the first JAX computation.", RuntimeWarning, stacklevel=2)
  if flags:
    os.environ["XLA_FLAGS"] = flags
  return flags


def _backend_started() -> bool:
  """Whether this process's JAX backend has started (then it no longer reads XLA_FLAGS). Imports nothing."""
  bridge = sys.modules.get("jax._src.xla_bridge")
  started = getattr(bridge, "backends_are_initialized", None)
  return bool(started and started())
