"""The one-pass threshold sweep agrees with the official scorer run once per threshold."""

import numpy as np
import pytest

from urisc_jax.evaluation import f1 as official
from urisc_jax.evaluation import threshold


def _case(seed, gt_levels=(0, 255)):
  rng = np.random.default_rng(seed)
  membrane = rng.random((40, 50)) < 0.06
  gt = np.where(membrane, gt_levels[0], gt_levels[1]).astype(np.uint8)
  # Scores correlated with the truth, plus noise, so the sweep has an interior optimum.
  score = np.clip(membrane * 0.5 + rng.random(membrane.shape) * 0.6, 0, 1).astype(np.float32)
  return score, gt


def _official_per_threshold(score, gt, candidates, gt_mode):
  values = []
  for t in candidates:
    pred = np.where(score >= t, 0, 255).astype(np.uint8)
    try:
      values.append(official.official_f1(pred, gt, gt_mode=gt_mode)[0])
    except official.SubmissionFormatError:
      values.append(0.0)
  return np.array(values)


@pytest.mark.parametrize("gt_mode", ["official", "binarized"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sweep_equals_official_scorer_per_threshold(seed, gt_mode):
  score, gt = _case(seed)
  # Gray, non-binary ground truth exercises the official mode's weighting.
  gt = np.where(gt == 0, np.uint8(3 + seed), np.uint8(250)).astype(np.uint8)
  candidates = np.round(np.arange(0.05, 1.0, 0.05), 2)
  np.testing.assert_allclose(threshold.f1_per_candidate(score, gt, candidates, gt_mode=gt_mode),
                             _official_per_threshold(score, gt, candidates, gt_mode), atol=1e-12)


def test_select_threshold_maximises_mean_f1():
  cases = [_case(s) for s in range(3)]
  candidates = np.round(np.arange(0.05, 1.0, 0.05), 2)
  best, best_f1 = threshold.select_threshold([c[0] for c in cases], [c[1] for c in cases], candidates)
  means = np.mean([_official_per_threshold(s, g, candidates, "official") for s, g in cases], axis=0)
  assert best == candidates[np.argmax(means)]
  np.testing.assert_allclose(best_f1, means.max(), atol=1e-12)
  assert 0.5 < best_f1 <= 1.0


def test_empty_ground_truth_follows_official_conventions():
  gt = np.full((10, 12), 255, np.uint8)
  score = np.zeros((10, 12), np.float32)
  score[0, 0] = 1.0
  f1 = threshold.f1_per_candidate(score, gt, np.array([0.5, 2.0]))
  # t = 0.5 predicts one pixel on an empty GT: P = 0, R = 1 -> F = 0; t = 2 predicts nothing: P = R = 1 -> F = 1.
  np.testing.assert_allclose(f1, [0.0, 1.0])


def test_rejects_unsorted_candidates():
  score, gt = _case(0)
  with pytest.raises(ValueError, match="increasing"):
    threshold.f1_per_candidate(score, gt, np.array([0.5, 0.2]))
