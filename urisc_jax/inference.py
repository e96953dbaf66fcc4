"""Whole-image prediction by sliding window, streamed in bands so that memory does not grow with the image.

Tiles of a fixed size go through one jitted forward in fixed-size batches (no recompilation whatever the image),
split over the devices of a mesh when there are several. Test-time augmentation averages the logits of 1, 2, 4 or 8
flips/transposes of each tile, all views stacked into one network call. Two ways to put the tiles' logits together:

* Blending (the default, as nnU-Net): tiles every `step * tile` pixels, the last row and column of tiles flush with
  the border; each tile's logits are weighted (Gaussian, sigma = tile / 8, or constant) and summed, and the sum is
  divided by the summed weights. At step 0.5 every pixel is computed about 4 times.
* Halo: tiles overlap only by a margin `halo` on each side (every `tile - 2 * halo` pixels), and each pixel is taken
  from the one tile whose centre is nearest, so it lies at least `halo` pixels from that tile's border (or on the
  image border, where a whole-image forward would pad too). Each pixel is computed about (tile / (tile - 2 halo))^2
  times. `border_error_profile` and `choose_halo` size the halo to what the network really uses; `halo_tile` picks
  the tile (at least 4 x halo) that covers an image with the fewest computed pixels.

Streaming: tiles go in row-major order, so once a row of tiles is done every pixel above the next row's first tile is
final. Only one band of `tile` rows of accumulator lives in memory; finished rows are written to `out` (which may be
a np.memmap on disk) and, for memory maps, their pages are handed back to the OS, as are the pages of the input image
(which may be a np.memmap too) once read. Peak memory is O(tile x width), not O(height x width). The device computes
one batch while the host cuts the next batch and accumulates the previous one (JAX dispatch is asynchronous).
"""

import ctypes
import dataclasses
import functools
import mmap
import sys
from collections.abc import Callable, Iterator
from typing import Any

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
BLEND_CHOICES = ("gaussian", "constant")


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


def _views_forward(model, variables, x: jax.Array, views) -> jax.Array:
  """Sum over `views` of the unviewed logits [B, H, W] of x [B, H, W, C], with ONE network call per view shape.

  The views of a batch are stacked along the batch axis, tile-major ([B, V, ...] flattened to [B * V, ...]), so that
  a batch split over devices keeps each tile's views on its device, and the network appears once in the compiled
  program (compile time does not grow with the number of views). Transposed views of a non-square tile have
  another shape and go through a second call.
  """
  square = x.shape[1] == x.shape[2]
  groups = [views] if square else [[v for v in views if not v[0]], [v for v in views if v[0]]]
  total = 0.0
  for group in filter(None, groups):
    stacked = jnp.stack([view(x, *v) for v in group], axis=1)  # [B, V, H', W', C]
    logits = model.apply(variables, stacked.reshape(-1, *stacked.shape[2:]), train=False)
    logits = logits.reshape(*stacked.shape[:2], *logits.shape[1:])
    for k, v in enumerate(group):
      total = total + unview(logits[:, k], *v)[..., 0].astype(jnp.float32)
  return total


def tile_forward_function(model, *, mean: float, std: float, tta: int = 1) -> Callable[[Any, jax.Array], jax.Array]:
  """The pure function that the tile forward jits: forward(variables, uint8 tiles [B, T, T, 1]) -> mean logit over
  `tta` views, float32 [B, T, T]."""
  if tta not in TTA_CHOICES:
    raise ValueError(f"config.predict.tta must be one of {TTA_CHOICES}, got {tta}.")
  views = _VIEWS[:tta]

  def forward(variables, tiles):
    return _views_forward(model, variables, normalize(tiles, mean=mean, std=std), views) / tta

  return forward


def tile_forward_binder(model, *, mean: float, std: float, tta: int = 1,
                        mesh: jax.sharding.Mesh | None = None) -> Callable[[Any], TileForward]:
  """Jits the tile forward once and returns `bind(variables) -> TileForward`.

  Binding new variables reuses the compiled executable: validation during training binds each new state without
  recompiling. See `make_tile_forward` for what the forward computes. With a mesh that spans processes (a
  multi-host run), every process calls the forward with the same tiles, its devices compute their share, and every
  process gets all the logits back.
  """
  forward = tile_forward_function(model, mean=mean, std=std, tta=tta)
  # Variables are an argument, not constants baked into the executable: less memory and a faster compile.
  if mesh is None:
    jitted = jax.jit(forward)
    return lambda variables: functools.partial(jitted, variables)
  tile_sharding = sharding.batch_sharding(mesh)
  data_size = sharding.data_parallel_size(mesh)
  across_processes = sharding.spans_processes(mesh)
  # Across processes, the program gathers every tile's logits onto every device: each process gets the whole
  # batch back and assembles the same image (so validation scores, thresholds and written predictions agree).
  jitted = jax.jit(forward, in_shardings=(sharding.replicated(mesh), tile_sharding),
                   out_shardings=sharding.replicated(mesh) if across_processes else None)

  def bind(variables):
    variables = sharding.replicate(variables, mesh)

    def sharded_forward(tiles):
      if tiles.shape[0] % data_size:
        raise ValueError(f"A batch of {tiles.shape[0]} tiles cannot be split over the {data_size} devices of the "
                         "mesh's data axis: make config.predict.batch_size a multiple of the device count.")
      if not across_processes:
        return jitted(variables, jax.device_put(tiles, tile_sharding))
      # Every process holds the same batch and hands its devices only their share.
      local = np.asarray(tiles)[sharding.process_rows(tile_sharding, tiles.shape)]
      logits = jitted(variables, jax.make_array_from_process_local_data(tile_sharding, local, tiles.shape))
      return logits.addressable_data(0)

    return sharded_forward

  return bind


def make_tile_forward(model, variables, *, mean: float, std: float, tta: int = 1,
                      mesh: jax.sharding.Mesh | None = None) -> TileForward:
  """A jitted function: uint8 tiles [B, T, T, 1] -> mean logit over `tta` views, float32 [B, T, T].

  Any T divisible by the model's stride works (one compilation per shape); non-square tiles too. The `tta` views of
  each tile go through the network as one batch of B * tta tiles (so device memory grows with `tta`). With a mesh,
  the tile batch is split over its `data` axis (B must be divisible by its size).
  """
  return tile_forward_binder(model, mean=mean, std=std, tta=tta, mesh=mesh)(variables)


@functools.lru_cache(maxsize=8)
def blend_profile(tile: int, mode: str) -> np.ndarray:
  """Weight of a tile's logits along one axis, float32 [tile]: 'gaussian' (sigma = tile / 8, peak 1) or 'constant'.

  The 2-D weight is the outer product of two profiles, so the summed weight of a tile grid factorizes into a row
  sum times a column sum: no weight accumulator is needed.
  """
  if mode not in BLEND_CHOICES:
    raise ValueError(f"config.predict.blend must be one of {BLEND_CHOICES}, got {mode!r}.")
  if mode == "constant":
    return np.ones(tile, np.float32)
  centre = (tile - 1) / 2
  profile = np.exp(-0.5 * ((np.arange(tile) - centre) / (tile / 8)) ** 2)
  profile /= profile.max()
  # Border pixels of a tile are covered by no other tile at an image's edge: keep their weight positive.
  return np.maximum(profile, profile[profile > 0].min()).astype(np.float32)


def blend_weights(tile: int, mode: str) -> np.ndarray:
  """Per-pixel weight of a tile's logits, float32 [tile, tile]: the outer product of two `blend_profile`s."""
  profile = blend_profile(tile, mode)
  return np.outer(profile, profile)


@dataclasses.dataclass(frozen=True)
class TileGrid:
  """Where the tiles of one image go.

  Attributes:
    shape: (H, W) of the image the grid covers (at least tile x tile).
    tile: tile size T.
    rows, cols: tile start offsets along each axis, increasing, the last flush with the border.
    row_seams, col_seams: halo mode only: tile i along an axis supplies pixels [seams[i], seams[i + 1]); None when
      tiles are blended.
  """
  shape: tuple[int, int]
  tile: int
  rows: tuple[int, ...]
  cols: tuple[int, ...]
  row_seams: tuple[int, ...] | None = None
  col_seams: tuple[int, ...] | None = None

  @property
  def num_tiles(self) -> int:
    return len(self.rows) * len(self.cols)


def _seams(starts: list[int], tile: int, length: int) -> tuple[int, ...]:
  """Boundaries of the nearest-centre partition of an axis: the middle of each overlap, plus 0 and `length`."""
  middles = [(previous + tile + start) // 2 for previous, start in zip(starts, starts[1:])]
  return (0, *middles, length)


def tile_grid(shape: tuple[int, int], tile: int, *, step: float = 0.5, halo: int | None = None) -> TileGrid:
  """The tile grid of an image of `shape` (each side >= tile).

  Args:
    shape: (H, W).
    tile: tile size T.
    step: blending mode: tile stride as a fraction of the tile, in (0, 1].
    halo: halo mode when set: tiles every T - 2 * halo pixels, each pixel from the tile whose centre is nearest.

  Returns:
    The TileGrid.
  """
  if tile <= 0:
    raise ValueError(f"config.predict.tile must be positive, got {tile}.")
  if halo is None:
    if not 0 < step <= 1:
      raise ValueError(f"config.predict.step must be in (0, 1] (a fraction of the tile), got {step}.")
    stride = min(tile, max(1, int(round(tile * step))))
    return TileGrid(tuple(shape), tile, tuple(crops.tile_starts(shape[0], tile, stride)),
                    tuple(crops.tile_starts(shape[1], tile, stride)))
  if not 0 <= 2 * halo < tile:
    raise ValueError(f"config.predict.halo must be in [0, tile / 2) = [0, {tile / 2:g}), got {halo}.")
  rows = crops.tile_starts(shape[0], tile, tile - 2 * halo)
  cols = crops.tile_starts(shape[1], tile, tile - 2 * halo)
  return TileGrid(tuple(shape), tile, tuple(rows), tuple(cols), _seams(rows, tile, shape[0]),
                  _seams(cols, tile, shape[1]))


def min_halo_tile(halo: int, *, multiple: int = 32) -> int:
  """The smallest tile halo mode uses with `halo`: 4 x halo, rounded up to a multiple of `multiple`.

  Tiles then advance by at least half their size, so each pixel is computed at most about 4 times (as at step 0.5);
  a tile barely larger than 2 x halo would advance by a few pixels and compute each pixel many times over.
  """
  return max(multiple, -(-4 * halo // multiple) * multiple)


def halo_tile(shape: tuple[int, int], tile: int, halo: int, *, multiple: int = 32, max_tile: int | None = None) -> int:
  """The tile size for halo mode on an image of `shape` that computes the fewest pixels.

  The last tile is flush with the border, so a grid that misses the image size by a little costs a whole extra row
  and column of tiles: 4096 x 4096 px at halo 128 takes 5 x 5 tiles of 1024 px (26 Mpix computed), but 3 x 3 tiles
  of 1536 px (21 Mpix).

  A `tile` smaller than `min_halo_tile(halo)` (e.g. a small tile meant for blending, with a halo sized for a bigger
  network) is first raised to it: the halo is what the network needs, so it is kept and the tile grows.

  Args:
    shape: (H, W) of the image.
    tile: the smallest tile to consider (raised to `min_halo_tile(halo, multiple=multiple)` if smaller).
    halo: the halo.
    multiple: tile sizes considered are multiples of this (the model's stride).
    max_tile: the largest tile to consider (default 1.5 x the smallest; bigger tiles need more device memory).

  Returns:
    The best tile size; the smallest one among equals.
  """
  if halo < 0:
    raise ValueError(f"config.predict.halo must be non-negative, got {halo}.")
  tile = max(tile, min_halo_tile(halo, multiple=multiple))
  max_tile = tile * 3 // 2 if max_tile is None else max(max_tile, tile)
  candidates = [tile] + list(range(-(-tile // multiple) * multiple, max_tile + 1, multiple))

  def computed_pixels(t):
    return tile_grid((max(shape[0], t), max(shape[1], t)), t, halo=halo).num_tiles * t * t

  return min(candidates, key=lambda t: (computed_pixels(t), t))


class _PageReleaser:
  """Hands finished rows of a shared memory map back to the OS, so that they stop counting as resident memory.

  Pages of a shared file mapping that the process dropped are reloaded from the page cache or the file on the next
  access (written data included), so this only bounds memory. A no-op for ordinary arrays, private (copy-on-write)
  maps and non-Linux systems.
  """

  _MADV_DONTNEED = 4

  def __init__(self, array: np.ndarray):
    self._address = None
    if (sys.platform.startswith("linux") and isinstance(array, np.memmap)
        and getattr(array, "mode", None) in ("r", "r+", "w+") and array.ndim == 2
        and array.flags.c_contiguous and array.size):
      self._address = array.ctypes.data
      self._row_bytes = array.strides[0]
      self._done = self._address  # bytes below this address are already released
      self._madvise = ctypes.CDLL(None, use_errno=True).madvise
      self._madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

  def release_rows_before(self, row: int) -> None:
    """Releases whole pages that lie entirely in rows [0, row)."""
    if self._address is None:
      return
    end = (self._address + row * self._row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
    start = -(-self._done // mmap.PAGESIZE) * mmap.PAGESIZE
    if end > start:
      self._madvise(start, end - start, self._MADV_DONTNEED)
      self._done = end


def _tile_batches(image: np.ndarray, grid: TileGrid, batch_size: int
                  ) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
  """Yields (origins, uint8 tiles [batch_size, T, T, 1]) in row-major order, the last batch zero-padded.

  The image is read one band of T rows at a time, and rows no later tile needs are released once read.
  """
  tile = grid.tile
  releaser = _PageReleaser(image)
  origins, tiles = [], np.zeros((batch_size, tile, tile, 1), np.uint8)
  for r in grid.rows:
    releaser.release_rows_before(r)
    band = np.array(image[r:r + tile])
    for c in grid.cols:
      tiles[len(origins), ..., 0] = band[:, c:c + tile]
      origins.append((r, c))
      if len(origins) == batch_size:
        yield origins, tiles
        # A fresh buffer: the device may still be reading the last one.
        origins, tiles = [], np.zeros((batch_size, tile, tile, 1), np.uint8)
  if origins:
    yield origins, tiles


def blend_coverage(starts, profile: np.ndarray, length: int) -> np.ndarray:
  """float32 [length]: the sum of the 1-D blend `profile` over tiles starting at `starts` along one axis; blended
  logits are divided by it (rows times columns), so a block of the section can be normalized as the whole is."""
  total = np.zeros(length, np.float32)
  for s in starts:
    total[s:s + len(profile)] += profile
  return total


class _BlendSink:
  """Accumulates weighted tile logits in a band of `tile` rows; writes finished rows, normalized, to `out`."""

  def __init__(self, out: np.ndarray, grid: TileGrid, profile: np.ndarray):
    self.out, self.grid, self.tile = out, grid, grid.tile
    self.weights = np.outer(profile, profile)
    self.row_norm = blend_coverage(grid.rows, profile, grid.shape[0])
    self.col_norm = blend_coverage(grid.cols, profile, grid.shape[1])[:out.shape[1]]
    self.band = np.zeros((self.tile, grid.shape[1]), np.float32)  # image rows [base, base + tile)
    self.base = 0
    self.releaser = _PageReleaser(out)

  def add(self, origin: tuple[int, int], logits: np.ndarray) -> None:
    r, c = origin
    if r != self.base:
      self._flush(r)
    self.band[:, c:c + self.tile] += logits * self.weights

  def _flush(self, stop: int) -> None:
    """Writes rows [base, stop) (final: no later tile starts above `stop`) and slides the band down to `stop`."""
    n = stop - self.base
    rows = slice(self.base, min(stop, self.out.shape[0]))
    count = rows.stop - rows.start
    if count > 0:
      finished = self.band[:count, :self.out.shape[1]]  # normalized in place: these rows are slid out below
      finished /= self.row_norm[rows, None]
      finished /= self.col_norm[None, :]
      self.out[rows] = finished
      self.releaser.release_rows_before(rows.stop)
    # Slide in chunks of n rows: source and destination never overlap, so numpy needs no temporary copy.
    for i in range(0, self.tile - n, n):
      k = min(n, self.tile - n - i)
      self.band[i:i + k] = self.band[n + i:n + i + k]
    self.band[max(0, self.tile - n):] = 0
    self.base = stop

  def finish(self) -> None:
    self._flush(self.grid.shape[0])


class _HaloSink:
  """Copies each tile's share of the nearest-centre partition straight into `out`; no accumulator."""

  def __init__(self, out: np.ndarray, grid: TileGrid):
    self.out, self.grid = out, grid
    self.row_index = {r: i for i, r in enumerate(grid.rows)}
    self.col_index = {c: j for j, c in enumerate(grid.cols)}
    self.releaser = _PageReleaser(out)

  def add(self, origin: tuple[int, int], logits: np.ndarray) -> None:
    r, c = origin
    i, j = self.row_index[r], self.col_index[c]
    top, bottom = self.grid.row_seams[i], min(self.grid.row_seams[i + 1], self.out.shape[0])
    left, right = self.grid.col_seams[j], min(self.grid.col_seams[j + 1], self.out.shape[1])
    if j == 0:
      self.releaser.release_rows_before(top)
    if bottom > top and right > left:
      self.out[top:bottom, left:right] = logits[top - r:bottom - r, left - c:right - c]

  def finish(self) -> None:
    self.releaser.release_rows_before(self.out.shape[0])


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
    halo: int | None = None,
) -> np.ndarray:
  """Logits of a whole image by sliding window, blended (default) or halo mode; see the module docstring.

  Args:
    forward: uint8 [B, T, T, 1] -> float32 logits [B, T, T], e.g. from `make_tile_forward`.
    image: uint8 gray [H, W]: a numpy array or a memory map (read one band of `tile` rows at a time).
    tile: tile size T (a multiple of the model's stride, e.g. 32).
    step: blending mode: tile stride as a fraction of the tile (0.5 = half overlap; 1.0 = no overlap).
    blend: blending mode: 'gaussian' or 'constant' weighting of overlapping tiles.
    batch_size: tiles per forward call (the last batch is padded, so one compilation serves all).
    out: optional float32 [H, W] buffer (e.g. np.lib.format.open_memmap) that receives the logits row band by row
      band; allocated in memory if None.
    progress: show a progress bar over tiles.
    halo: halo mode when set: tiles overlap by 2 * halo pixels and each pixel comes from the tile whose centre is
      nearest (`step` and `blend` are then unused). A multiple of 16 keeps the tile stride a multiple of 32.

  Returns:
    float32 [H, W] logits (`out` if given).
  """
  if image.ndim != 2:
    raise ValueError(f"predict_logits expects a gray image [H, W], got shape {image.shape}.")
  if image.dtype != np.uint8:
    raise ValueError(f"predict_logits expects 8-bit gray (uint8), got {image.dtype}: read images with "
                     "urisc_jax.data.sources.read_image, or scale to 0..255 and cast to uint8.")
  if batch_size <= 0:
    raise ValueError(f"config.predict.batch_size must be positive, got {batch_size}.")
  height, width = image.shape
  if out is not None and tuple(out.shape) != (height, width):
    raise ValueError(f"predict_logits: `out` has shape {out.shape}, the image {image.shape}; pass a float32 "
                     "buffer of the image's shape.")
  profile = blend_profile(tile, blend)
  # Images smaller than a tile are reflected up to the tile size (then at most tile x max(H, W) pixels).
  if height < tile or width < tile:
    image = np.pad(np.asarray(image), ((0, max(0, tile - height)), (0, max(0, tile - width))), mode="reflect")
  grid = tile_grid(image.shape, tile, step=step, halo=halo)
  if out is None:
    out = np.empty((height, width), np.float32)
  sink = _BlendSink(out, grid, profile) if halo is None else _HaloSink(out, grid)
  pending = None
  with tqdm(total=grid.num_tiles, desc="predict", unit="tile", disable=not progress, leave=False) as bar:
    for origins, tiles in _tile_batches(image, grid, batch_size):
      logits = forward(tiles)  # Dispatch returns at once: the device works while the host finishes the last batch.
      if pending is not None:
        _consume(sink, *pending)
        bar.update(len(pending[0]))
      pending = origins, logits
    if pending is not None:
      _consume(sink, *pending)
      bar.update(len(pending[0]))
  sink.finish()
  return out


def _consume(sink, origins: list[tuple[int, int]], logits) -> None:
  logits = np.asarray(logits)
  for i, origin in enumerate(origins):
    sink.add(origin, logits[i])


def border_error_profile(forward: TileForward, image: np.ndarray, *, tile: int, margin: int | None = None,
                         origin: tuple[int, int] | None = None) -> np.ndarray:
  """How far a tile's border disturbs its logits: max |tile logit - logit with context| by distance to the border.

  A tile cut from `image` is predicted alone and inside a window `margin` pixels larger on every side; the two
  logit maps are compared pixel by pixel and the error is reduced (max) over pixels at the same distance
  d = min(row, col, T - 1 - row, T - 1 - col) from the tile's border.

  Args:
    forward: as for `predict_logits`; called on [1, T, T, 1] and [1, T + 2 margin, T + 2 margin, 1] (a forward
      from `make_tile_forward` without a mesh compiles once per shape).
    image: uint8 gray [H, W], at least T + 2 margin on each side.
    tile: tile size T.
    margin: context on each side of the tile (default T / 2, a multiple of the model's stride).
    origin: top-left (row, col) of the tile (default: centred).

  Returns:
    float32 [T // 2]: entry d is the largest absolute logit error at distance d from the tile border.
  """
  margin = tile // 2 if margin is None else margin
  size = tile + 2 * margin
  if image.ndim != 2 or min(image.shape) < size:
    raise ValueError(f"border_error_profile needs a gray image of at least {size} x {size} px (tile {tile} + 2 x "
                     f"margin {margin}), got shape {image.shape}.")
  if origin is None:
    origin = ((image.shape[0] - tile) // 2, (image.shape[1] - tile) // 2)
  r, c = origin[0] - margin, origin[1] - margin
  if r < 0 or c < 0 or r + size > image.shape[0] or c + size > image.shape[1]:
    raise ValueError(f"border_error_profile: a tile at {origin} with margin {margin} leaves the image.")
  window = np.asarray(image[r:r + size, c:c + size])
  context = np.asarray(forward(window[None, ..., None]))[0, margin:margin + tile, margin:margin + tile]
  inner = np.ascontiguousarray(window[margin:margin + tile, margin:margin + tile])
  alone = np.asarray(forward(inner[None, ..., None]))[0]
  error = np.abs(alone - context)
  axis = np.minimum(np.arange(tile), tile - 1 - np.arange(tile))
  distance = np.minimum(axis[:, None], axis[None, :])
  profile = np.zeros(tile // 2, np.float32)
  np.maximum.at(profile, distance.ravel(), error.ravel())
  return profile


def choose_halo(profile: np.ndarray, tolerance: float, *, multiple: int = 16) -> int:
  """The smallest halo (a multiple of `multiple`) beyond which `border_error_profile` stays within `tolerance`.

  Raises:
    ValueError: the error never falls below `tolerance` inside the tile (use a larger tile or tolerance).
  """
  profile = np.asarray(profile)
  tail_max = np.maximum.accumulate(profile[::-1])[::-1]  # tail_max[d] = max(profile[d:])
  within = np.flatnonzero(tail_max <= tolerance)
  if within.size == 0:
    raise ValueError(f"The border error never falls below {tolerance} within a tile of {2 * len(profile)} px (it "
                     f"is {profile.min():.3g} at best): use a larger tile or tolerance.")
  return int(-(-within[0] // multiple) * multiple)


def probabilities(logits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """Sigmoid of logits as float32, computed stably (0.5 + 0.5 tanh(x / 2)) in one buffer: `out` if given."""
  out = np.multiply(logits, np.float32(0.5), dtype=np.float32, out=out)
  np.tanh(out, out=out)
  out *= np.float32(0.5)
  out += np.float32(0.5)
  return out


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
