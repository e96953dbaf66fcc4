"""Scores for datasets the official U-RISC scorer refuses: the official F1 formula per class, pixel error, V_rand.

An ISBI 2012 label is ~22 % membrane, so any good prediction breaks the official scorer's format rule (at least 5
background pixels per membrane pixel) and would score 0. The paper's "> 0.97 on ISBI 2012" therefore cannot be the
official scorer's number. What this module reports instead, and says so by its names:

  membrane_f1   the official formula (P = matched predicted membrane / predicted membrane, R = matched GT membrane /
                GT membrane, F = 2PR / (P + R), the official empty-map cases) on binary masks, membrane = positive
                class, no format check; with binary ground truth this equals `official_f1` wherever that accepts the
                prediction.
  interior_f1   the same formula with cell interior as the positive class (the number ISBI-style pixel F1s report,
                and the only reading under which > 0.97 is plausible with 22 % membrane).
  pixel_error   the fraction of misclassified pixels (ISBI 2012's classic pixel error).
  v_rand/v_info the ISBI 2012 foreground-restricted scores after thinning, best over thresholds (`isbi.py`).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from urisc_jax.evaluation import isbi
from urisc_jax.evaluation.f1 import mean_and_sem, pixel_error, precision_recall_f1


def formula_f1(pred_positive: np.ndarray, gt_positive: np.ndarray) -> tuple[float, float, float]:
  """(f1, precision, recall) of boolean [H, W] masks by the official scorer's formula, without its format checks."""
  pred_positive = np.asarray(pred_positive, bool)
  gt_positive = np.asarray(gt_positive, bool)
  if pred_positive.shape != gt_positive.shape:
    raise ValueError(f"shapes differ: prediction {pred_positive.shape} vs ground truth {gt_positive.shape}")
  matched = int(np.count_nonzero(pred_positive & gt_positive))
  return precision_recall_f1(matched, int(np.count_nonzero(pred_positive)), matched,
                             int(np.count_nonzero(gt_positive)))


def image_scores(pred_membrane: np.ndarray, gt_membrane: np.ndarray) -> dict[str, float]:
  """Membrane-class and interior-class F1 (with precision and recall) and pixel error of one image.

  Args:
    pred_membrane: bool [H, W], True on predicted membrane.
    gt_membrane: bool [H, W], True on ground-truth membrane.
  """
  scores = {}
  for name, pred, gt in (("membrane", pred_membrane, gt_membrane),
                         ("interior", ~np.asarray(pred_membrane, bool), ~np.asarray(gt_membrane, bool))):
    f1, precision, recall = formula_f1(pred, gt)
    scores.update({f"{name}_f1": f1, f"{name}_precision": precision, f"{name}_recall": recall})
  scores["pixel_error"] = pixel_error(pred_membrane, gt_membrane)
  return scores


def dataset_scores(membrane_probabilities: Sequence[np.ndarray], gt_membranes: Sequence[np.ndarray], *,
                   threshold: float, names: Sequence[str] | None = None,
                   isbi_thresholds: Sequence[float] = isbi.THRESHOLDS) -> dict[str, Any]:
  """Per-image and mean (+- s.e.) two-class scores at `threshold`, plus V_rand / V_info over `isbi_thresholds`.

  Args:
    membrane_probabilities: float [H, W] maps in [0, 1], one per image.
    gt_membranes: bool [H, W] ground-truth membrane, same order.
    threshold: membrane probability threshold for the F1s and the pixel error (membrane = p >= threshold).
    names: image names for the per-image rows.
    isbi_thresholds: interior thresholds of the V_rand / V_info sweep (Fiji's 0.0 .. 1.0 by default).

  Returns:
    {"threshold", "<score>": mean, "<score>_sem": s.e. for each of `image_scores`, "v_rand", "v_rand_threshold",
     "v_info", "v_info_threshold", "per_image": [{"name", <scores>, "v_rand", "v_info"}]}.
  """
  if len(membrane_probabilities) != len(gt_membranes) or not gt_membranes:
    raise ValueError(f"need as many probability maps as ground truths (got {len(membrane_probabilities)} and "
                     f"{len(gt_membranes)}), at least one")
  names = list(names) if names is not None else [str(k) for k in range(len(gt_membranes))]
  rows = [{"name": name, **image_scores(np.asarray(p) >= threshold, gt)}
          for name, p, gt in zip(names, membrane_probabilities, gt_membranes)]
  result: dict[str, Any] = {"threshold": float(threshold)}
  for key in rows[0]:
    if key != "name":
      result[key], result[f"{key}_sem"] = mean_and_sem([row[key] for row in rows])
  swept = isbi.isbi_scores([np.asarray(gt, bool) for gt in gt_membranes],
                           [np.clip(np.asarray(p, np.float64), 0.0, 1.0) for p in membrane_probabilities],
                           thresholds=isbi_thresholds)
  for key in ("v_rand", "v_rand_threshold", "v_info", "v_info_threshold"):
    result[key] = swept[key]
  for row, per_slice in zip(rows, swept["per_slice"]):
    row.update(per_slice)
  result["per_image"] = rows
  return result
