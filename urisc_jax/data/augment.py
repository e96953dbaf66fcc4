"""Augmentations applied identically to an image crop and its label, driven by a numpy Generator.

Only exact, lossless geometric transforms for now (the dihedral group: flips, right-angle rotations), so labels stay
binary with no resampling.
"""

import numpy as np


def random_dihedral(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, *, flips: bool = True,
                    rotations: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Applies the same random flip / right-angle rotation to `image` and `label` ([H, W, ...], H == W for rotations).

  The random draws happen whether or not a transform is enabled, so switching one off does not shift the others.
  """
  flip_rows, flip_cols = rng.integers(0, 2, size=2)
  quarter_turns = int(rng.integers(0, 4))
  if flips and flip_rows:
    image, label = image[::-1], label[::-1]
  if flips and flip_cols:
    image, label = image[:, ::-1], label[:, ::-1]
  if rotations and quarter_turns:
    image, label = np.rot90(image, quarter_turns), np.rot90(label, quarter_turns)
  return np.ascontiguousarray(image), np.ascontiguousarray(label)
