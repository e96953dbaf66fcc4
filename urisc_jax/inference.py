"""Whole-image prediction by sliding window: overlapping tiles, blended logits, optional flip/transpose TTA.

Tiles of a fixed size go through one jitted forward in fixed-size batches (no recompilation whatever the image),
their logits are weighted (Gaussian, sigma = tile / 8, as nnU-Net, or constant) and summed into an accumulator, and
the sum is divided by the summed weights. The last row and column of tiles sit flush with the border.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from urisc_jax import sharding
from urisc_jax.data import crops
from urisc_jax.data.normalize import normalize

TileForward = Callable[[np.ndarray], np.ndarray]

# The 8 elements of the square's symmetry group as (transpose, flip rows, flip cols); the first k form the k-view TTA.
_VIEWS = ((False, False, False), (False, False, True), (False, True, False), (False, True, True),
          (True, False, False), (True, False, True), (True, True, False), (True, True, True))
TTA_CHOICES = (1, 2, 4, 8)


def view(x: jax.Array, transpose: bool, flip_rows: bool, flip_cols: bool) -> jax.Array:
  """Applies one symmetry to a batch [N, H, W, C]: optional transpose, then flips."""
  if transpose:
    x = jnp.swapaxes(x, 1, 2)
  if flip_rows:
    x = x[:, ::-1]
  if flip_cols:
    x = x[:, :, ::-1]
  return x


def unview(x: jax.Array, transpose: bool, flip_rows: bool, flip_cols: bool) -> jax.Array:
  """Inverse of `view`: undo the flips, then the transpose."""
  if flip_cols:
    x = x[:, :, ::-1]
  if flip_rows:
    x = x[:, ::-1]
  if transpose:
    x = jnp.swapaxes(x, 1, 2)
  return x


def make_tile_forward(model, variables, *, mean: float, std: float, tta: int = 1,
                      mesh: jax.sharding.Mesh | None = None) -> TileForward:
  """A jitted function: uint8 tiles [B, T, T, 1] -> mean logit over `tta` views, float32 [B, T, T].

  With a mesh, the tile batch is split over its `data` axis (B must be divisible by its size).
  """
  if tta not in TTA_CHOICES:
    raise ValueError(f"config.predict.tta must be one of {TTA_CHOICES}, got {tta}.")

  def forward(tiles):
    x = normalize(tiles, mean=mean, std=std)
    total = 0.0
    for v in _VIEWS[:tta]:
      logits = model.apply(variables, view(x, *v), train=False)
      total = total + unview(logits, *v)[..., 0].astype(jnp.float32)
    return total / tta

  if mesh is None:
    return jax.jit(forward)
  in_sharding = sharding.batch_sharding(mesh)
  jitted = jax.jit(forward, in_shardings=in_sharding)
  return lambda tiles: jitted(jax.device_put(tiles, in_sharding))


@functools.lru_cache(maxsize=8)
def blend_weights(tile: int, mode: str) -> np.ndarray:
  """Per-pixel weight of a tile's logits, float32 [tile, tile]: 'gaussian' (sigma = tile / 8) or 'constant'."""
  if mode == "constant":
    return np.ones((tile, tile), np.float32)
  if mode != "gaussian":
    raise ValueError(f"config.predict.blend must be 'gaussian' or 'constant', got {mode!r}.")
  centre = (tile - 1) / 2
  sigma = tile / 8
  profile = np.exp(-0.5 * ((np.arange(tile) - centre) / sigma) ** 2)
  weights = np.outer(profile, profile)
  weights /= weights.max()
  # Border pixels of a tile are covered by no other tile at an image's edge: keep their weight positive.
  return np.maximum(weights, weights[weights > 0].min(), dtype=np.float32).astype(np.float32)


def predict_logits(
    forward: TileForward,
    image: np.ndarray,
    *,
    tile: int,
    step: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    out: np.ndarray | None = None,
    progress: bool = False,
) -> np.ndarray:
  """Blended logits of a whole image.

  Args:
    forward: uint8 [B, T, T, 1] -> float32 logits [B, T, T], e.g. from `make_tile_forward`.
    image: uint8 gray [H, W] (a numpy array or memory map).
    tile: tile size T (a multiple of the model's stride, e.g. 32).
    step: tile stride as a fraction of the tile (0.5 = half overlap; 1.0 = no overlap).
    blend: 'gaussian' or 'constant' weighting of overlapping tiles.
    batch_size: tiles per forward call (the last batch is padded, so one compilation serves all).
    out: optional float32 [H, W] buffer (e.g. a np.memmap) that receives the logits; allocated if None.
    progress: show a progress bar over tiles.

  Returns:
    float32 [H, W] logits (`out` if given).
  """
  if image.ndim != 2:
    raise ValueError(f"predict_logits expects a gray image [H, W], got shape {image.shape}.")
  height, width = image.shape
  # Images smaller than a tile are reflected up to the tile size, then cropped back.
  padded_h, padded_w = max(height, tile), max(width, tile)
  if (padded_h, padded_w) != (height, width):
    image = np.pad(np.asarray(image), ((0, padded_h - height), (0, padded_w - width)), mode="reflect")
  stride = max(1, int(round(tile * step)))
  origins = crops.grid_origins((padded_h, padded_w), tile, min(stride, tile))
  weights = blend_weights(tile, blend)
  logit_sum = np.zeros((padded_h, padded_w), np.float32)
  weight_sum = np.zeros((padded_h, padded_w), np.float32)
  with tqdm(total=len(origins), desc="predict", unit="tile", disable=not progress, leave=False) as bar:
    for start in range(0, len(origins), batch_size):
      batch_origins = origins[start:start + batch_size]
      tiles = np.zeros((batch_size, tile, tile, 1), np.uint8)
      for i, (r, c) in enumerate(batch_origins):
        tiles[i, ..., 0] = image[r:r + tile, c:c + tile]
      logits = np.asarray(forward(tiles))
      for i, (r, c) in enumerate(batch_origins):
        logit_sum[r:r + tile, c:c + tile] += logits[i] * weights
        weight_sum[r:r + tile, c:c + tile] += weights
      bar.update(len(batch_origins))
  result = logit_sum[:height, :width] / weight_sum[:height, :width]
  if out is None:
    return result
  out[...] = result
  return out


def probabilities(logits: np.ndarray) -> np.ndarray:
  """Sigmoid of logits as float32, computed stably in numpy."""
  return (0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, np.float32)))).astype(np.float32)


def submission(membrane: np.ndarray) -> np.ndarray:
  """The competition's format from a boolean membrane mask: uint8, black (0) = membrane, white (255) = background."""
  return np.where(membrane, 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
  """An RGB picture of a prediction on the gray image, uint8 [H, W, 3].

  Without ground truth, predicted membrane is green. With it: true positives green, false positives red, false
  negatives blue, so errors are seen at a glance.
  """
  gray = np.asarray(image, np.float32)
  rgb = np.repeat(gray[..., None] * 0.6, 3, axis=-1)
  colours = {"tp": (0, 220, 0), "fp": (255, 40, 40), "fn": (40, 120, 255)}
  if truth is None:
    masks = {"tp": predicted}
  else:
    masks = {"tp": predicted & truth, "fp": predicted & ~truth, "fn": ~predicted & truth}
  for name, mask in masks.items():
    rgb[mask] = colours[name]
  return np.clip(rgb, 0, 255).astype(np.uint8)
