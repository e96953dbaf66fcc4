"""Blockwise prediction of one section: any block of the output, computed alone, equals that block of `predict`.

A section [H, W] is cut into output blocks aligned to the output's chunks (`block_grid`), so that no two blocks
write one chunk. Each block is computed from the tiles of the section's own global tile grid (`inference.tile_grid`
for the whole section, with the tile `predict.tile_size` chooses for it): the tiles whose share of the output meets
the block. A pixel's value depends only on the tiles that cover it, positioned in section coordinates and combined
as `inference.predict_logits` combines them (halo mode: the nearest-centre tile; blending: the same weighted sum in
the same row-major order, then the same normalization), so a block's logits are those of the whole-section
prediction whatever the block size and the order in which blocks run: bit for bit as far as the network gives each
tile the same logits in another batch (measured: always on two cores; on one core one float32 ulp at 1 pixel in
126,000, since XLA:CPU does not promise a batch element's result independent of its partners'). The price is the context: a
block reads and computes every tile that reaches into it, up to one tile beyond its edges.

A section narrower than a tile along one axis is reflected up to the tile along that axis, as `predict_logits` does;
its grid runs along the other axis, so a block still computes only the tiles that reach into it (reflection along one
axis is a per-line operation, so the reflected window equals that part of the reflected section). Predicting such a
section whole for every block would cost blocks x tiles, quadratic in its length.

Memory per block: the input window (block + up to 2 tiles per axis, uint8) and the float32 block; never the section.
"""

import dataclasses
from collections.abc import Callable

import numpy as np

from urisc_jax import inference
from urisc_jax import predict as predict_lib

Reader = Callable[[slice, slice], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Block:
  """An output block of a section: rows [top, bottom), columns [left, right)."""
  top: int
  bottom: int
  left: int
  right: int

  @property
  def shape(self) -> tuple[int, int]:
    return self.bottom - self.top, self.right - self.left


def block_grid(shape: tuple[int, int], block: int, *, chunk: int = 1) -> list[Block]:
  """Row-major blocks of side `block` covering a section of `shape` (H, W); the last row and column are cut at the
  border. `block` must be a multiple of the output `chunk`, so every block is a union of whole chunks."""
  if block <= 0 or chunk <= 0 or block % chunk:
    raise ValueError(f"config.predict.volume.block={block} must be a positive multiple of "
                     f"config.predict.volume.chunk={chunk}, so that no two blocks write one chunk.")
  height, width = shape
  return [Block(r, min(r + block, height), c, min(c + block, width))
          for r in range(0, height, block) for c in range(0, width, block)]


@dataclasses.dataclass(frozen=True)
class SectionPlan:
  """The whole-section tiling that every block of a section shares.

  Attributes:
    shape: (H, W) of the section.
    grid: the TileGrid of the section reflected up to the tile along each axis shorter than it (as
      `inference.predict_logits` reflects it).
    tile, halo, step, blend, batch_size: as `inference.predict_logits` takes them.
  """
  shape: tuple[int, int]
  grid: inference.TileGrid | None
  tile: int
  halo: int | None
  step: float
  blend: str
  batch_size: int


def section_plan(shape: tuple[int, int], predict_config) -> SectionPlan:
  """The plan `predict.probabilities` would follow for a whole section of `shape` under `predict_config`."""
  tile = predict_lib.tile_size(tuple(shape), predict_config)
  halo = predict_config.get("halo")
  grid = inference.tile_grid(_reflected_shape(shape, tile), tile, step=predict_config.step, halo=halo)
  return SectionPlan(tuple(shape), grid, tile, halo, predict_config.step, predict_config.blend,
                     predict_config.batch_size)


def _reflected_shape(shape: tuple[int, int], tile: int) -> tuple[int, int]:
  """The section's shape once `inference.predict_logits` has reflected each axis shorter than `tile` up to it."""
  return max(shape[0], tile), max(shape[1], tile)


def _read_reflected(read: Reader, shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
  """rows x cols of the section reflected up to the tile (`_reflected_shape`): reads the part inside the section and
  reflects it along each axis the section is shorter than the window's end, exactly as `np.pad` reflects the whole
  section there (the window then spans that axis from 0, so the reflection sees the same pixels)."""
  height, width = shape
  window = read(slice(rows.start, min(rows.stop, height)), slice(cols.start, min(cols.stop, width)))
  pad = ((0, max(0, rows.stop - height)), (0, max(0, cols.stop - width)))
  if pad[0][1] or pad[1][1]:
    window = np.pad(np.asarray(window), pad, mode="reflect")
  return window


def _needed(starts: tuple[int, ...], seams: tuple[int, ...] | None, tile: int, lo: int, hi: int) -> list[int]:
  """Indices of the tiles along one axis whose contribution meets [lo, hi)."""
  if seams is not None:
    return [i for i in range(len(starts)) if seams[i] < hi and seams[i + 1] > lo]
  return [i for i, s in enumerate(starts) if s < hi and s + tile > lo]


def predict_block_logits(forward: inference.TileForward, read: Reader, plan: SectionPlan, block: Block) -> np.ndarray:
  """float32 [h, w] logits of `block`, equal to the block's part of `inference.predict_logits` on the whole section.

  Args:
    forward: uint8 [B, T, T, 1] -> float32 [B, T, T] (B = plan.batch_size), e.g. `inference.make_tile_forward`.
    read: read(rows, cols) -> uint8 [rows, cols] of the section (e.g. `volumes.SectionReader.read` of one z).
    plan: `section_plan` of the section.
    block: the output block.
  """
  grid, tile = plan.grid, plan.tile
  rows = _needed(grid.rows, grid.row_seams, tile, block.top, block.bottom)
  cols = _needed(grid.cols, grid.col_seams, tile, block.left, block.right)
  r0, c0 = grid.rows[rows[0]], grid.cols[cols[0]]
  window = _read_reflected(read, plan.shape, slice(r0, grid.rows[rows[-1]] + tile),
                          slice(c0, grid.cols[cols[-1]] + tile))
  out = np.zeros(block.shape, np.float32)
  weights = None if plan.halo is not None else inference.blend_weights(tile, plan.blend)
  origins = [(grid.rows[i], grid.cols[j], i, j) for i in rows for j in cols]
  pending = None
  for start in range(0, len(origins), plan.batch_size):
    chunk = origins[start:start + plan.batch_size]
    tiles = np.zeros((plan.batch_size, tile, tile, 1), np.uint8)
    for k, (r, c, _, _) in enumerate(chunk):
      tiles[k, ..., 0] = window[r - r0:r - r0 + tile, c - c0:c - c0 + tile]
    logits = forward(tiles)  # dispatched: the device computes while the host places the previous batch
    if pending is not None:
      _place(out, block, grid, weights, *pending)
    pending = chunk, logits
  if pending is not None:
    _place(out, block, grid, weights, *pending)
  if weights is not None:
    profile = inference.blend_profile(tile, plan.blend)
    # The whole-section normalization, computed as inference's blend sink does, for this block's rows and columns.
    row_norm = inference.blend_coverage(grid.rows, profile, grid.shape[0])
    col_norm = inference.blend_coverage(grid.cols, profile, grid.shape[1])
    out /= row_norm[block.top:block.bottom, None]
    out /= col_norm[None, block.left:block.right]
  return out


def _place(out: np.ndarray, block: Block, grid: inference.TileGrid, weights: np.ndarray | None, origins,
           logits) -> None:
  """Adds (blending) or copies (halo) each tile's contribution to the block, in row-major tile order."""
  logits = np.asarray(logits)
  for k, (r, c, i, j) in enumerate(origins):
    if weights is None:
      top, bottom = max(grid.row_seams[i], block.top), min(grid.row_seams[i + 1], block.bottom)
      left, right = max(grid.col_seams[j], block.left), min(grid.col_seams[j + 1], block.right)
      out[top - block.top:bottom - block.top, left - block.left:right - block.left] = \
          logits[k, top - r:bottom - r, left - c:right - c]
    else:
      top, bottom = max(r, block.top), min(r + grid.tile, block.bottom)
      left, right = max(c, block.left), min(c + grid.tile, block.right)
      weighted = logits[k] * weights
      out[top - block.top:bottom - block.top, left - block.left:right - block.left] += \
          weighted[top - r:bottom - r, left - c:right - c]
