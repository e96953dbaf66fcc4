"""ISBI 2012 segmentation scores V_rand and V_info (Arganda-Carreras et al. 2015), following the Fiji protocol.

Protocol ("foreground-restricted scores after border thinning"), per 2-D slice and for each threshold th in
0.0, 0.1, ..., 1.0:

1. Ground-truth cells are the 4-connected components of non-membrane pixels (labels 1..K; membrane = 0).
2. Proposal: pixels with interior probability > th are interior; the 4-connected components of the interior seed a
   2-D watershed (4-connectivity, `skimage.segmentation.watershed(..., watershed_line=True)`) that floods the rest
   of the image and leaves borders exactly one pixel wide (label 0). The landscape flooded is the membrane
   probability 1 - p_interior, so a border runs along the crest of membrane probability; on a binary proposal the
   landscape is flat between seeds and, with ties flooded breadth-first, the border falls mid-way.
3. Only ground-truth cell pixels are scored (GT membrane pixels are dropped). A proposal border pixel (label 0)
   that lies inside a ground-truth cell counts as a segment of its own (a singleton), as in Fiji.
4. Scores are F-scores (alpha = 0.5) of a split score and a merge score, averaged over slices; the reported value is
   the best over thresholds, with the threshold that reached it (the lowest such threshold on ties).

With p_ij the fraction of the N scored pixels in GT cell i and proposal segment j, t_i = sum_j p_ij and
s_j = sum_i p_ij (singletons included):
  Rand:        split = sum p_ij^2 / sum t_i^2,   merge = sum p_ij^2 / sum s_j^2,   V_rand = harmonic mean.
  Information: split = I(S; T) / H(S),           merge = I(S; T) / H(T),           V_info = harmonic mean.
"split" is Fiji's recall for Rand and the paper's V_split; "merge" is Fiji's precision. The Rand sums count
ordered pixel pairs including each pixel with itself (Fiji's N^2 normalization); `rand_scores(...,
exclude_self_pairs=True)` counts distinct pairs instead, which is the convention of
`skimage.metrics.adapted_rand_error`.

Mapping to scikit-image (used as a cross-check in the tests): pass the GT cell labels as `image_true` with
`ignore_labels=(0,)`, and the proposal with every label-0 pixel given a fresh unique label (singletons). Then
`1 - adapted_rand_error(...)[0]` equals `rand_scores(table, exclude_self_pairs=True)["f_score"]`, and
`variation_of_information(gt, proposal, ignore_labels=(0,))` equals
(H(S | T), H(T | S)) of `info_scores`.

Differences from Fiji, on purpose: thresholds are exactly k / 10 (Fiji accumulates 0.1 in floating point); when
both segmentations are a single segment (both entropies 0) V_info is 1, not 0; a slice whose ground truth has no
cell pixels raises an error instead of dividing by zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy import sparse

# Fiji's protocol: thresholds 0.0, 0.1, ..., 1.0.
THRESHOLDS = tuple(k / 10 for k in range(11))
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def label_cells(membrane: np.ndarray) -> np.ndarray:
  """Ground-truth cells: 4-connected components of non-membrane pixels.

  Args:
    membrane: bool [H, W], True on membrane.

  Returns:
    int32 [H, W]: 0 on membrane, cells numbered 1..K.
  """
  membrane = np.asarray(membrane, dtype=bool)
  if membrane.ndim != 2:
    raise ValueError(f"expected a 2-D membrane mask [H, W], got shape {membrane.shape}")
  labels, _ = ndimage.label(~membrane, structure=_FOUR_CONNECTED)
  return labels.astype(np.int32)


def segment_proposal(interior_prob: np.ndarray, threshold: float) -> np.ndarray:
  """Proposal regions of one slice: seeds `interior_prob > threshold`, watershed with 1-pixel borders.

  Args:
    interior_prob: float [H, W], probability of cell interior (1 - membrane probability), in [0, 1].
    threshold: interior threshold.

  Returns:
    int32 [H, W]: regions 1..M, 0 on the one-pixel borders between regions (all 0 when nothing is interior).
  """
  from skimage.segmentation import watershed  # pylint: disable=g-import-not-at-top

  interior_prob = np.asarray(interior_prob, dtype=np.float64)
  if interior_prob.ndim != 2:
    raise ValueError(f"expected a 2-D probability map [H, W], got shape {interior_prob.shape}")
  seeds, num_seeds = ndimage.label(interior_prob > threshold, structure=_FOUR_CONNECTED)
  if num_seeds == 0:
    return np.zeros(interior_prob.shape, np.int32)
  regions = watershed(1.0 - interior_prob, markers=seeds, connectivity=1, watershed_line=True)
  return regions.astype(np.int32)


def contingency_table(gt_labels: np.ndarray, proposal_labels: np.ndarray) -> sparse.csr_array:
  """Pixel counts n_ij of GT cell i and proposal segment j over GT cell pixels (GT label 0 dropped).

  Args:
    gt_labels: non-negative int [...]: 0 = GT membrane (ignored), cells > 0.
    proposal_labels: non-negative int, same shape: 0 = proposal border (each pixel a singleton), segments > 0.

  Returns:
    int64 sparse table [max_gt + 1, max_proposal + 1]; row 0 is empty, column 0 holds border pixels.
  """
  gt_labels, proposal_labels = np.asarray(gt_labels), np.asarray(proposal_labels)
  if gt_labels.shape != proposal_labels.shape:
    raise ValueError(f"label images differ in shape: {gt_labels.shape} vs {proposal_labels.shape}")
  for name, labels in (("ground-truth", gt_labels), ("proposal", proposal_labels)):
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{name} labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
      raise ValueError(f"{name} labels must be non-negative")
  scored = gt_labels > 0
  rows = gt_labels[scored].astype(np.int64)
  cols = proposal_labels[scored].astype(np.int64)
  shape = (int(gt_labels.max(initial=0)) + 1, int(proposal_labels.max(initial=0)) + 1)
  table = sparse.coo_array((np.ones(rows.size, np.int64), (rows, cols)), shape=shape).tocsr()
  table.sum_duplicates()
  return table


def _split_table(table: sparse.csr_array) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """(n_ij for j >= 1, GT cell sizes t_i, proposal segment sizes s_j for j >= 1, border pixel count n_0)."""
  table = sparse.csr_array(table)
  gt_sizes = np.asarray(table.sum(axis=1)).ravel().astype(np.int64)
  segments = table[:, 1:]
  joint = segments.data.astype(np.int64)
  proposal_sizes = np.asarray(segments.sum(axis=0)).ravel().astype(np.int64)
  singletons = int(table[:, [0]].sum())
  return joint, gt_sizes[gt_sizes > 0], proposal_sizes[proposal_sizes > 0], singletons


def _ratio(numerator: float, denominator: float) -> float:
  # Numerators never exceed their denominators; 0 / 0 only when there is nothing to disagree on.
  return 1.0 if denominator == 0 else numerator / denominator


def _harmonic(a: float, b: float) -> float:
  return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def rand_scores(table: sparse.csr_array, *, exclude_self_pairs: bool = False) -> dict[str, float]:
  """Foreground-restricted Rand scores from a contingency table (see the module docstring).

  Args:
    table: counts from `contingency_table`.
    exclude_self_pairs: False counts ordered pairs including (x, x) as Fiji does; True counts distinct pairs as
      scikit-image does.

  Returns:
    {"f_score": V_rand, "split": sum p^2 / sum t^2, "merge": sum p^2 / sum s^2}.
  """
  joint, gt_sizes, proposal_sizes, singletons = _split_table(table)
  num_pixels = int(gt_sizes.sum())
  if num_pixels == 0:
    raise ValueError("the ground truth has no cell (non-membrane) pixels: the Rand scores are undefined")
  # Exact integer sums: each border pixel is its own segment, contributing 1 to the joint and proposal sums.
  sum_joint = int(joint @ joint) + singletons
  sum_gt = int(gt_sizes @ gt_sizes)
  sum_proposal = int(proposal_sizes @ proposal_sizes) + singletons
  if exclude_self_pairs:
    sum_joint, sum_gt, sum_proposal = (s - num_pixels for s in (sum_joint, sum_gt, sum_proposal))
  return {
      "f_score": _ratio(2 * sum_joint, sum_gt + sum_proposal),
      "split": _ratio(sum_joint, sum_gt),
      "merge": _ratio(sum_joint, sum_proposal),
  }


def _sum_xlogx(counts: np.ndarray) -> float:
  counts = counts[counts > 0].astype(np.float64)
  return float(np.sum(counts * np.log(counts)))


def info_scores(table: sparse.csr_array) -> dict[str, float]:
  """Foreground-restricted information-theoretic scores from a contingency table (natural logarithms).

  Returns:
    {"f_score": V_info, "split": I / H(S), "merge": I / H(T), "h_gt": H(T), "h_proposal": H(S),
     "h_gt_given_proposal": H(T | S), "h_proposal_given_gt": H(S | T)}, T = ground truth, S = proposal.
  """
  joint, gt_sizes, proposal_sizes, singletons = _split_table(table)
  n = int(gt_sizes.sum())
  if n == 0:
    raise ValueError("the ground truth has no cell (non-membrane) pixels: the information scores are undefined")
  log_n = np.log(n)
  # H = log N - (1/N) sum c log c over cell sizes c; a singleton has c = 1 and adds nothing to the sum.
  h_gt = log_n - _sum_xlogx(gt_sizes) / n
  h_proposal = log_n - _sum_xlogx(proposal_sizes) / n
  h_joint = log_n - _sum_xlogx(joint) / n
  # Clamp rounding noise: entropies are >= 0 and 0 <= I <= min(H(T), H(S)).
  h_gt, h_proposal = max(h_gt, 0.0), max(h_proposal, 0.0)
  h_joint = min(max(h_joint, h_gt, h_proposal), h_gt + h_proposal)
  mutual = h_gt + h_proposal - h_joint
  if h_gt == 0 and h_proposal == 0:
    split = merge = 1.0  # one segment each: identical partitions.
  else:
    split = mutual / h_proposal if h_proposal > 0 else 0.0
    merge = mutual / h_gt if h_gt > 0 else 0.0
  return {
      "f_score": _harmonic(split, merge),
      "split": split,
      "merge": merge,
      "h_gt": h_gt,
      "h_proposal": h_proposal,
      "h_gt_given_proposal": h_joint - h_proposal,
      "h_proposal_given_gt": h_joint - h_gt,
  }


def _as_slices(arrays: np.ndarray | Sequence[np.ndarray], name: str) -> list[np.ndarray]:
  """A 2-D array, a 3-D stack or a sequence of 2-D arrays (sizes may differ) -> list of 2-D arrays."""
  if isinstance(arrays, np.ndarray):
    if arrays.ndim == 2:
      return [arrays]
    if arrays.ndim == 3:
      return list(arrays)
    raise ValueError(f"{name}: expected [H, W] or [slices, H, W], got shape {arrays.shape}")
  slices = [np.asarray(a) for a in arrays]
  for a in slices:
    if a.ndim != 2:
      raise ValueError(f"{name}: every slice must be 2-D [H, W], got shape {a.shape}")
  return slices


def slice_scores(gt_membrane: np.ndarray, interior_prob: np.ndarray, threshold: float) -> dict[str, float]:
  """V_rand and V_info (with split / merge parts) of one slice at one threshold.

  Args:
    gt_membrane: bool [H, W], True on ground-truth membrane.
    interior_prob: float [H, W], interior probability (1 - membrane probability).
    threshold: interior threshold.
  """
  table = contingency_table(label_cells(gt_membrane), segment_proposal(interior_prob, threshold))
  rand, info = rand_scores(table), info_scores(table)
  return {
      "v_rand": rand["f_score"], "v_rand_split": rand["split"], "v_rand_merge": rand["merge"],
      "v_info": info["f_score"], "v_info_split": info["split"], "v_info_merge": info["merge"],
  }


def isbi_scores(gt_membrane: np.ndarray | Sequence[np.ndarray], membrane_prob: np.ndarray | Sequence[np.ndarray],
                *, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, Any]:
  """ISBI 2012 V_rand and V_info of a set of 2-D slices, best over thresholds.

  Args:
    gt_membrane: bool [H, W], [slices, H, W] or a sequence of [H_k, W_k]; True on ground-truth membrane.
    membrane_prob: same layout, float in [0, 1]: predicted membrane probability (a binary 0/1 map works too). The
      protocol thresholds the interior probability 1 - membrane_prob.
    thresholds: interior thresholds to try; Fiji's 0.0, 0.1, ..., 1.0 by default. Each costs one watershed per
      slice (about 0.04 s for 512 x 512 on one CPU core).

  Returns:
    {"v_rand", "v_rand_threshold", "v_info", "v_info_threshold", "num_slices",
     "per_threshold": [{"threshold", "v_rand", "v_rand_split", "v_rand_merge", "v_info", "v_info_split",
                        "v_info_merge"}, ...] (averages over slices),
     "per_slice": [{"v_rand", "v_info"}, ...] (each slice's score at the best thresholds above)}.
  """
  gt_slices = _as_slices(gt_membrane, "ground-truth membrane")
  prob_slices = _as_slices(membrane_prob, "membrane probability")
  if len(gt_slices) != len(prob_slices):
    raise ValueError(f"{len(gt_slices)} ground-truth slices but {len(prob_slices)} probability slices")
  interior_slices = []
  for k, (gt, prob) in enumerate(zip(gt_slices, prob_slices)):
    if gt.shape != prob.shape:
      raise ValueError(f"slice {k}: ground truth {gt.shape} and probability {prob.shape} differ in shape")
    prob = prob.astype(np.float64)
    if not np.all(np.isfinite(prob)) or prob.min() < 0 or prob.max() > 1:
      raise ValueError(f"slice {k}: membrane probabilities must be finite and within [0, 1]")
    interior_slices.append(1.0 - prob)
  if not thresholds:
    raise ValueError("need at least one threshold")
  per_threshold, per_slice_by_threshold = [], []
  for threshold in thresholds:
    per_slice = [slice_scores(gt.astype(bool), interior, threshold)
                 for gt, interior in zip(gt_slices, interior_slices)]
    row = {"threshold": float(threshold)}
    row.update({key: float(np.mean([s[key] for s in per_slice])) for key in per_slice[0]})
    per_threshold.append(row)
    per_slice_by_threshold.append(per_slice)
  result: dict[str, Any] = {"num_slices": len(gt_slices)}
  best = {}
  for key in ("v_rand", "v_info"):
    # Highest slice-averaged score; ties keep the lowest threshold, as Fiji's strict ">" does.
    best[key] = max(range(len(per_threshold)), key=lambda i, key=key: (per_threshold[i][key], -i))
    result[key] = per_threshold[best[key]][key]
    result[f"{key}_threshold"] = per_threshold[best[key]]["threshold"]
  result["per_threshold"] = per_threshold
  result["per_slice"] = [
      {key: per_slice_by_threshold[best[key]][k][key] for key in ("v_rand", "v_info")}
      for k in range(len(gt_slices))]
  return result
