"""What runs where: the one place that chooses, per backend, the form of each operation, the compute dtype and the
compilation cache.

The models are tuned for two very different machines. On XLA:CPU (a laptop, a 2-core CI box) matrix multiplies go to
a fast GEMM while convolutions, and above all their weight gradients, are slow; there the layers use forms measured
faster (`python -m benchmarks.layers`). On a GPU (cuDNN) or a TPU plain convolutions are the fast path, and the CPU
forms would turn them into matrix products over reshaped activations, 6-D transposes and slices that those backends
run slower (and that once crashed XLA:GPU's Triton GEMM fusion). So each such operation is written twice and chosen
by `per_backend` when the program is lowered:

| operation                        | CPU form (XLA:CPU)                                   | CUDA, ROCm, TPU          |
| -------------------------------- | ---------------------------------------------------- | ------------------------ |
| 1x1 convolution                  | one matrix product (`layers.conv2d_cpu`)             | `lax.conv_general_dilated` |
| stride-1 convolution, weight     | swapped: a convolution of the padded output gradient | XLA's own                |
| gradient                         | by the input, batch <= 4 (`cpu_convolution`)         |                          |
| transposed convolution, k-2p = s | its s^2 output phases as one convolution              | the lhs-dilated convolution |
|                                  | (`layers.conv_transpose2d_cpu`)                      | (cuDNN data gradient)    |
| x2 nearest upsampling + 3x3 conv | 2x2 phase kernels at the low resolution              | upsample, then the 3x3 conv |
|                                  | (`layers.upsample2_conv3x3_cpu`)                     |                          |
| XLA flags                        | single convolutions on Eigen, not YNNPACK (`xla_flags`) | none                  |
| compute dtype for "auto"         | float32 (bfloat16 is slower on CPUs)                 | bfloat16                 |

Both forms compute the same function with the same parameters (tests/models_platform_forms_test.py checks values and
gradients, and lowers every model for "cuda" and "tpu" to check that only plain convolutions are left).

`per_backend` uses `jax.lax.platform_dependent`, so the choice follows the platform the program is lowered for, not
the machine that traces it: `jax.jit(f).trace(x).lower(lowering_platforms=("cuda",))` on a CPU-only machine shows
what a GPU compiles.

Exports (`urisc_jax.export`) leave JAX or XLA's platform switch behind, so they trace inside `plain_forms()`: every
`per_backend` operation takes its accelerator form directly; `plain_forms(portable=True)` (ONNX) also restates the
transposed convolutions, max pools and CASENet's bilinear upsampling in forms that ONNX converters map one to one.
"""

import contextlib
import contextvars
import os
import pathlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from urisc_jax import config_checks

ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "float64")
CACHE_ENV = "URISC_JAX_CACHE"


# What a model traces to while it is being exported: "" (normal: per backend), "plain" or "portable" (`plain_forms`).
_EXPORT_FORMS = contextvars.ContextVar("urisc_jax_export_forms", default="")


@contextlib.contextmanager
def plain_forms(*, portable: bool = False) -> Iterator[None]:
  """Within this context, models trace to the plain forms only (`lax.conv_general_dilated`, no
  `lax.platform_dependent` switch): what an exported graph holds.

  An exported program is run by another runtime (onnxruntime, a JAX server on any backend), which must not meet
  the XLA:CPU forms (1x1 convolutions as dot products, phase-form transposed convolutions) nor a `platform_index`
  switch that only XLA resolves. The choice is made at trace time, so the context must hold while the model is
  traced (`jax.export`, `jax2onnx.to_onnx`); already compiled functions are not affected. JAX caches a function's
  trace by the function object and argument shapes, not by this context: trace a function made for the export (as
  `export.graph.inference_function` makes one per call), not one already traced outside the context.

  Args:
    portable: also restate the operations that ONNX converters map wrongly or not at all, in primitives that map
      one to one onto ONNX operators: transposed convolutions as zero insertion (pad + reshape) and an ordinary
      convolution (`layers.zero_inserted_conv_transpose2d`), max pools as maxima over reshaped windows
      (`layers.reshaped_max_pool2d`). Same values (max is exact; the convolution sums the same products).
  """
  token = _EXPORT_FORMS.set("portable" if portable else "plain")
  try:
    yield
  finally:
    _EXPORT_FORMS.reset(token)


def export_forms() -> str:
  """"" normally; "plain" or "portable" inside `plain_forms` (tracing for export)."""
  return _EXPORT_FORMS.get()


def per_backend(*, cpu: Callable, accelerator: Callable) -> Callable:
  """f(*args) that computes `cpu(*args)` where the program is compiled for XLA:CPU and `accelerator(*args)` for
  CUDA, ROCm and TPU. Both must return the same shapes and dtypes (the same values, up to rounding). Inside
  `plain_forms` (tracing for export) it is `accelerator` alone."""

  def chosen(*args):
    if _EXPORT_FORMS.get():
      return accelerator(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=accelerator)

  return chosen


def compute_dtype(name, backend: str | None = None) -> jnp.dtype:
  """The compute dtype a model config names: "auto" is bfloat16 on GPUs and TPUs, float32 on the CPU.

  Parameters, BatchNorm statistics, the loss and the optimizer state stay float32 whatever this is (see
  `models.layers`); only activations and the convolutions' inputs take it.

  Args:
    name: "auto", a dtype name ("float32", "bfloat16", ...) or a dtype.
    backend: the backend "auto" is resolved for; default `jax.default_backend()`.
  """
  if isinstance(name, str) and name == "auto":
    backend = jax.default_backend() if backend is None else backend
    return jnp.dtype(jnp.bfloat16 if backend in ACCELERATOR_BACKENDS else jnp.float32)
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"config.model.dtype={name!r} is not a dtype: choose one of {', '.join(DTYPE_CHOICES)}.") from e


def default_cache_dir() -> pathlib.Path:
  """Where compiled programs are kept unless the config says otherwise: $URISC_JAX_CACHE, else
  $XDG_CACHE_HOME/urisc_jax/jax (~/.cache/urisc_jax/jax)."""
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base).expanduser() / "urisc_jax" / "jax"


def enable_compilation_cache(setting: str) -> pathlib.Path | None:
  """Turns on JAX's persistent compilation cache, so that a rerun or a resume loads its compiled programs instead of
  compiling them again (on a GPU also XLA's per-fusion autotuning results, kept in the same folder).

  Call before the first compilation. Programs that took under a second to compile are not stored (JAX's default).

  Args:
    setting: config.compilation_cache: "default" (`default_cache_dir()`; JAX_COMPILATION_CACHE_DIR, if set, is
      left to JAX), a folder, or "" / "off" to compile every time.

  Returns:
    The cache folder, or None when the cache is off.
  """
  setting = (setting or "").strip()
  if setting in ("", "off"):
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if setting == "default" and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    folder = pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
  else:
    folder = default_cache_dir() if setting == "default" else pathlib.Path(setting).expanduser()
  fix = ("pass a writable folder, e.g. --config.compilation_cache=/tmp/urisc_jax_cache, or '' to turn the cache "
         "off.")
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise config_checks.ConfigError(f"config.compilation_cache: cannot create the cache folder {folder} "
                                    f"({e.strerror}); {fix}") from e
  # An existing folder this user cannot write: JAX would fail (or warn) at the first compiled program instead.
  if not os.access(folder, os.W_OK | os.X_OK):
    raise config_checks.ConfigError(f"config.compilation_cache: the cache folder {folder} is not writable; {fix}")
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_enable_xla_caches", "xla_gpu_per_fusion_autotune_cache_dir")
  return folder
