"""Synthetic electron-microscopy images with exact membrane labels.

A procedural stand-in for U-RISC: cells tile an infinite plane (a warped, stretched Voronoi diagram of jittered grid
seeds) with thin dark membranes, and every cell holds unlabelled structures that look like membrane locally:
mitochondria (double membrane, cristae), vesicle clusters (small dark rings), ER cisternae (curved dark lines) and
microtubule bundles (faint parallel lines).
On top come textured cytoplasm, per-cell tone, patches where membrane contrast fades, blur, uneven illumination and
noise. A global intensity threshold therefore does poorly, while a network that sees context (closed boundaries that
run through the whole image) can learn the real membranes.

Every pixel is a function of its global coordinates and the seed only, and neighbourhood operations (blur) use a
halo, so any window renders alone, in bounded memory, to exactly the pixels it has inside a bigger image. A 9958 x
9959 image is rendered block by block into the uint8 outputs.

The label is the exact binary membrane mask of the geometry (0 = membrane, 255 = background, like U-RISC); the image
renders the same geometry anti-aliased and blurred.
"""

import dataclasses
import functools
import json
import math
import pathlib
import re

import numpy as np

from urisc_jax.data import imageio

MEMBRANE = 0
BACKGROUND = 255
# Boundary length per unit area of the tiling is about BOUNDARY_DENSITY / cell_size, times the stretch factor and
# (1 + subdivided_fraction) since splitting a grid cell into four doubles it there; a square grid would give 2, the
# jitter and the warp add the rest. Bands of width w then cover 1 - exp(-w * length density) of the plane, like
# random lines do (overlaps at junctions); calibrated on 2048^2 renders of both presets.
BOUNDARY_DENSITY = 2.17
_GENERATOR_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Parameters of the synthetic EM generator. Lengths are in pixels, intensities in [0, 1] of the gray range.

  The defaults mimic U-RISC at 2.18 nm/px: large cells mixed with bundles of small ones, thin dark membranes
  covering about 5 % of the image, cytoplasm crowded with organelles.
  """
  height: int = 1024
  width: int = 1024
  membrane_fraction: float = 0.05
  membrane_width_px: float = 10.0
  # Grid spacing of the cell seeds; None derives it from membrane_fraction and membrane_width_px.
  cell_size_px: float | None = None
  subdivided_fraction: float = 0.35  # share of grid cells split into four small cells (thin processes)
  cell_elongation: float = 1.5  # cells are stretched by this factor along one direction per image
  boundary_waviness: float = 0.12  # domain-warp amplitude as a fraction of the cell size
  membrane_width_jitter: float = 0.2  # relative variation of the membrane width along a boundary
  membrane_contrast: float = 0.42  # darkness of a membrane: intensity drop as a fraction of the gray range
  membrane_core_lightness: float = 0.3  # wide membranes show two leaflets: a lighter core
  low_contrast_fraction: float = 0.2  # share of the area where membrane contrast fades
  low_contrast_level: float = 0.3  # membrane contrast multiplier inside those patches
  low_contrast_scale_px: float = 250.0
  background_level: float = 0.6  # mean cytoplasm intensity
  cell_tone_spread: float = 0.12  # cells differ in tone by up to +- this much
  texture_strength: float = 0.07  # cytoplasm texture (value-noise octaves at texture_scales_px)
  texture_scales_px: tuple[float, ...] = (2.5, 8.0, 40.0)
  granule_fraction: float = 0.012  # dark granules (ribosomes, glycogen): share of pixels seeding one
  granule_size_px: int = 5
  mitochondria_per_cell: float = 2.0
  vesicle_clusters_per_cell: float = 5.0
  er_per_cell: float = 6.0
  microtubule_bundles_per_cell: float = 2.0
  organelle_scale: float = 1.0  # organelle sizes relative to the membrane width
  blur_sigma: float = 1.6  # Gaussian blur of the rendered image (pixels)
  noise_sigma: float = 0.05  # per-pixel noise after blur (0.05 is about 13 gray levels)
  illumination_strength: float = 0.35  # relative amplitude of the smooth, uneven illumination
  illumination_scale_px: float = 1200.0
  block_size: int = 256  # rendering block: memory use is a few MB per block, whatever the image size

  def __post_init__(self):
    checks = [
        (self.height > 0 and self.width > 0, f"height and width must be positive, got {self.height} x {self.width}"),
        (0 < self.membrane_fraction < 0.6, f"membrane_fraction must be in (0, 0.6), got {self.membrane_fraction}"),
        (self.membrane_width_px * (1 - self.membrane_width_jitter) >= 1.5,
         f"membrane_width_px * (1 - membrane_width_jitter) must be >= 1.5 so that membranes close every cell (got "
         f"{self.membrane_width_px} and {self.membrane_width_jitter})"),
        (self.cell_size_px is None or self.cell_size_px > 4 * self.membrane_width_px,
         f"cell_size_px={self.cell_size_px} leaves no room inside cells with {self.membrane_width_px} px membranes"),
        (0 <= self.subdivided_fraction <= 1, f"subdivided_fraction must be in [0, 1], got {self.subdivided_fraction}"),
        (1 <= self.cell_elongation <= 3, f"cell_elongation must be in [1, 3], got {self.cell_elongation}"),
        (0 <= self.boundary_waviness <= 0.15, f"boundary_waviness must be in [0, 0.15] (more folds the warp), got "
                                              f"{self.boundary_waviness}"),
        (0 <= self.membrane_width_jitter < 0.5, "membrane_width_jitter must be in [0, 0.5)"),
        (0 <= self.low_contrast_fraction < 1, "low_contrast_fraction must be in [0, 1)"),
        (self.block_size >= 32, f"block_size must be >= 32, got {self.block_size}"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"SyntheticConfig: {message}")

  @property
  def cell_size(self) -> float:
    """Grid spacing of the cell seeds in pixels."""
    if self.cell_size_px is not None:
      return float(self.cell_size_px)
    density = BOUNDARY_DENSITY * _stretch_factor(self.cell_elongation) * (1 + self.subdivided_fraction)
    return density * self.membrane_width_px / -math.log1p(-self.membrane_fraction)


def urisc_like(height: int = 1024, width: int = 1024, **overrides) -> SyntheticConfig:
  """U-RISC-like (2.18 nm/px): ~5 % membrane, 10 px membranes, large elongated cells full of organelles."""
  return SyntheticConfig(height=height, width=width, **overrides)


def isbi_like(height: int = 512, width: int = 512, **overrides) -> SyntheticConfig:
  """ISBI-2012-like (4 nm/px): ~22 % membrane, smaller cells, blurrier membranes, fewer organelles per cell."""
  params = dict(
      membrane_fraction=0.22, membrane_width_px=5.5, subdivided_fraction=0.6, cell_elongation=1.3,
      boundary_waviness=0.14, membrane_contrast=0.34, membrane_core_lightness=0.0, low_contrast_fraction=0.12,
      low_contrast_scale_px=120.0, background_level=0.56, cell_tone_spread=0.12, texture_strength=0.09,
      texture_scales_px=(2.0, 6.0, 24.0), granule_fraction=0.012, granule_size_px=3, mitochondria_per_cell=1.2,
      vesicle_clusters_per_cell=1.5, er_per_cell=2.0, microtubule_bundles_per_cell=0.5, organelle_scale=0.9,
      blur_sigma=1.3, noise_sigma=0.05, illumination_scale_px=700.0)
  params.update(overrides)
  return SyntheticConfig(height=height, width=width, **params)


PRESETS = {"urisc": urisc_like, "isbi": isbi_like}


def _stretch_factor(elongation: float) -> float:
  """Mean length gain of isotropic lines under an area-preserving stretch (ellipse perimeter / 2 pi)."""
  a, b = elongation, 1.0 / elongation
  return (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b))) / 2


# ----------------------------------------------------------------------------------------------------------------
# Hashing and value noise: pure functions of integer coordinates, so any window sees the same values.

_M1, _M2, _M3, _M4 = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77), np.uint32(0x7FEB352D), np.uint32(0x846CA68B)


def _hash(a, b, salt) -> np.ndarray:
  """uint32 hash of integer arrays a, b and salt (int or uint32 array), broadcast together."""
  with np.errstate(over="ignore"):
    h = (np.asarray(a).astype(np.uint32) * _M1) ^ (np.asarray(b).astype(np.uint32) * _M2) ^ np.asarray(
        salt, np.uint32)
    h ^= h >> np.uint32(16)
    h *= _M3
    h ^= h >> np.uint32(15)
    h *= _M4
    h ^= h >> np.uint32(16)
  return h


def _unit(h: np.ndarray) -> np.ndarray:
  """uint32 hash -> float32 uniform in [0, 1)."""
  return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


@functools.lru_cache(maxsize=4096)
def _salt(seed: int, stream: int) -> int:
  """32-bit salt of one random stream (hash of the 64-bit seed and the stream number)."""
  folded = _hash(np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF), 0x5EED)
  return int(_hash(folded, np.uint32(stream), 0xC0FFEE))


def _smoothstep(t):
  return t * t * (3 - 2 * t)


def _noise_grid(ys: np.ndarray, xs: np.ndarray, scale: float, salt: int) -> np.ndarray:
  """Value noise in [-1, 1] on the grid ys x xs (global pixel coordinates, 1-D), lattice spacing `scale`.

  Separable: interpolate lattice rows along y, then along x, so the cost is a few passes over [H, W].
  Returns float32 [len(ys), len(xs)].
  """
  fy, fx = ys / scale, xs / scale
  iy, ix = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
  ty, tx = _smoothstep(fy - iy).astype(np.float32), _smoothstep(fx - ix).astype(np.float32)
  y0, x0 = iy.min(), ix.min()
  gy, gx = np.arange(y0, iy.max() + 2), np.arange(x0, ix.max() + 2)
  lattice = _unit(_hash(gy[:, None], gx[None, :], salt)) * 2 - 1
  ry = iy - y0
  rows = lattice[ry] * (1 - ty)[:, None] + lattice[ry + 1] * ty[:, None]
  rx = ix - x0
  return rows[:, rx] * (1 - tx) + rows[:, rx + 1] * tx


def _noise_points(y: np.ndarray, x: np.ndarray, scales: np.ndarray, salts: np.ndarray) -> np.ndarray:
  """Value noise at scattered points [N] for K fields at once (scales, salts [K]); the fields of _noise_grid.

  Returns float64 [K, N].
  """
  scales = np.asarray(scales, np.float64)[:, None]
  salts = np.asarray(salts, np.uint32)[:, None]
  fy, fx = np.asarray(y, np.float64)[None] / scales, np.asarray(x, np.float64)[None] / scales
  iy, ix = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
  ty, tx = _smoothstep(fy - iy), _smoothstep(fx - ix)
  v = lambda dy, dx: _unit(_hash(iy + dy, ix + dx, salts)).astype(np.float64) * 2 - 1
  return (v(0, 0) * (1 - tx) + v(0, 1) * tx) * (1 - ty) + (v(1, 0) * (1 - tx) + v(1, 1) * tx) * ty


def _gaussian_grid(ys: np.ndarray, xs: np.ndarray, salt: int) -> np.ndarray:
  """Per-pixel noise with unit variance (sum of four uniform bytes, nearly Gaussian). float32 [H, W]."""
  h = _hash(ys.astype(np.int64)[:, None], xs.astype(np.int64)[None, :], salt)
  m = np.uint32(0xFF)
  total = (h & m) + ((h >> np.uint32(8)) & m) + ((h >> np.uint32(16)) & m) + (h >> np.uint32(24))
  return (total.astype(np.float32) - np.float32(510.0)) * np.float32(1 / 147.8)


@functools.cache
def _noise_quantile(q: float) -> float:
  """Quantile of the value-noise distribution, for turning an area fraction into a threshold."""
  rng = np.random.default_rng(0)
  c = rng.uniform(-1, 1, (4, 200_000))
  ty, tx = _smoothstep(rng.uniform(size=(2, 200_000)))
  v = (c[0] * (1 - tx) + c[1] * tx) * (1 - ty) + (c[2] * (1 - tx) + c[3] * tx) * ty
  return float(np.quantile(v, q))


# ----------------------------------------------------------------------------------------------------------------
# The plane: cell seeds on a jittered grid in a stretched, warped space q = A (p + D(p)).

_SEED_JITTER = 0.85  # seeds move up to this fraction of their (sub-)cell, so no two are closer than 0.15 of it
_OWN_SEED = math.sqrt(2) * (1 + _SEED_JITTER) / 2  # farthest a point can be from a seed of its own grid cell
_SLOTS = 4  # seeds per grid cell: one, or four on a 2 x 2 sub-grid where a grid cell splits into small cells
_FAR = 1e12  # position of unused seed slots: never nearest, never a neighbour that matters


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: _plane() caches one per (config, seed)
class _Plane:
  """Everything one (config, seed) pair fixes before any pixel is rendered."""
  config: SyntheticConfig
  seed: int
  spacing: float
  stretch: np.ndarray  # A [2, 2], symmetric, det 1: q = A p'
  unstretch: np.ndarray  # A^-1
  long_axis: tuple[float, float]  # unit (dy, dx) along which cells are elongated in pixel space
  warp: tuple[tuple[float, float], ...]  # (amplitude, lattice spacing) per octave

  def salt(self, stream: int) -> int:
    return _salt(self.seed, stream)

  def split(self, gy, gx) -> np.ndarray:
    """Whether grid cells gy, gx hold four small cells instead of one."""
    return _unit(_hash(gy, gx, self.salt(5))) < self.config.subdivided_fraction

  def seeds(self, gy: np.ndarray, gx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q-space seed positions (float64) of grid cells gy, gx (broadcast int arrays): [..., _SLOTS] each."""
    gy, gx = np.broadcast_arrays(np.asarray(gy, np.int64), np.asarray(gx, np.int64))
    slot = np.arange(_SLOTS)
    key_y = gy[..., None] * _SLOTS + slot
    jy = _unit(_hash(key_y, gx[..., None], self.salt(1))).astype(np.float64) - 0.5
    jx = _unit(_hash(key_y, gx[..., None], self.salt(2))).astype(np.float64) - 0.5
    split = self.split(gy, gx)[..., None]
    sub_y, sub_x = (slot // 2 + 0.5 + _SEED_JITTER * jy) / 2, (slot % 2 + 0.5 + _SEED_JITTER * jx) / 2
    one_y, one_x = 0.5 + _SEED_JITTER * jy, 0.5 + _SEED_JITTER * jx
    sy = (gy[..., None] + np.where(split, sub_y, one_y)) * self.spacing
    sx = (gx[..., None] + np.where(split, sub_x, one_x)) * self.spacing
    used = split | (slot == 0)
    return np.where(used, sy, _FAR), np.where(used, sx, _FAR)

  def warp_grid(self, ys, xs) -> tuple[np.ndarray, np.ndarray]:
    dy = sum(a * _noise_grid(ys, xs, s, self.salt(10 + i)) for i, (a, s) in enumerate(self.warp))
    dx = sum(a * _noise_grid(ys, xs, s, self.salt(20 + i)) for i, (a, s) in enumerate(self.warp))
    return dy, dx

  def warp_points(self, y, x) -> tuple[np.ndarray, np.ndarray]:
    octaves = len(self.warp)
    amplitudes = np.array([a for a, _ in self.warp] * 2)[:, None]
    scales = [s for _, s in self.warp] * 2
    salts = [self.salt(10 + i) for i in range(octaves)] + [self.salt(20 + i) for i in range(octaves)]
    d = amplitudes * _noise_points(y, x, scales, salts)
    return d[:octaves].sum(0), d[octaves:].sum(0)

  def to_pixels(self, qy: np.ndarray, qx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of q = A (p + D(p)) by fixed-point iteration (D is a gentle warp)."""
    uy = self.unstretch[0, 0] * qy + self.unstretch[0, 1] * qx
    ux = self.unstretch[1, 0] * qy + self.unstretch[1, 1] * qx
    py, px = uy, ux
    for _ in range(4):
      dy, dx = self.warp_points(py, px)
      py, px = uy - dy, ux - dx
    return py, px

  @property
  def lipschitz(self) -> float:
    """Bound on the warp's gradient (smoothstep value noise: |dn/dx| <= 3 / scale)."""
    return 3 * sum(amp / scale for amp, scale in self.warp)


@functools.lru_cache(maxsize=64)
def _plane(config: SyntheticConfig, seed: int) -> _Plane:
  spacing = config.cell_size
  angle = math.pi * float(_unit(_hash(np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32), 0xA11CE)))
  c, s = math.cos(angle), math.sin(angle)
  rot = np.array([[c, -s], [s, c]])
  e = config.cell_elongation
  # Compressing q along rot[:, 0] by 1/e makes cells long along that direction in pixel space.
  stretch = rot @ np.diag([1 / e, e]) @ rot.T
  unstretch = rot @ np.diag([e, 1 / e]) @ rot.T
  amplitude = config.boundary_waviness * spacing
  warp = ((amplitude, 0.9 * spacing), (0.3 * amplitude, 0.3 * spacing), (0.08 * amplitude, 0.1 * spacing))
  return _Plane(config, seed, spacing, stretch, unstretch, (c, s), warp)


def _cell_keys(gy, gx, slot):
  """One int64 per cell: (gy * 2**32 + gx) * _SLOTS + slot, so key // _SLOTS identifies the grid cell."""
  return np.asarray(gy, np.int64) * (1 << 34) + np.asarray(gx, np.int64) * _SLOTS + slot


_TILE = 16  # pixels per side of the tiles that share one pruned list of candidate seeds


def _geometry(plane: _Plane, ys: np.ndarray, xs: np.ndarray, cap: float):
  """Nearest cell and distance to its boundary (clipped at `cap`) for every pixel of the grid ys x xs.

  ys and xs are consecutive integer coordinates (float64 [H] and [W]).

  The boundary distance is measured in the warped pixel space p' = p + D(p): for the nearest seed i and another
  seed j the distance to their bisector is (d_j^2 - d_i^2) / (2 |A (s_j - s_i)|), d being q-space distances, and the
  boundary distance is the minimum over j. Pixels are processed in 16 x 16 tiles, each against only the seeds that
  can matter to it (pruned exactly, see below), so the cost per pixel does not grow with the cell density.

  Returns:
    cell: int64 [H, W] cell key (_cell_keys); tone: float32 [H, W] per-cell uniform in [0, 1);
    dist: float32 [H, W] distance to the cell boundary in pixels, min(true distance, cap).
  """
  height, width = len(ys), len(xs)
  # Extend the window to whole tiles of a global 16 x 16 grid, so that each tile, and the float32 origin it works
  # from, is the same whatever window asks for it; the extra pixels are computed and dropped.
  before_y, before_x = int(ys[0] % _TILE), int(xs[0] % _TILE)
  ys = ys[0] - before_y + np.arange(before_y + height + (-(before_y + height) % _TILE), dtype=np.float64)
  xs = xs[0] - before_x + np.arange(before_x + width + (-(before_x + width) % _TILE), dtype=np.float64)
  wy, wx = plane.warp_grid(ys, xs)
  py = ys[:, None] + wy.astype(np.float64)
  px = xs[None, :] + wx.astype(np.float64)
  a = plane.stretch
  qy = a[0, 0] * py + a[0, 1] * px
  qx = a[1, 0] * py + a[1, 1] * px
  tiles = lambda v: v.reshape(len(ys) // _TILE, _TILE, len(xs) // _TILE, _TILE).transpose(0, 2, 1, 3).reshape(
      -1, _TILE * _TILE)
  qy, qx = tiles(qy), tiles(qx)
  lo_y, hi_y, lo_x, hi_x = qy.min(1), qy.max(1), qx.min(1), qx.max(1)

  # Candidate seeds per tile: the (2r+1)^2 grid cells around the tile centre's. They hold every seed within `reach`
  # of the centre, which covers the pruning rule below: the centre's own grid cell has a seed within _OWN_SEED grid
  # steps, so `bound` <= _OWN_SEED * s + diag / 2 and kept seeds lie within bound + 2 * elongation * cap + diag / 2.
  s = plane.spacing
  elong = plane.config.cell_elongation
  diag = float(np.max(np.hypot(hi_y - lo_y, hi_x - lo_x)))
  reach = _OWN_SEED * s + diag + 2 * elong * cap
  r = math.ceil(reach / s)
  cy = np.floor((lo_y + hi_y) / (2 * s)).astype(np.int64)
  cx = np.floor((lo_x + hi_x) / (2 * s)).astype(np.int64)
  # Seeds of all grid cells the tiles can ask for, computed once per call, then gathered per tile.
  y0, x0 = cy.min() - r, cx.min() - r
  table_y, table_x = np.arange(y0, cy.max() + r + 1), np.arange(x0, cx.max() + r + 1)
  table_sy, table_sx = plane.seeds(table_y[:, None], table_x[None, :])  # [ny, nx, _SLOTS]
  offsets = np.arange(-r, r + 1)
  iy = (cy - y0)[:, None, None] + offsets[None, :, None]  # [tiles, 2r+1, 1]
  ix = (cx - x0)[:, None, None] + offsets[None, None, :]  # [tiles, 1, 2r+1]
  n = len(cy)
  sy, sx = table_sy[iy, ix].reshape(n, -1), table_sx[iy, ix].reshape(n, -1)
  gy = np.broadcast_to(table_y[iy][..., None], iy.shape[:2] + (len(offsets), _SLOTS)).reshape(n, -1)
  gx = np.broadcast_to(table_x[ix][..., None], (n, len(offsets)) + ix.shape[2:] + (_SLOTS,)).reshape(n, -1)
  slot = np.tile(np.arange(_SLOTS), gy.shape[1] // _SLOTS)[None]
  # Exact pruning. For p in the box, d_nearest(p) <= min_j maxdist(j, box) = bound. A seed that is farther than
  # bound from the whole box is never nearest; it can only bring a boundary within `cap` (pixel distance, which is
  # at least the q-space distance / elongation, itself at least (d_j - d_i) / 2) if mindist(j, box) <= bound +
  # 2 * elongation * cap.
  far_y = np.maximum(np.abs(sy - lo_y[:, None]), np.abs(sy - hi_y[:, None]))
  far_x = np.maximum(np.abs(sx - lo_x[:, None]), np.abs(sx - hi_x[:, None]))
  bound = np.sqrt(far_y ** 2 + far_x ** 2).min(1)
  near_y = np.maximum(0, np.maximum(lo_y[:, None] - sy, sy - hi_y[:, None]))
  near_x = np.maximum(0, np.maximum(lo_x[:, None] - sx, sx - hi_x[:, None]))
  mindist = np.sqrt(near_y ** 2 + near_x ** 2)
  keep = mindist <= (bound + 2 * elong * cap)[:, None]
  k = int(keep.sum(1).max())
  order = np.argsort(np.where(keep, mindist, np.inf), axis=1, kind="stable")[:, :k]
  kept = np.take_along_axis(keep, order, 1)
  pick = lambda v: np.take_along_axis(np.broadcast_to(v, keep.shape), order, 1)
  sy, sx, gy, gx, slot = pick(sy), pick(sx), pick(gy), pick(gx), pick(slot)
  sy, sx = np.where(kept, sy, _FAR), np.where(kept, sx, _FAR)

  # Per-pixel work in float32 relative to each tile's corner (a function of the tile's own pixels only), one
  # candidate at a time so that every temporary is [tiles, T*T].
  oy, ox = np.floor(lo_y)[:, None], np.floor(lo_x)[:, None]
  qy, qx = (qy - oy).astype(np.float32), (qx - ox).astype(np.float32)
  ty, tx = np.minimum(sy - oy, 1e9).astype(np.float32), np.minimum(sx - ox, 1e9).astype(np.float32)
  d2 = np.empty((k,) + qy.shape, np.float32)
  for j in range(k):
    d2[j] = np.square(qy - ty[:, j:j + 1]) + np.square(qx - tx[:, j:j + 1])
  nearest = np.argmin(d2, axis=0)  # [tiles, T*T]
  d2_near = np.take_along_axis(d2, nearest[None], 0)[0]
  # Bisector distance (d_j^2 - d_i^2) / (2 |A (s_j - s_i)|); j = i gives 0 / 0 = nan, which fmin skips.
  by = (a[0, 0] * sy + a[0, 1] * sx) - (a[0, 0] * oy + a[0, 1] * ox)
  bx = (a[1, 0] * sy + a[1, 1] * sx) - (a[1, 0] * oy + a[1, 1] * ox)
  by, bx = np.clip(by, -1e9, 1e9).astype(np.float32), np.clip(bx, -1e9, 1e9).astype(np.float32)
  by_near, bx_near = np.take_along_axis(by, nearest, 1), np.take_along_axis(bx, nearest, 1)
  dist = np.full(qy.shape, np.float32(cap))
  with np.errstate(divide="ignore", invalid="ignore"):
    for j in range(k):
      sep = np.sqrt(np.square(by[:, j:j + 1] - by_near) + np.square(bx[:, j:j + 1] - bx_near))
      np.fmin(dist, (d2[j] - d2_near) / (2 * sep), out=dist)
  key = _cell_keys(gy, gx, slot)
  tone = _unit(_hash(gy * _SLOTS + slot, gx, plane.salt(4)))
  near = lambda v: np.take_along_axis(np.broadcast_to(v, (len(cy), k)), nearest, 1)
  key, tone = near(key), near(tone)

  def untile(v):
    v = v.reshape(len(ys) // _TILE, len(xs) // _TILE, _TILE, _TILE).transpose(0, 2, 1, 3)
    return v.reshape(len(ys), len(xs))[before_y:before_y + height, before_x:before_x + width]

  return untile(key), untile(tone), untile(dist)


# ----------------------------------------------------------------------------------------------------------------
# Organelles: unlabelled dark structures placed inside each cell, drawn from an RNG keyed by the cell.

_NEIGHBOURS = np.arange(-2, 3)


def _room(plane: _Plane, gy: int, gx: int, slot: np.ndarray, py: np.ndarray, px: np.ndarray) -> np.ndarray:
  """Pixel-space clearance from points p [N] to the boundary of their cells (gy, gx, slot [N]); -inf outside.

  The boundary distance in the warped space p' (as the renderer measures it) divided by the largest stretch of the
  warp's Jacobian at p: a disc of that radius around p maps inside the cell while the Jacobian stays near its value
  at p, which holds for the smooth warp over organelle-sized discs.
  """
  ny, nx = np.meshgrid(gy + _NEIGHBOURS, gx + _NEIGHBOURS, indexing="ij")
  sy, sx = plane.seeds(ny.ravel(), nx.ravel())
  sy, sx = sy.ravel(), sx.ravel()
  own = (len(_NEIGHBOURS) ** 2 // 2) * _SLOTS + slot  # [N]
  rows = np.arange(len(own))
  # The warp at p and at p +- one pixel along y and x (for its Jacobian), in one batch.
  n = len(py)
  wy, wx = plane.warp_points(np.concatenate([py, py + 1, py - 1, py, py]),
                             np.concatenate([px, px, px, px + 1, px - 1]))
  (wy, wy_yp, wy_ym, wy_xp, wy_xm), (wx, wx_yp, wx_ym, wx_xp, wx_xm) = wy.reshape(5, n), wx.reshape(5, n)
  a = plane.stretch
  qy = a[0, 0] * (py + wy) + a[0, 1] * (px + wx)
  qx = a[1, 0] * (py + wy) + a[1, 1] * (px + wx)
  d2 = (qy[:, None] - sy) ** 2 + (qx[:, None] - sx) ** 2
  by, bx = a[0, 0] * sy + a[0, 1] * sx, a[1, 0] * sy + a[1, 1] * sx
  sep = np.hypot(by - by[own][:, None], bx - bx[own][:, None])  # [N, seeds]
  sep[rows, own] = 1.0
  bisector = (d2 - d2[rows, own][:, None]) / (2 * sep)
  bisector[rows, own] = np.inf
  dist = np.where(np.argmin(d2, 1) == own, bisector.min(1), -np.inf)
  # Jacobian of p -> p + D(p) by central differences, and its largest singular value.
  j00, j01 = 1 + (wy_yp - wy_ym) / 2, (wy_xp - wy_xm) / 2
  j10, j11 = (wx_yp - wx_ym) / 2, 1 + (wx_xp - wx_xm) / 2
  frob2 = j00 ** 2 + j01 ** 2 + j10 ** 2 + j11 ** 2
  det = j00 * j11 - j01 * j10
  sigma = np.sqrt((frob2 + np.sqrt(np.maximum(frob2 ** 2 - 4 * det ** 2, 0))) / 2)
  return dist / sigma


@functools.lru_cache(maxsize=16384)
def _cell_organelles(plane: _Plane, gy: int, gx: int) -> tuple[tuple, ...]:
  """Organelles of the cells of grid cell (gy, gx): (kind, cell key, y0, y1, x0, x1, params), y/x pixel bounds."""
  cfg = plane.config
  rng = np.random.default_rng([plane.seed & 0xFFFFFFFF, plane.seed >> 32, gy + (1 << 31), gx + (1 << 31), 7])
  split = bool(plane.split(gy, gx))
  share = 1 / _SLOTS if split else 1.0  # organelle counts follow the cell area
  seeds_y, seeds_x = plane.seeds(np.array(gy), np.array(gx))
  scale = cfg.organelle_scale * cfg.membrane_width_px
  margin = cfg.membrane_width_px * (1 + cfg.membrane_width_jitter) / 2 + 2
  max_extent = _max_organelle_extent(cfg)
  tries = 6
  slots = range(_SLOTS if split else 1)
  means = share * np.array([cfg.mitochondria_per_cell, cfg.vesicle_clusters_per_cell, cfg.er_per_cell,
                            cfg.microtubule_bundles_per_cell])
  kinds = [[kind for kind, count in zip(_MAKERS, rng.poisson(means)) for _ in range(count)] for _ in slots]
  # A few candidate centres per organelle around its cell's seed (the first with room enough is used), placed and
  # measured for all cells of the grid cell in one batch.
  slot_of = np.repeat(np.arange(len(kinds)), [len(k) * tries for k in kinds])
  if not len(slot_of):
    return ()
  extent = 0.55 * plane.spacing * math.sqrt(share)
  qy = seeds_y[slot_of] + extent * rng.uniform(-1, 1, len(slot_of))
  qx = seeds_x[slot_of] + extent * rng.uniform(-1, 1, len(slot_of))
  py, px = plane.to_pixels(qy, qx)
  free = np.minimum(_room(plane, gy, gx, slot_of, py, px) - margin, max_extent)
  organelles = []
  start = 0
  for slot in slots:
    key = int(_cell_keys(gy, gx, slot))
    placed = []  # (y, x, radius) of this cell's organelles, which must not overlap
    for index, kind in enumerate(kinds[slot]):
      for i in range(start + index * tries, start + (index + 1) * tries):
        room = min([free[i]] + [math.hypot(py[i] - y, px[i] - x) - r - 2 for y, x, r in placed])
        made = _MAKERS[kind](rng, plane, scale, room, py[i], px[i])
        if made is not None:
          items, radius = made
          placed.append((py[i], px[i], radius))
          organelles.extend((kind, key, *bounds) for kind, *bounds in items)
          break
    start += len(kinds[slot]) * tries
  return tuple(organelles)


def _max_organelle_extent(cfg: SyntheticConfig) -> float:
  """Largest distance from an organelle's centre to its bounding box edge, in pixels."""
  return 13 * cfg.organelle_scale * cfg.membrane_width_px + 6


def _make_mito(rng, plane, scale, free, cy, cx):
  b = scale * rng.uniform(2.2, 4.5)
  a = min(b * rng.uniform(1.3, 2.8), free)
  b = min(b, a / 1.15)
  if b < 1.8 * scale:
    return None
  along = math.atan2(plane.long_axis[1], plane.long_axis[0])
  angle = along + rng.normal(0, 0.3) if rng.uniform() < 0.7 else rng.uniform(0, math.pi)
  thick = max(1.3, 0.28 * scale)
  params = dict(a=a, b=b, cos=math.cos(angle), sin=math.sin(angle), thick=thick, gap=max(1.0, 0.35 * scale),
                period=scale * rng.uniform(0.9, 1.6), phase=rng.uniform(), tilt=rng.uniform(-0.3, 0.3),
                bend=rng.uniform(-0.4, 0.4),
                crista=max(1.0, 0.25 * scale), strength=plane.config.membrane_contrast * rng.uniform(0.8, 1.1),
                matrix=rng.uniform(0.06, 0.18), cy=cy, cx=cx)
  r = a + 2
  return [("mito", cy - r, cy + r, cx - r, cx + r, params)], a


def _make_vesicles(rng, plane, scale, free, cy, cx):
  if rng.uniform() < 0.15:  # a lone large vesicle (endosome-like)
    radii = [scale * rng.uniform(1.3, 2.6)]
    spread = 0.0
  else:
    spread = scale * rng.uniform(2.5, 7.0)
    radii = scale * rng.uniform(0.5, 0.85, int(rng.uniform(0.3, 0.55) * (spread / (0.7 * scale)) ** 2) + 2)
  spread = min(spread, free - max(radii))
  if spread < 0:
    return None
  out, placed = [], []
  strength = plane.config.membrane_contrast * rng.uniform(0.7, 1.1)
  for r in radii:
    for _ in range(6):
      dy, dx = rng.uniform(-1, 1, 2) * (spread - r if spread > r else 0.0)
      if dy * dy + dx * dx > spread * spread:
        continue
      if all(math.hypot(dy - py, dx - px) > r + pr + 1 for py, px, pr in placed):
        placed.append((dy, dx, r))
        y, x = cy + dy, cx + dx
        params = dict(cy=y, cx=x, r=r, thick=max(1.3, 0.3 * r), strength=strength, fill=rng.uniform(-0.03, 0.08))
        out.append(("vesicle", y - r - 2, y + r + 2, x - r - 2, x + r + 2, params))
        break
  return (out, spread + max(radii)) if out else None


def _make_er(rng, plane, scale, free, cy, cx):
  radius = scale * rng.uniform(3.0, 14.0)
  twin = scale * rng.uniform(1.0, 2.0) if rng.uniform() < 0.6 else 0.0  # the cisterna's other membrane
  return _arcs(rng, plane, cy, cx, free, radius, [0.0, twin] if twin else [0.0],
               half_length=scale * rng.uniform(1.5, 7.0), min_half_length=1.5 * scale,
               angle=rng.uniform(0, 2 * math.pi), thick=max(1.3, scale * rng.uniform(0.35, 0.8)),
               strength=plane.config.membrane_contrast * rng.uniform(0.75, 1.1))


def _make_tubules(rng, plane, scale, free, cy, cx):
  """A bundle of microtubules: faint thin parallel lines running along the cell."""
  spacing = scale * rng.uniform(1.0, 1.4)
  count = int(rng.integers(3, 7))
  along = math.atan2(plane.long_axis[1], plane.long_axis[0]) + rng.normal(0, 0.2)
  return _arcs(rng, plane, cy, cx, free, scale * rng.uniform(20, 60), [k * spacing for k in range(count)],
               half_length=scale * rng.uniform(4.0, 12.0), min_half_length=2 * scale, angle=along + math.pi / 2,
               thick=max(1.2, 0.25 * scale), strength=plane.config.membrane_contrast * rng.uniform(0.35, 0.6))


def _arcs(rng, plane, cy, cx, free, radius, offsets, *, half_length, min_half_length, angle, thick, strength):
  """Concentric arcs (radii radius + offsets) whose first arc's midpoint is (cy, cx), normal along `angle`."""
  del rng, plane
  spread = max(offsets)
  half_length = min(half_length, free - spread)
  if half_length < min_half_length:
    return None
  half_angle = min(half_length / radius, 1.4)
  my, mx = math.cos(angle), math.sin(angle)
  params = dict(cy=cy, cx=cx, oy=cy - radius * my, ox=cx - radius * mx, my=my, mx=mx,
                radii=[radius + o for o in offsets], cos_half=math.cos(half_angle), sin_half=math.sin(half_angle),
                thick=thick, strength=strength)
  r = half_length + spread + thick + 2
  return [("arcs", cy - r, cy + r, cx - r, cx + r, params)], half_length + spread


_MAKERS = {"mito": _make_mito, "vesicles": _make_vesicles, "er": _make_er, "tubules": _make_tubules}


def _line(d, center, half_width):
  """Anti-aliased line profile: 1 on a band of half-width `half_width` around `center`, box-filtered edges."""
  return np.clip(half_width + 0.5 - np.abs(d - center), 0, 1)


def _draw_mito(dy, dx, p):
  u = p["cos"] * dy + p["sin"] * dx
  v = -p["sin"] * dy + p["cos"] * dx
  a, b = p["a"], p["b"]
  r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
  g = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2)
  with np.errstate(divide="ignore", invalid="ignore"):
    d = np.where(g > 0, (r - 1) * r / g, -b)  # signed distance to the outline, negative inside
  t, gap = p["thick"], p["gap"]
  membranes = np.maximum(_line(d, -t / 2, t / 2), _line(d, -1.5 * t - gap, t / 2))
  inside = np.clip(-(d + 2 * t + gap) + 0.5, 0, 1)
  phase = (u + p["tilt"] * v + p["bend"] * v * v / b) / p["period"] + p["phase"]  # tilted, bent cristae
  cristae = _line((phase - np.floor(phase)) * p["period"], 0.5 * p["period"], p["crista"] / 2) * inside
  return p["strength"] * np.maximum(membranes, 0.75 * cristae) + p["matrix"] * inside


def _draw_vesicle(dy, dx, p):
  rho = np.sqrt(dy * dy + dx * dx)
  t = p["thick"]
  rim = _line(rho, p["r"] - t / 2, t / 2)
  return p["strength"] * rim + p["fill"] * np.clip(p["r"] - t - rho + 0.5, 0, 1)


def _draw_arcs(dy, dx, p):
  oy, ox = dy + (p["cy"] - p["oy"]), dx + (p["cx"] - p["ox"])
  rho = np.sqrt(oy * oy + ox * ox)
  in_span = oy * p["my"] + ox * p["mx"] >= rho * p["cos_half"]
  dark = np.zeros_like(rho)
  for radius in p["radii"]:
    ends = []
    for sign in (1, -1):  # arc end points: the mid direction rotated by +- the half angle
      ey = radius * (p["my"] * p["cos_half"] - sign * p["mx"] * p["sin_half"])
      ex = radius * (p["mx"] * p["cos_half"] + sign * p["my"] * p["sin_half"])
      ends.append(np.sqrt((oy - ey) ** 2 + (ox - ex) ** 2))
    d = np.where(in_span, np.abs(rho - radius), np.minimum(*ends))
    dark = np.maximum(dark, _line(d, 0, p["thick"] / 2))
  return p["strength"] * dark


_DRAWERS = {"mito": _draw_mito, "vesicle": _draw_vesicle, "arcs": _draw_arcs}


# ----------------------------------------------------------------------------------------------------------------
# Rendering.


def _halo(config: SyntheticConfig) -> int:
  """Rows and columns rendered around a window so that blur and granule dilation see their whole support."""
  blur = math.ceil(4 * config.blur_sigma) if config.blur_sigma > 0 else 0
  return blur + config.granule_size_px + 1


def _organelle_darkness(plane: _Plane, ys: np.ndarray, xs: np.ndarray, cell: np.ndarray) -> np.ndarray:
  """Summed darkness of the organelles on the grid ys x xs, each masked to its own cell. float32 [H, W].

  Masking makes a pixel depend only on the organelles of the cell it lies in, so any window renders the same pixel
  from the same organelles, and organelles never cross a membrane.
  """
  dark = np.zeros((len(ys), len(xs)), np.float32)
  for grid_key in np.unique(cell // _SLOTS):
    gy, gx = divmod(int(grid_key), 1 << 32)
    for kind, key, y0, y1, x0, x1, params in _cell_organelles(plane, gy, gx):
      r0, r1 = max(0, math.ceil(y0 - ys[0])), min(len(ys), math.floor(y1 - ys[0]) + 1)
      c0, c1 = max(0, math.ceil(x0 - xs[0])), min(len(xs), math.floor(x1 - xs[0]) + 1)
      if r0 >= r1 or c0 >= c1:
        continue
      dy = (ys[r0:r1] - params["cy"]).astype(np.float32)[:, None]
      dx = (xs[c0:c1] - params["cx"]).astype(np.float32)[None, :]
      inside = cell[r0:r1, c0:c1] == key
      dark[r0:r1, c0:c1] += np.where(inside, _DRAWERS[kind](dy, dx, params), 0)
  return dark


def _granules(cfg: SyntheticConfig, plane: _Plane, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
  """Darkness of small dark granules: sparse random pixels grown into granule_size_px squares (round once blurred)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  if cfg.granule_fraction <= 0:
    return np.zeros((len(ys), len(xs)), np.float32)
  h = _hash(ys.astype(np.int64)[:, None], xs.astype(np.int64)[None, :], plane.salt(70))
  rate = cfg.granule_fraction / cfg.granule_size_px ** 2
  u = _unit(h)
  strength = np.where(u < rate, 0.12 + 0.16 * (u / rate), 0).astype(np.float32)
  return ndimage.maximum_filter(strength, size=cfg.granule_size_px, mode="constant")


def render_block(config: SyntheticConfig, seed: int, top: int, left: int, height: int, width: int,
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Renders the window [top, top + height) x [left, left + width) of the infinite synthetic plane.

  The result does not depend on which window it is part of: rendering a big image and cutting a window out of it
  gives the same bytes. `config.height` and `config.width` are ignored here.

  Returns:
    image: uint8 [height, width]; label: uint8 [height, width], 0 = membrane, 255 = background.
  """
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  cfg = config
  plane = _plane(cfg, _check_seed(seed))
  halo = _halo(cfg)
  ys = np.arange(top - halo, top + height + halo, dtype=np.float64)
  xs = np.arange(left - halo, left + width + halo, dtype=np.float64)
  w = cfg.membrane_width_px
  cap = w * (1 + cfg.membrane_width_jitter) / 2 + 4  # beyond this only "far from any membrane" matters
  cell, tone, dist = _geometry(plane, ys, xs, cap)
  half = (w / 2) * (1 + cfg.membrane_width_jitter * _noise_grid(ys, xs, 4 * w, plane.salt(30)))
  label = dist < half
  membrane = np.clip(half + 0.5 - dist, 0, 1)
  if cfg.membrane_core_lightness:
    membrane *= 1 - cfg.membrane_core_lightness * np.clip(1 - dist / (0.6 * half), 0, 1)
  contrast = cfg.membrane_contrast * (1 + 0.25 * _noise_grid(ys, xs, 3 * w, plane.salt(31)))
  if cfg.low_contrast_fraction > 0:
    fade = _noise_grid(ys, xs, cfg.low_contrast_scale_px, plane.salt(32))
    fade = _smoothstep(np.clip((fade - _noise_quantile(1 - cfg.low_contrast_fraction)) / 0.12 + 0.5, 0, 1))
    contrast *= 1 - (1 - cfg.low_contrast_level) * fade
  organelles = _organelle_darkness(plane, ys, xs, cell) * np.clip((dist - half - 0.5) / 2.5, 0, 1)
  granules = _granules(cfg, plane, ys, xs)
  texture = sum(_noise_grid(ys, xs, scale, plane.salt(40 + i)) * weight
                for i, (scale, weight) in enumerate(zip(cfg.texture_scales_px, (0.5, 0.3, 0.2, 0.1, 0.1))))
  base = cfg.background_level + cfg.cell_tone_spread * (2 * tone - 1) + cfg.texture_strength * 2.2 * texture
  illumination = 1 + cfg.illumination_strength * (
      0.7 * _noise_grid(ys, xs, cfg.illumination_scale_px, plane.salt(50))
      + 0.3 * _noise_grid(ys, xs, cfg.illumination_scale_px / 3, plane.salt(51)))
  intensity = illumination * (base - contrast * membrane - organelles - granules)
  if cfg.blur_sigma > 0:
    intensity = ndimage.gaussian_filter(intensity, cfg.blur_sigma, mode="nearest", truncate=4.0)
  inner = (slice(halo, halo + height), slice(halo, halo + width))
  intensity = intensity[inner] + cfg.noise_sigma * _gaussian_grid(ys[inner[0]], xs[inner[1]], plane.salt(60))
  image = np.clip(np.rint(intensity * 255), 0, 255).astype(np.uint8)
  return image, np.where(label[inner], MEMBRANE, BACKGROUND).astype(np.uint8)


def render_cells(config: SyntheticConfig, seed: int, top: int, left: int, height: int, width: int) -> np.ndarray:
  """Cell identity of every pixel of a window (ground-truth instances, e.g. for region metrics).

  Returns:
    int64 [height, width]: one key per cell, shared by every pixel nearest to that cell's seed, membrane included.
  """
  ys = np.arange(top, top + height, dtype=np.float64)
  xs = np.arange(left, left + width, dtype=np.float64)
  return _geometry(_plane(config, _check_seed(seed)), ys, xs, cap=1.0)[0]


def render(config: SyntheticConfig, seed: int, *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Renders a config.height x config.width image and its label, block by block (memory O(block) + outputs).

  Args:
    config: generator parameters (e.g. urisc_like(), isbi_like()).
    seed: image seed, an integer in [0, 2**64).
    progress: show a progress bar over block rows (a 9958 x 9959 image takes about a minute).

  Returns:
    image: uint8 [H, W]; label: uint8 [H, W], 0 = membrane, 255 = background.
  """
  seed = _check_seed(seed)
  image = np.empty((config.height, config.width), np.uint8)
  label = np.empty((config.height, config.width), np.uint8)
  block = config.block_size
  rows = range(0, config.height, block)
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    rows = tqdm(rows, desc=f"synthetic {config.height} x {config.width}", unit="block row")
  for top in rows:
    for left in range(0, config.width, block):
      h, w = min(block, config.height - top), min(block, config.width - left)
      image[top:top + h, left:left + w], label[top:top + h, left:left + w] = render_block(
          config, seed, top, left, h, w)
  return image, label


def _check_seed(seed) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 1 << 64:
    raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
  return int(seed)


# ----------------------------------------------------------------------------------------------------------------
# A synthetic dataset in the U-RISC release layout.

SPLITS = ("train", "val", "test")
MANIFEST = "synthetic.json"


def image_seed(seed: int, split: str, index: int) -> int:
  """Seed of image `index` of `split` in a release generated with `seed`."""
  state = np.random.SeedSequence([_check_seed(seed), SPLITS.index(split), index]).generate_state(2, np.uint32)
  return int(state[0]) | int(state[1]) << 32


def write_release(root, *, num_train: int, num_val: int, num_test: int, height: int, width: int, seed: int,
                  preset: str = "urisc", track: str = "Track1", progress: bool = False) -> list[pathlib.Path]:
  """Writes a synthetic dataset in the U-RISC release layout, or returns at once if it is already there.

  Layout: imgs/<track>/<split>/<split>_NNN.png (3-channel gray PNG) and label/<track>/<split>/<split>_NNN.tiff (8-bit
  gray TIFF, 0 = membrane, 255 = background), plus synthetic.json recording the parameters. Every file is written
  atomically; an interrupted run resumes (files already written for the same parameters are kept), and a run with
  other parameters replaces the files the previous run listed.

  Args:
    root: dataset folder (created if needed). It must not hold a release that synthetic.json does not describe.
    num_train, num_val, num_test: images per split.
    height, width: image size in pixels.
    seed: dataset seed; image i of a split uses image_seed(seed, split, i).
    preset: "urisc" or "isbi" (see PRESETS).
    track: track folder name.
    progress: show a progress bar.

  Returns:
    Paths written (or found), images then labels per image, in split order.
  """
  root = pathlib.Path(root)
  if root.exists() and not root.is_dir():
    raise imageio.DataError(f"the synthetic release folder {root} is a file, not a folder; point config.data.root "
                            "at a folder (or leave it empty for workdir/data).")
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
  config = PRESETS[preset](height, width)
  counts = dict(train=num_train, val=num_val, test=num_test)
  params = dict(counts=counts, height=height, width=width, seed=_check_seed(seed), preset=preset, track=track,
                config=dataclasses.asdict(config), version=_GENERATOR_VERSION)
  params = json.loads(json.dumps(params))  # compare as stored (tuples come back as lists)
  items = [(split, i, f"{split}_{i:03d}") for split in SPLITS for i in range(counts[split])]
  relative = {stem: (f"imgs/{track}/{split}/{stem}.png", f"label/{track}/{split}/{stem}.tiff")
              for split, _, stem in items}
  paths = [root / rel for stem in relative for rel in relative[stem]]

  manifest_path = root / MANIFEST
  previous = _read_manifest(manifest_path)
  if previous is None:
    _refuse_foreign_data(root, track)
  elif previous.get("params") == params and previous.get("complete") and all(p.is_file() for p in paths):
    return paths
  elif previous.get("params") != params:
    for path in _listed_files(root, previous):  # files of the older run that this one does not rewrite
      if path not in paths and path.is_file():
        path.unlink()
  resume = previous is not None and previous.get("params") == params
  files = [str(p.relative_to(root)) for p in paths]
  _write_manifest(manifest_path, dict(params=params, files=files, complete=False))

  todo = items
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    todo = tqdm(items, desc=f"synthetic {preset} release", unit="image")
  for split, i, stem in todo:
    image_path, label_path = (root / rel for rel in relative[stem])
    if resume and image_path.is_file() and label_path.is_file():
      continue
    image, label = render(config, image_seed(seed, split, i))
    imageio.write_png(image_path, image, channels=3)
    imageio.write_tiff(label_path, label)
  _write_manifest(manifest_path, dict(params=params, files=files, complete=True))
  return paths


# What the generator writes, relative to the release folder: the only names a manifest may ask to delete.
_GENERATED_FILE = re.compile(r"(imgs/[A-Za-z0-9_.-]+/(train|val|test)/(train|val|test)_\d{3,}\.png"
                             r"|label/[A-Za-z0-9_.-]+/(train|val|test)/(train|val|test)_\d{3,}\.tiff)")


def _listed_files(root: pathlib.Path, manifest: dict) -> list[pathlib.Path]:
  """The files a previous run's manifest lists, checked to be the generator's own inside `root`.

  The manifest is a file in the data folder: anyone who can write there can edit it. Its list decides what is
  deleted, so an entry that is not a generated image or label name, or that leads out of the folder (an absolute
  path, `..`, a symlinked folder), stops the run instead of deleting anything.
  """
  files = manifest.get("files", [])
  where = root / MANIFEST
  if not isinstance(files, list):
    raise imageio.DataError(f"{where}: 'files' is not a list; the manifest is damaged. Delete {where} and the "
                            "generated imgs/ and label/ folders to write the release again.")
  resolved_root = root.resolve()
  listed = []
  for rel in files:
    path = root / str(rel)
    if not (isinstance(rel, str) and _GENERATED_FILE.fullmatch(rel)
            and path.resolve().is_relative_to(resolved_root)):
      raise imageio.DataError(
          f"{where} lists {rel!r}, which is not a file this generator writes inside {root}; refusing to delete it "
          f"(or anything else). If {root} is a synthetic release, delete {where} and its imgs/ and label/ folders "
          "to write it again; otherwise point config.data.root at an empty folder.")
    listed.append(path)
  return listed


def _read_manifest(path: pathlib.Path):
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}  # unreadable: treated as another run's, so everything is rewritten


def _write_manifest(path: pathlib.Path, content: dict):
  with imageio.atomic_path(path) as tmp:
    tmp.write_text(json.dumps(content, indent=1, sort_keys=True))


def _refuse_foreign_data(root: pathlib.Path, track: str):
  for folder in (root / "imgs" / track, root / "label" / track):
    if folder.is_dir() and any(p.is_file() for p in folder.rglob("*")):
      raise imageio.DataError(
          f"{folder} already holds files but {root / MANIFEST} is missing, so they were not written by this "
          "generator; refusing to mix synthetic images into it. Choose an empty folder for the synthetic release.")
