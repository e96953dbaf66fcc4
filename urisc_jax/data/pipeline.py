"""Grain pipeline of augmented crops: deterministic by seed, sharded per host, resumable, run in worker processes.

Example `i` of a run is a pure function of (seed, i): its image, origin and augmentation come from
`np.random.default_rng([seed, i])`. Host `p` of `P` takes examples p, p + P, ..., so the global batch at a step is the
same whatever the number of hosts or workers, and the Grain iterator state (saved with each checkpoint) resumes at
the exact next batch.

Crops are cut from the decode-once cache (`prepare`) through `windows.NpyWindows`, which keeps a worker's memory
under a fixed budget whatever the number of images. Random crops draw an image with probability proportional to its area
and a uniform origin; with `patches` (the paper's patch-level split, see `splits`) examples walk the given grid
patches in a fresh seeded order every epoch, each patch then augmented.
"""

import dataclasses
import math
from collections.abc import Mapping

import grain
import numpy as np

from urisc_jax.data import augment as augmentations
from urisc_jax.data import splits
from urisc_jax.data.prepare import PreparedImage
from urisc_jax.data.windows import NpyWindows

_PATCH_ORDER_KEY = 21


@dataclasses.dataclass
class CropExamples:
  """Maps an example index to {"image": uint8 [S, S, 1], "label": uint8 [S, S, 1] (1 = membrane)}.

  Attributes:
    images: prepared, labelled images.
    crop_size: S.
    seed: the run's seed.
    flips, rotations: allow flips / right-angle rotations (False switches them off whatever `augment` says).
    augment: an AugmentConfig, or a mapping of its fields (config.data.augment); None = flips and right-angle
      rotations only, which are exact.
    patches: int [N, 3] (image index, row, col) of grid patches to draw from (`splits.patch_split`); None = random
      crops anywhere in the images.
  """
  images: list[PreparedImage]
  crop_size: int
  seed: int
  flips: bool = True
  rotations: bool = True
  augment: augmentations.AugmentConfig | Mapping | None = None
  patches: np.ndarray | None = None

  def __post_init__(self):
    if not self.images:
      raise ValueError("No training images: check config.data (source, root and train split).")
    if any(im.label_path is None for im in self.images):
      unlabelled = [im.source_image for im in self.images if im.label_path is None]
      raise ValueError(f"Training images need labels; these have none: {unlabelled[:3]}.")
    small = [im for im in self.images if min(im.shape) < self.crop_size]
    if small:
      raise ValueError(f"Crop size {self.crop_size} is larger than {small[0].source_image} ({small[0].shape[0]} x "
                       f"{small[0].shape[1]} px; {len(small)} images are too small): lower config.data.crop_size.")
    config = self.augment
    if config is None:
      config = augmentations.AugmentConfig()
    elif not isinstance(config, augmentations.AugmentConfig):
      config = augmentations.AugmentConfig.from_config(config)
    self._augment = dataclasses.replace(config, flip_p=config.flip_p if self.flips else 0.0,
                                        rot90=config.rot90 and self.rotations)
    if self.patches is not None:
      self.patches = _check_patches(np.asarray(self.patches), self.images, self.crop_size)
    areas = np.array([h * w for h, w in (im.shape for im in self.images)], np.float64)
    self._probabilities = areas / areas.sum()
    self._readers = None
    self._order = (None, None)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_readers"] = None
    state["_order"] = (None, None)
    return state

  def _open(self) -> list[tuple[NpyWindows, NpyWindows]]:
    if self._readers is None:
      self._readers = [_readers(im) for im in self.images]
    return self._readers

  def _patch(self, index: int) -> np.ndarray:
    """The patch of example `index`: epoch e = index // N visits every patch once, in a seeded order."""
    epoch, position = divmod(index, len(self.patches))
    if self._order[0] != epoch:
      rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_PATCH_ORDER_KEY, epoch)))
      self._order = (epoch, rng.permutation(len(self.patches)))
    return self.patches[self._order[1][position]]

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    rng = np.random.default_rng([self.seed, index])
    if self.patches is None:
      which, origin = int(rng.choice(len(self.images), p=self._probabilities)), None
    else:
      which, row, col = (int(v) for v in self._patch(index))
      origin = (row, col)
    params = augmentations.sample(rng, self._augment, self.crop_size)
    position = rng.random(2)  # drawn for patches too, so both modes consume the same draws
    image, label = self._crop(which, origin, position, params)
    image = augmentations.adjust_intensity(image, params)
    image = augmentations.apply_cutout(image, params, self._augment.cutout_blob)
    return {"image": np.ascontiguousarray(image)[..., None], "label": np.ascontiguousarray(label)[..., None]}

  def _crop(self, which: int, origin: tuple[int, int] | None, position: np.ndarray,
            params: augmentations.AugmentParams) -> tuple[np.ndarray, np.ndarray]:
    """The crop of image `which`, flipped and rotated: a window copy, or a warp of a bigger window."""
    image_reader, label_reader = self._open()[which]
    size = self.crop_size
    linear = augmentations.linear_map(params)
    identity = augmentations.is_identity(linear)
    extent = augmentations.half_extent(linear, size)
    shift = params.center_shift
    start = []
    for axis, length in enumerate(self.images[which].shape):
      low, high = _origin_range(length, size, extent[axis], shift[axis], identity=identity)
      if origin is None:
        value = low + math.floor(position[axis] * (high - low + 1)) if low <= high else (low + high) // 2
      else:
        value = min(max(origin[axis], low), high) if low <= high else origin[axis]
      start.append(value + shift[axis])
    if identity:
      box = (start[0], start[1], size, size)
      return (augmentations.dihedral(image_reader.read(*box), params),
              augmentations.dihedral(label_reader.read(*box), params))
    center = tuple(s + (size - 1) / 2 for s in start)
    top, left, height, width = augmentations.source_box(center, linear, size)
    local = (center[0] - top, center[1] - left)
    # Flips and right-angle rotations ride along in the warp (the source box is the same: it is symmetric).
    linear = linear @ augmentations.dihedral_map(params)
    # The warp reads the mapped cache files in place: no copy of the (up to 2 x crop size) source windows.
    image, label = augmentations.warp_windows(
        [image_reader.view(top, left, height, width), label_reader.view(top, left, height, width)],
        linear, local, size, orders=(1, 0), threads=self._augment.threads)
    return image, label


def _readers(image) -> tuple:
  """(image, label) window readers of an image of a split: the decode-once cache's .npy files, or the image's own
  (`volume_source.VolumeSection.windows`: TensorStore reads)."""
  if hasattr(image, "windows"):
    return image.windows()
  return NpyWindows(image.image_path), NpyWindows(image.label_path)


def _origin_range(length: int, size: int, extent: float, shift: int, *, identity: bool) -> tuple[int, int]:
  """Origins (before `shift`) whose crop, shifted, reads only pixels inside an axis of `length` pixels."""
  if identity:
    low, high = 0, length - size
  else:
    half = (size - 1) / 2
    low = math.ceil(extent + 1 - half)
    high = math.floor(length - 3 - extent - half)
  return low - shift, high - shift


def _check_patches(patches: np.ndarray, images: list[PreparedImage], crop_size: int) -> np.ndarray:
  if patches.ndim != 2 or patches.shape[1] != 3 or not len(patches):
    raise ValueError(f"patches must be a non-empty int array [N, 3] of (image, row, col), got {patches.shape}.")
  which = patches[:, 0]
  if which.min() < 0 or which.max() >= len(images):
    raise ValueError(f"patches name image {int(which.max())}, but there are {len(images)} images.")
  heights = np.array([images[i].shape[0] for i in which])
  widths = np.array([images[i].shape[1] for i in which])
  outside = (patches[:, 1] < 0) | (patches[:, 2] < 0) | (patches[:, 1] + crop_size > heights) | (
      patches[:, 2] + crop_size > widths)
  if outside.any():
    bad = patches[np.argmax(outside)]
    raise ValueError(f"patch {tuple(int(v) for v in bad)} does not fit a {crop_size} px crop inside its image: build "
                     "patches with splits.grid_patches for this crop size.")
  return patches.astype(np.int64)


def patch_split(data_config, images: list[PreparedImage], *,
                seed: int) -> tuple[np.ndarray, np.ndarray] | None:
  """(train, val) patches of `config.data.split` over the training images (None unless its mode is "patch")."""
  split_config = data_config.get("split") if hasattr(data_config, "get") else None
  if split_config is None:
    return None
  return splits.patch_split(split_config, [im.shape for im in images], crop_size=data_config.crop_size, seed=seed)


def train_patches(data_config, images: list[PreparedImage], *, seed: int) -> np.ndarray | None:
  """The training patches of `config.data.split` (None unless its mode is "patch")."""
  split = patch_split(data_config, images, seed=seed)
  return None if split is None else split[0]


def val_patches(data_config, images: list[PreparedImage], *, seed: int) -> np.ndarray | None:
  """The validation patches of `config.data.split` (None unless its mode is "patch"): never a training patch."""
  split = patch_split(data_config, images, seed=seed)
  return None if split is None else split[1]


@dataclasses.dataclass
class PatchCrops:
  """Maps i to the plain (unaugmented) crop of patch i: {"image", "label"} uint8 [S, S, 1], e.g. validation patches."""
  images: list[PreparedImage]
  patches: np.ndarray
  crop_size: int

  def __post_init__(self):
    self.patches = _check_patches(np.asarray(self.patches), self.images, self.crop_size)
    self._readers = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_readers"] = None
    return state

  def __len__(self) -> int:
    return len(self.patches)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if self._readers is None:
      self._readers = [_readers(im) for im in self.images]
    which, row, col = (int(v) for v in self.patches[index])
    image_reader, label_reader = self._readers[which]
    box = (row, col, self.crop_size, self.crop_size)
    return {"image": image_reader.read(*box)[..., None], "label": label_reader.read(*box)[..., None]}


def train_dataset(examples: CropExamples, *, num_steps: int, global_batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Batches of this host's share of `num_steps * global_batch_size` examples.

  Returns:
    A MapDataset whose element s is step s's local batch: {"image", "label"} of [global_batch / P, S, S, 1] uint8.
  """
  if global_batch_size % process_count:
    raise ValueError(f"config.train.batch_size={global_batch_size} must be divisible by the {process_count} hosts.")
  local_batch_size = global_batch_size // process_count
  indices = grain.MapDataset.range(num_steps * global_batch_size)[process_index::process_count]
  return indices.map(examples).batch(local_batch_size, drop_remainder=True)


def patch_dataset(crops: PatchCrops, *, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """This host's share of the patches in order, batched (the last batch may be smaller): validation passes."""
  return grain.MapDataset.source(crops)[process_index::process_count].batch(batch_size, drop_remainder=False)


def iterator(dataset: grain.MapDataset, *, num_workers: int = 0, prefetch_buffer: int = 2) -> grain.DatasetIterator:
  """An iterator with `get_state` / `set_state`; `num_workers` > 0 loads batches in worker processes.

  Worker processes read absl flags: outside `absl.app.run` (scripts, tests) call
  `absl.flags.FLAGS.mark_as_parsed()` first.
  """
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0 if num_workers else 1,
                                                           prefetch_buffer_size=prefetch_buffer))
  if num_workers:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(iter_dataset)
