"""Train / validation splits, derived from one seed: by image (no leakage) or the paper's split of grid patches.

By image (`config.data.split.mode = "images"`): whole images go to one side, so no validation pixel was ever seen in
training; use it when a dataset has no validation split (ISBI 2012: 30 training slices). By patch, as the U-RISC
paper did (1024 x 1024 patches cut with overlap, 50,000 for training and 20,000 for validation): the overlapping grid
of every training image is split into disjoint sets of patches; training draws from the first and the validation
(threshold choice, best checkpoint) scores the second. Patches are distinct, but overlapping neighbours share
pixels (`overlap_pixels`: at stride 512, nearly every validation pixel is also in a training patch), so a
patch-level validation score is optimistic; the by-image split is the one to report.
"""

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from urisc_jax.data import crops

MODES = ("folders", "patch", "images")
_IMAGE_SPLIT_KEY = 11
_PATCH_SPLIT_KEY = 12
T = TypeVar("T")


def split_images(num_images: int, *, seed: int, num_val: int | None = None,
                 val_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Splits image indices 0..num_images-1 into disjoint train and validation sets.

  Args:
    num_images: how many images there are.
    seed: the run's seed; the same seed gives the same split.
    num_val: validation images; or
    val_fraction: share of the images for validation (rounded, at least one when the share is positive).

  Returns:
    (train, val): sorted int64 index arrays that together hold every index once.
  """
  if (num_val is None) == (val_fraction is None):
    raise ValueError("Pass exactly one of num_val and val_fraction.")
  if num_val is None:
    if not 0 <= val_fraction < 1:
      raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_val = max(1, round(val_fraction * num_images)) if val_fraction > 0 else 0
  if not 0 <= num_val < num_images:
    raise ValueError(f"Cannot hold out {num_val} of {num_images} images for validation and still train: lower the "
                     "number of validation images.")
  order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_IMAGE_SPLIT_KEY,))).permutation(num_images)
  return np.sort(order[num_val:]), np.sort(order[:num_val])


def holdout_images(images: Sequence[T], *, seed: int, val_fraction: float) -> tuple[list[T], list[T]]:
  """Holds out a seeded share of `images` for validation (`split_images` on their positions).

  Args:
    images: the training split, in a fixed order (the order decides which images a seed picks).
    seed: config.data.split.seed.
    val_fraction: share held out, in (0, 1): round(val_fraction * N), at least one.

  Returns:
    (train, val): disjoint lists, each in the order of `images`, together holding every image once.
  """
  if not 0 < val_fraction < 1:
    raise ValueError(f"config.data.split.val_fraction must be in (0, 1) to hold out validation images, got "
                     f"{val_fraction}.")
  if len(images) < 2:
    raise ValueError(f"Holding out validation images needs at least 2 training images, got {len(images)}: add "
                     "training images or name a validation split (config.data.split.mode='folders').")
  train, val = split_images(len(images), seed=seed, val_fraction=val_fraction)
  return [images[i] for i in train], [images[i] for i in val]


def grid_patches(shapes: Sequence[tuple[int, int]], *, patch_size: int, stride: int) -> np.ndarray:
  """Every patch of the overlapping grid of every image (last row and column flush with the border).

  Args:
    shapes: (H, W) of each image; each side must be at least `patch_size`.
    patch_size: patch side in pixels.
    stride: distance between neighbouring patches, 0 < stride <= patch_size.

  Returns:
    int64 [N, 3]: (image index, row, col) of each patch's top-left corner, image by image, row-major.
  """
  rows = []
  for index, (height, width) in enumerate(shapes):
    if height < patch_size or width < patch_size:
      raise ValueError(f"Image {index} is {height} x {width} px, smaller than the {patch_size} px patches: lower "
                       "config.data.crop_size.")
    for row, col in crops.grid_origins((height, width), patch_size, stride):
      rows.append((index, row, col))
  return np.array(rows, np.int64).reshape(-1, 3)


def split_patches(patches: np.ndarray, *, seed: int, val_fraction: float, num_train: int = 0,
                  num_val: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Splits grid patches into disjoint train and validation sets (the paper: 50,000 and 20,000).

  Args:
    patches: int [N, 3] from `grid_patches`.
    seed: the run's seed.
    val_fraction: share of the patches for validation when num_val is 0.
    num_train: training patches to keep (0 = every patch not in validation).
    num_val: validation patches (0 = round(val_fraction * N)).

  Returns:
    (train, val): int64 [n, 3] and [m, 3], each in grid order, with no patch in both.
  """
  total = len(patches)
  if num_val <= 0:
    if not 0 < val_fraction < 1:
      raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    num_val = max(1, round(val_fraction * total))
  num_train = num_train if num_train > 0 else total - num_val
  if num_train + num_val > total:
    raise ValueError(f"The grid holds {total} patches, fewer than the {num_train} + {num_val} asked for: lower "
                     "config.data.split.stride (more overlap) or the patch counts.")
  order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PATCH_SPLIT_KEY,))).permutation(total)
  val = np.sort(order[:num_val])
  train = np.sort(order[num_val:num_val + num_train])
  return patches[train], patches[val]


def patch_split(split_config, shapes: Sequence[tuple[int, int]], *, crop_size: int,
                seed: int) -> tuple[np.ndarray, np.ndarray] | None:
  """(train, val) patches as `config.data.split` asks for, or None when the split is by folder or by image.

  Args:
    split_config: config.data.split (mode, stride, num_train, num_val, val_fraction).
    shapes: (H, W) of the training images.
    crop_size: patch side, config.data.crop_size.
    seed: the run's seed.
  """
  mode = split_config.mode
  if mode not in MODES:
    raise ValueError(f"Unknown config.data.split.mode {mode!r}: choose one of {MODES}.")
  if mode in ("folders", "images"):
    return None
  stride = split_config.stride or max(1, crop_size // 2)
  patches = grid_patches(shapes, patch_size=crop_size, stride=stride)
  wanted = split_config.num_train + split_config.num_val
  if split_config.num_train > 0 and split_config.num_val > 0 and wanted > len(patches):
    raise ValueError(f"A {crop_size} px grid at stride {stride} over the {len(shapes)} training images holds "
                     f"{len(patches)} patches, fewer than the {split_config.num_train} + {split_config.num_val} asked "
                     f"for: set config.data.split.stride={stride_for(wanted, shapes, crop_size)} or lower the counts.")
  return split_patches(patches, seed=seed, val_fraction=split_config.val_fraction,
                       num_train=split_config.num_train, num_val=split_config.num_val)


def stride_for(num_patches: int, shapes: Sequence[tuple[int, int]], patch_size: int) -> int:
  """The largest stride whose grid over `shapes` holds at least `num_patches` patches (1 if none does)."""
  def count(stride):
    return sum(len(crops.tile_starts(h, patch_size, stride)) * len(crops.tile_starts(w, patch_size, stride))
               for h, w in shapes)
  low, high = 1, patch_size
  if count(high) >= num_patches:
    return high
  while high - low > 1:  # count() falls as the stride grows
    middle = (low + high) // 2
    low, high = (middle, high) if count(middle) >= num_patches else (low, middle)
  return low


def overlap_pixels(train: np.ndarray, val: np.ndarray, *, patch_size: int,
                   shapes: Sequence[tuple[int, int]]) -> dict[str, int]:
  """How many pixels the validation patches cover, and how many of those some training patch covers too.

  Exact, by coordinate compression: the patch edges cut each image into cells that are either inside a patch or
  not, so a 9958 x 9959 image costs a grid of about (2 x patches per side)^2 cells instead of 100 Mpixel.

  Args:
    train, val: int [N, 3] (image, row, col) patches from `split_patches`.
    patch_size: patch side in pixels.
    shapes: (H, W) of the images the patches index.

  Returns:
    {"val_pixels": union area of the validation patches, "shared_pixels": the part of it inside a training patch}.
  """
  val_pixels = shared_pixels = 0
  for index, (height, width) in enumerate(shapes):
    mine = {name: patches[patches[:, 0] == index, 1:] for name, patches in (("train", train), ("val", val))}
    if not len(mine["val"]):
      continue
    origins = np.concatenate([mine["train"], mine["val"]])
    rows = np.unique(np.concatenate([[0, height], origins[:, 0], origins[:, 0] + patch_size]))
    cols = np.unique(np.concatenate([[0, width], origins[:, 1], origins[:, 1] + patch_size]))
    area = np.diff(rows)[:, None] * np.diff(cols)[None, :]
    covered = {}
    for name, patches in mine.items():
      grid = np.zeros((len(rows) - 1, len(cols) - 1), np.int32)  # a 2-D difference array over the cells
      r0, r1 = np.searchsorted(rows, patches[:, 0]), np.searchsorted(rows, patches[:, 0] + patch_size)
      c0, c1 = np.searchsorted(cols, patches[:, 1]), np.searchsorted(cols, patches[:, 1] + patch_size)
      padded = np.zeros((grid.shape[0] + 1, grid.shape[1] + 1), np.int32)
      np.add.at(padded, (r0, c0), 1)
      np.add.at(padded, (r0, c1), -1)
      np.add.at(padded, (r1, c0), -1)
      np.add.at(padded, (r1, c1), 1)
      covered[name] = padded.cumsum(0).cumsum(1)[:-1, :-1] > 0
    val_pixels += int(area[covered["val"]].sum())
    shared_pixels += int(area[covered["val"] & covered["train"]].sum())
  return {"val_pixels": val_pixels, "shared_pixels": shared_pixels}
