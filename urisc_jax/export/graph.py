"""The inference function every export holds: gray in [0, 1] -> membrane logits (or probabilities), batch of any
size, height and width any multiple of the model's input multiple.

    f = inference_function(model, variables, mean=0.57287, std=0.12741, sigmoid=False, layout="NCHW")
    logits = f(x)      # x float32 [N, 1, H, W] ("NCHW") or [N, H, W, 1] ("NHWC") in [0, 1]; same layout out

It is what `inference.tile_forward_function` computes for one tile without test-time augmentation, with the uint8
-> [0, 1] scaling left to the caller (ONNX and bioimage.io consumers scale their own images): x is normalized as
(x - mean) / std inside the graph (unless `normalize=False`, for a bioimage.io package whose rdf.yaml states the
normalization as preprocessing), the model runs in float32 in eval mode (BatchNorm running statistics), and the
logit map comes back in the input's layout.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("NCHW", "NHWC")


def inference_function(model, variables: Any, *, mean: float, std: float, sigmoid: bool = False,
                       normalize: bool = True, layout: str = "NCHW") -> Callable[[jax.Array], jax.Array]:
  """x [N, 1, H, W] or [N, H, W, 1] float32 in [0, 1] -> logits (or sigmoid probabilities), same shape, float32.

  `variables` are closed over, so an exporter stores them as constants of the graph.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  variables = jax.tree.map(lambda v: np.asarray(v, np.float32), variables)

  def forward(x):
    x = x.astype(jnp.float32)
    if layout == "NCHW":
      x = jnp.transpose(x, (0, 2, 3, 1))
    if normalize:
      x = (x - np.float32(mean)) / np.float32(std)
    y = model.apply(variables, x, train=False).astype(jnp.float32)
    if sigmoid:
      y = jax.nn.sigmoid(y)
    return jnp.transpose(y, (0, 3, 1, 2)) if layout == "NCHW" else y

  return forward
