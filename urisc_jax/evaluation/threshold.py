"""Choosing a decision threshold by the official U-RISC F1, for many candidate thresholds in one pass.

A prediction is `score >= t`. For every candidate `t` at once, the official scorer's sums come from weighted
histograms of the score over the candidates' bins, so a sweep costs one pass over the pixels instead of one per
candidate. The sums are those of the official scorer (see `f1.py`):
  P = #(predicted & gt != white) / #predicted,   R = sum(inverted gt over predicted) / sum(inverted gt),
and a candidate whose prediction breaks the scorer's 5 background : 1 membrane rule scores 0 on that image (the
official scorer would reject the submission).
"""

import numpy as np

_BINARIZE_AT = 122  # Track 2 convention: membrane = gray <= 122.


def _inverted_truth(gt: np.ndarray, gt_mode: str) -> np.ndarray:
  gt = np.asarray(gt)
  if gt.dtype != np.uint8:
    raise ValueError(f"Ground truth must be uint8 as read from disk, got {gt.dtype}.")
  if gt_mode == "official":
    return 255.0 - gt.astype(np.float64)
  if gt_mode == "binarized":
    return np.where(gt <= _BINARIZE_AT, 255.0, 0.0)
  raise ValueError(f"gt_mode must be 'official' or 'binarized', got {gt_mode!r}.")


def f1_per_candidate(score: np.ndarray, gt: np.ndarray, candidates: np.ndarray, *,
                     gt_mode: str = "official") -> np.ndarray:
  """Official F1 of `score >= t` against `gt` for every t in `candidates`.

  Args:
    score: [H, W] membrane score, higher = more membrane (probability, or 255 - gray for an intensity baseline).
    gt: uint8 [H, W] ground truth as read from disk (black = membrane).
    candidates: increasing thresholds [K].
    gt_mode: "official" (GT gray levels as is) or "binarized" (membrane = gray <= 122).

  Returns:
    float64 [K] F1 per candidate; 0 where the prediction breaks the 5:1 rule.
  """
  candidates = np.asarray(candidates, np.float64)
  if np.any(np.diff(candidates) <= 0):
    raise ValueError("Threshold candidates must be strictly increasing.")
  score = np.asarray(score)
  truth = _inverted_truth(gt, gt_mode)
  if score.shape != truth.shape:
    raise ValueError(f"Score map {score.shape} and ground truth {truth.shape} differ in shape.")
  # Pixel with score s is predicted membrane by candidates 0 .. bin-1, where bin = #(candidates <= s).
  bins = np.searchsorted(candidates, score.ravel(), side="right")
  k = len(candidates) + 1
  truth = truth.ravel()

  def predicted_sum(weights=None):
    per_bin = np.bincount(bins, weights=weights, minlength=k)
    # Candidate j predicts every pixel whose bin is > j: a reversed cumulative sum over bins j+1 .. K.
    return np.cumsum(per_bin[::-1])[::-1][1:]

  n_predicted = predicted_sum()
  n_hit = predicted_sum((truth != 0).astype(np.float64))
  truth_recovered = predicted_sum(truth)
  truth_total = truth.sum()
  if truth_total > 0:
    # An empty prediction has P = 1 by the official scorer's convention.
    precision = np.divide(n_hit, n_predicted, out=np.ones_like(n_hit), where=n_predicted > 0)
    recall = truth_recovered / truth_total
  else:
    # Empty GT: an empty prediction scores P = R = 1, a non-empty one P = 0, R = 1.
    precision = np.where(n_predicted > 0, 0.0, 1.0)
    recall = np.ones_like(precision)
  denominator = precision + recall
  f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
  valid = score.size - n_predicted >= 5 * n_predicted
  return np.where(valid, f1, 0.0)


def select_threshold(scores: list[np.ndarray], truths: list[np.ndarray], candidates: np.ndarray, *,
                     gt_mode: str = "official") -> tuple[float, float]:
  """The candidate maximising the plain mean official F1 over images (ties: the lowest).

  Returns:
    (threshold, mean F1 at that threshold).
  """
  if not scores or len(scores) != len(truths):
    raise ValueError(f"Need one ground truth per score map and at least one image; got {len(scores)} score maps "
                     f"and {len(truths)} ground truths.")
  mean_f1 = np.mean([f1_per_candidate(s, g, candidates, gt_mode=gt_mode) for s, g in zip(scores, truths)], axis=0)
  best = int(np.argmax(mean_f1))
  return float(np.asarray(candidates)[best]), float(mean_f1[best])
