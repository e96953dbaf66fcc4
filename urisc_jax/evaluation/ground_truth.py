"""The ground truth a score was computed against, and its honest name.

The official U-RISC scorer reads the label as released and does not binarize it: gray levels weigh the recall and
any pixel that is not pure white counts as membrane in the precision (`gt_mode="official"`). The competition
binarized the label at membrane = gray <= 122 (`gt_mode="binarized"`). For a binary label (Track 1, ISBI 2012) the
two give the same numbers; for Track 2, whose labels were binarized and then bilinearly resized, they differ.

Training reads Track-2 labels binarized (`config.data.label_threshold`), so the decode cache holds only the binary
mask. Scoring that mask under the name "official" would hide that the scorer never saw the gray levels. Here
`scored_ground_truth` re-reads the released label when the cached mask came from a threshold and the mode is
"official", and `describe` names what the scorer saw: "official" or "binarized@122". metrics.json and the reports
carry that name.
"""

import pathlib

import numpy as np

from urisc_jax.data import imageio, sources
from urisc_jax.evaluation.f1 import BINARIZE_LEVEL, GT_MODES


def describe(gt_mode: str) -> str:
  """The name of what the scorer saw: "official" (the label as released) or "binarized@<level>"."""
  if gt_mode not in GT_MODES:
    raise ValueError(f"gt_mode must be one of {GT_MODES}, got {gt_mode!r}.")
  return "official" if gt_mode == "official" else f"binarized@{BINARIZE_LEVEL}"


def _released_gray(image) -> np.ndarray:
  """The label of a prepared image as released, uint8 [H, W] (a page of a stack for stack slices)."""
  path = pathlib.Path(image.source_label) if image.source_label else None
  if path is None or not path.is_file():
    raise ValueError(f"The released label of {image.name} ({image.source_label}) is not a readable file, so it "
                     "cannot be scored as released: set config.eval.gt_mode='binarized' (membrane = gray <= "
                     f"{BINARIZE_LEVEL}), which this label supports.")
  if image.source_page is not None:
    return sources.read_stack_page(path, image.source_page)
  return imageio.read_gray(path)


def scored_ground_truth(image, *, gt_mode: str, label_threshold: int | None = None,
                        membrane: str = "black") -> np.ndarray:
  """The ground truth to hand the official scorer with `gt_mode`, uint8 [H, W], black = membrane.

  Args:
    image: a `prepare.PreparedImage` with a label.
    gt_mode: "official" or "binarized" (the scorer binarizes at gray <= 122 itself).
    label_threshold: the threshold the label was decoded with (config.data.label_threshold); None = the label is
      binary and the cached mask is the released file byte for byte.
    membrane: the label's polarity (config.data.membrane); a white-membrane label is inverted to the official one.

  Returns:
    For a binary label, the mask in the official polarity. For a thresholded label (Track 2), the released gray
    levels (inverted if membranes are white), which the "official" mode weighs and the "binarized" mode thresholds.
  """
  describe(gt_mode)  # raises on an unknown mode
  if label_threshold is None or (gt_mode == "binarized" and label_threshold == BINARIZE_LEVEL and membrane == "black"):
    return np.asarray(image.official_label())  # what the scorer would make of the released label anyway
  gray = _released_gray(image)
  return gray if membrane == "black" else 255 - gray
