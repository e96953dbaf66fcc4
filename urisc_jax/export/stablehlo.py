"""A serialized `jax.export` module of the inference function, for serving with JAX on any backend.

Calling convention (README, "Use a trained model elsewhere"):

    exported = jax.export.deserialize(pathlib.Path("model.stablehlo").read_bytes())
    logits = exported.call(x)   # x float32 [N, H, W, 1], gray in [0, 1]; H, W multiples of the input multiple

N, H and W are symbolic (`b, m*h, m*w` with m the model's input multiple): one module serves every batch and tile
size; the caller's jax compiles it for its backend. The weights are constants inside the module. It is lowered for
cpu, cuda and tpu with the plain forms only (`platforms.plain_forms`): no XLA:CPU-only rewrite, no platform switch.
"""

import pathlib

import jax
import numpy as np

from urisc_jax import outputs, platforms
from urisc_jax.export import graph

PLATFORMS = ("cpu", "cuda", "tpu")


def export_module(model, variables, *, mean: float, std: float, multiple: int, sigmoid: bool = False,
                  lowering_platforms=PLATFORMS) -> jax.export.Exported:
  """The `jax.export.Exported` of `graph.inference_function` (NHWC), symbolic in batch, height and width."""
  forward = graph.inference_function(model, variables, mean=mean, std=std, sigmoid=sigmoid, layout="NHWC")
  shape = jax.export.symbolic_shape(f"b, {multiple}*h, {multiple}*w, 1")
  with platforms.plain_forms():
    return jax.export.export(jax.jit(forward), platforms=lowering_platforms)(
        jax.ShapeDtypeStruct(shape, np.float32))


def save(exported: jax.export.Exported, path: str | pathlib.Path) -> int:
  """Writes the serialized module atomically; returns its size in bytes."""
  data = exported.serialize()
  outputs.write_bytes(path, data)
  return len(data)


def load(path: str | pathlib.Path) -> jax.export.Exported:
  """The module written by `save`; call it with `.call(x)`."""
  return jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
