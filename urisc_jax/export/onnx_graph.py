"""The inference function as an ONNX graph, converted by jax2onnx from the traced JAX program.

Input "image": float32 [N, 1, H, W], gray in [0, 1]; output "logits" (or "probability" with sigmoid): float32
[N, 1, H, W]. N, H and W are dynamic (H and W multiples of the model's input multiple; the graph does not check).
The training normalization (x - mean) / std is inside the graph unless `normalize=False`. Opset 17.

The model is traced in `platforms.plain_forms(portable=True)`: plain convolutions, transposed convolutions as zero
insertion + convolution, max pools as maxima of reshaped pairs, CASENet's bilinear upsampling as convolutions;
jax2onnx maps each of these to ONNX operators one to one (its own ConvTranspose and MaxPool mappings are wrong for
these NHWC programs in 0.12.5). No hand-written protobuf: the graph is jax2onnx's; only the names of the dynamic
dimensions and the model's metadata are set afterwards.
"""

import contextlib
import io
import logging
import pathlib
from typing import Mapping

import numpy as np

from urisc_jax import outputs, platforms
from urisc_jax.export import graph

OPSET = 17
INPUT_NAME = "image"


def convert(model, variables, *, mean: float, std: float, multiple: int, sigmoid: bool = False,
            normalize: bool = True, metadata: Mapping[str, str] = ()):
  """The onnx.ModelProto of `graph.inference_function` (NCHW)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top
  forward = graph.inference_function(model, variables, mean=mean, std=std, sigmoid=sigmoid, normalize=normalize,
                                     layout="NCHW")
  shape = jax.export.symbolic_shape(f"b, 1, {multiple}*h, {multiple}*w")
  output_name = "probability" if sigmoid else "logits"
  # jax2onnx's plugins for libraries this project does not use fail to import, loudly; onnx_ir warns about shape
  # constants it leaves untyped. Neither concerns the graph (onnx.checker and the tests check it).
  quiet = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
  levels = [logger.level for logger in quiet]
  for logger in quiet:
    logger.setLevel(logging.ERROR)
  try:
    # jax2onnx prints a debug line per convolution.
    with platforms.plain_forms(portable=True), contextlib.redirect_stdout(io.StringIO()):
      proto = to_onnx(forward, [jax.ShapeDtypeStruct(shape, np.float32)], model_name="urisc_jax", opset=OPSET,
                      input_names=[INPUT_NAME], output_names=[output_name])
  finally:
    for logger, level in zip(quiet, levels):
      logger.setLevel(level)
  _name_dynamic_dimensions(proto, multiple)
  for key, value in dict(metadata).items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = str(key), str(value)
  return proto


def _name_dynamic_dimensions(proto, multiple: int) -> None:
  """batch, height, width for the symbolic dimensions jax2onnx names after JAX's expressions (b, 32*h, 32*w)."""
  names = {"b": "batch", f"{multiple}*h": "height", f"{multiple}*w": "width"}
  for value in list(proto.graph.input) + list(proto.graph.output):
    for dim in value.type.tensor_type.shape.dim:
      if dim.dim_param in names:
        dim.dim_param = names[dim.dim_param]


def save(proto, path: str | pathlib.Path) -> int:
  """Checks the graph (onnx.checker) and writes it atomically; returns its size in bytes."""
  import onnx  # pylint: disable=g-import-not-at-top
  onnx.checker.check_model(proto)
  data = proto.SerializeToString()
  outputs.write_bytes(path, data)
  return len(data)


def run(path_or_bytes, x: np.ndarray) -> np.ndarray:
  """Runs an exported graph with onnxruntime on the CPU: x float32 [N, 1, H, W] -> its output."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  source = str(path_or_bytes) if isinstance(path_or_bytes, (str, pathlib.Path)) else path_or_bytes
  session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
  return session.run(None, {session.get_inputs()[0].name: np.asarray(x, np.float32)})[0]
