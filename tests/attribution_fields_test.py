"""Attribution fields: S_k by hand, normalization, outcome sampling and per-outcome statistics."""

import math

import numpy as np
import pytest

from urisc_jax.attribution import fields


def test_field_area_matches_a_hand_computed_example():
  w = np.array([[0.0, 0.2, -4.0, 1.0],
                [2.0, 0.03, 0.05, -0.5],
                [4.0, 3.0, 0.001, 0.44]], np.float32)
  # Normalized by max |w| = 4: [[0, .05, -1, .25], [.5, .0075, .0125, -.125], [1, .75, .00025, .11]].
  k_grid = [0.0, 0.01, 0.1, 0.5, 0.99]
  counts = [9, 7, 5, 2, 1]  # > 0: all but 0, -1, -.125; > .01: not .0075, .00025; > .1: not .05, .0125 ...
  np.testing.assert_array_equal(fields.field_pixels(w, k_grid), counts)
  np.testing.assert_allclose(fields.field_areas(w, k_grid, pixel_nm=2.18), np.multiply(counts, 2.18**2))
  np.testing.assert_allclose(fields.field_areas(w, [0.1], pixel_nm=4.0), [5 * 16.0])
  # Scaling a map changes nothing; every map is normalized by its own peak.
  stacked = np.stack([w, 100 * w, np.zeros_like(w)])
  np.testing.assert_array_equal(fields.field_pixels(stacked, k_grid), [counts, counts, [0] * 5])
  with pytest.raises(ValueError, match="pixel size"):
    fields.field_areas(w, k_grid, pixel_nm=0.0)


def test_normalized_attributions_lie_in_minus_one_to_one():
  rng = np.random.default_rng(0)
  maps = rng.normal(size=(3, 8, 9)).astype(np.float32) * np.array([1, 10, 0.01], np.float32)[:, None, None]
  normalized = fields.normalize_attributions(maps)
  np.testing.assert_allclose(np.abs(normalized).max(axis=(1, 2)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(normalized * np.abs(maps).max(axis=(1, 2), keepdims=True), maps, rtol=1e-6)
  np.testing.assert_array_equal(fields.normalize_attributions(np.zeros((4, 4))), 0.0)


def _prediction_and_truth(seed=0, shape=(60, 70)):
  rng = np.random.default_rng(seed)
  truth = rng.random(shape) < 0.2
  predicted = truth ^ (rng.random(shape) < 0.1)  # flip 10 %: false positives and false negatives
  return predicted, truth


def test_sampled_targets_have_the_outcome_they_claim():
  predicted, truth = _prediction_and_truth()
  targets = fields.sample_targets(predicted, truth, 25, seed=3, border=5)
  assert [t.outcome for t in targets] == ["tp"] * 25 + ["fp"] * 25 + ["fn"] * 25
  masks = fields.outcome_masks(predicted, truth)
  for t in targets:
    assert masks[t.outcome][t.row, t.col]
    assert predicted[t.row, t.col] == (t.outcome in ("tp", "fp"))
    assert truth[t.row, t.col] == (t.outcome in ("tp", "fn"))
    assert 5 <= t.row < 55 and 5 <= t.col < 65
  assert len({(t.row, t.col) for t in targets}) == len(targets)  # without replacement
  # Seeded: the same seed draws the same pixels, another seed others; one outcome's draw ignores the others.
  assert fields.sample_targets(predicted, truth, 25, seed=3, border=5) == targets
  assert fields.sample_targets(predicted, truth, 25, seed=4, border=5) != targets
  assert fields.sample_targets(predicted, truth, 25, seed=3, border=5, outcomes=("fp",)) == targets[25:50]
  assert fields.sample_targets(predicted, truth, 25, seed=(3, 1), border=5) != targets


def test_sampling_takes_what_an_outcome_has():
  truth = np.zeros((20, 20), bool)
  truth[10, 3:6] = True
  predicted = truth.copy()
  predicted[10, 3] = False  # one false negative, two true positives, no false positive
  targets = fields.sample_targets(predicted, truth, 5, seed=0)
  assert sorted((t.outcome, t.row, t.col) for t in targets) == [("fn", 10, 3), ("tp", 10, 4), ("tp", 10, 5)]
  assert fields.sample_targets(predicted, truth, 5, seed=0, border=4) == [t for t in targets if t.col >= 4]
  with pytest.raises(ValueError, match="same image"):
    fields.sample_targets(predicted[:5], truth, 5)
  with pytest.raises(ValueError, match="tn"):
    fields.sample_targets(predicted, truth, 5, outcomes=("tn",))


def test_statistics_per_outcome_by_hand():
  areas = np.array([[10.0, 4.0], [20.0, 6.0], [30.0, 8.0], [5.0, 1.0]])
  outcomes = ["tp", "tp", "fp", "tp"]
  stats = fields.field_statistics(areas, outcomes, [0.01, 0.1], pixel_nm=1.0, image_pixels=[100, 100, 200, 50])
  assert stats["k_grid"] == [0.01, 0.1] and stats["pixel_nm"] == 1.0
  assert set(stats["outcomes"]) == {"all", "tp", "fp"}  # no false negatives: left out
  tp = stats["outcomes"]["tp"]
  assert tp["n"] == 3
  np.testing.assert_allclose(tp["mean_nm2"], [35 / 3, 11 / 3])
  np.testing.assert_allclose(tp["sem_nm2"], [np.std([10, 20, 5], ddof=1) / math.sqrt(3),
                                             np.std([4, 6, 1], ddof=1) / math.sqrt(3)])
  np.testing.assert_allclose(tp["median_nm2"], [10, 4])
  np.testing.assert_allclose(tp["mean_fraction_of_image"], [(0.1 + 0.2 + 0.1) / 3, (0.04 + 0.06 + 0.02) / 3])
  fp = stats["outcomes"]["fp"]
  assert fp["n"] == 1 and fp["mean_nm2"] == [30.0, 8.0] and math.isnan(fp["sem_nm2"][0])
  assert stats["outcomes"]["all"]["n"] == 4
  np.testing.assert_allclose(stats["outcomes"]["all"]["max_nm2"], [30, 8])
