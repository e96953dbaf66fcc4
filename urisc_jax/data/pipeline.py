"""Grain pipeline of augmented random crops: deterministic by seed, sharded per host, resumable.

Example `i` of a run is a pure function of (seed, i): its image, origin and augmentation come from
`np.random.default_rng([seed, i])`. Host `p` of `P` takes examples p, p + P, ..., so the global batch at a step is the
same whatever the number of hosts, and the Grain iterator state (saved with each checkpoint) resumes at the exact
next batch.
"""

import dataclasses

import grain
import numpy as np

from urisc_jax.data import augment, crops
from urisc_jax.data.prepare import PreparedImage


@dataclasses.dataclass
class CropExamples:
  """Maps an example index to {"image": uint8 [S, S, 1], "label": uint8 [S, S, 1] (1 = membrane)}.

  Images are chosen with probability proportional to their area, so every pixel is equally likely to be seen.
  Memory maps are opened lazily in each worker process rather than pickled with the object.
  """
  images: list[PreparedImage]
  crop_size: int
  seed: int
  flips: bool = True
  rotations: bool = True

  def __post_init__(self):
    if not self.images:
      raise ValueError("No training images: check config.data (source, root and train split).")
    if any(im.label_path is None for im in self.images):
      unlabelled = [im.source_image for im in self.images if im.label_path is None]
      raise ValueError(f"Training images need labels; these have none: {unlabelled[:3]}.")
    areas = np.array([h * w for h, w in (im.shape for im in self.images)], np.float64)
    self._probabilities = areas / areas.sum()
    self._arrays = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_arrays"] = None
    return state

  def _open(self):
    if self._arrays is None:
      self._arrays = [(im.image(), im.label()) for im in self.images]
    return self._arrays

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, int(index)])
    which = int(rng.choice(len(self.images), p=self._probabilities))
    image, label = self._open()[which]
    row, col = crops.random_origin(rng, image.shape, self.crop_size)
    window = np.s_[row:row + self.crop_size, col:col + self.crop_size]
    crop, crop_label = augment.random_dihedral(rng, image[window], label[window], flips=self.flips,
                                               rotations=self.rotations)
    return {"image": crop[..., None], "label": crop_label[..., None]}


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


def iterator(dataset: grain.MapDataset, *, num_workers: int = 0, prefetch_buffer: int = 2) -> grain.DatasetIterator:
  """An iterator with `get_state` / `set_state`; `num_workers` > 0 loads batches in worker processes."""
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0 if num_workers else 1,
                                                           prefetch_buffer_size=prefetch_buffer))
  if num_workers:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(iter_dataset)
