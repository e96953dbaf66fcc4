"""Per-class F1 by the official formula, pixel error and the ISBI sweep for data the official scorer refuses."""

import numpy as np
import pytest

from urisc_jax.evaluation import f1 as official
from urisc_jax.evaluation import two_class


def _cells(size=96, spacing=16, seed=0):
  """A grid of cells with 1-2 px membranes (about 15 % membrane) and a noisy prediction of it."""
  rng = np.random.default_rng(seed)
  gt = np.zeros((size, size), bool)
  gt[::spacing] = gt[1::spacing] = True
  gt[:, ::spacing] = True
  pred = gt ^ (rng.random(gt.shape) < 0.05)
  return pred, gt


def test_membrane_f1_is_the_official_score_where_the_official_scorer_accepts_the_prediction():
  rng = np.random.default_rng(1)
  gt = rng.random((64, 64)) < 0.1
  pred = (gt ^ (rng.random(gt.shape) < 0.03)) & (rng.random(gt.shape) < 0.9)  # within the 5:1 format rule
  expected = official.official_f1(np.where(pred, 0, 255).astype(np.uint8), np.where(gt, 0, 255).astype(np.uint8))
  np.testing.assert_allclose(two_class.formula_f1(pred, gt), expected, rtol=0, atol=1e-12)


def test_class_scores_match_confusion_counts():
  pred, gt = _cells()
  scores = two_class.image_scores(pred, gt)
  tp, fp, fn, tn = (np.sum(pred & gt), np.sum(pred & ~gt), np.sum(~pred & gt), np.sum(~pred & ~gt))
  assert scores["membrane_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
  assert scores["interior_f1"] == pytest.approx(2 * tn / (2 * tn + fn + fp), abs=1e-12)
  assert scores["interior_precision"] == pytest.approx(tn / (tn + fn), abs=1e-12)
  assert scores["pixel_error"] == pytest.approx((fp + fn) / gt.size, abs=1e-12)
  # With ~15 % membrane the interior class scores higher than the membrane class for the same errors.
  assert scores["interior_f1"] > scores["membrane_f1"]


def test_official_scorer_refuses_isbi_like_membrane_fractions_that_the_formula_scores():
  _, gt = _cells()
  submission = np.where(gt, 0, 255).astype(np.uint8)
  with pytest.raises(official.SubmissionFormatError):
    official.official_f1(submission, submission)
  assert two_class.formula_f1(gt, gt) == (1.0, 1.0, 1.0)


def test_dataset_scores_of_a_perfect_and_a_noisy_prediction():
  pred, gt = _cells()
  perfect = two_class.dataset_scores([gt.astype(np.float32)] * 2, [gt, gt], threshold=0.5, names=["a", "b"])
  assert perfect["membrane_f1"] == perfect["interior_f1"] == 1.0 and perfect["pixel_error"] == 0.0
  assert perfect["v_rand"] == pytest.approx(1.0) and perfect["v_info"] == pytest.approx(1.0)
  noisy = two_class.dataset_scores([pred.astype(np.float32), gt.astype(np.float32)], [gt, gt], threshold=0.5)
  assert noisy["membrane_f1"] == pytest.approx(np.mean([two_class.image_scores(pred, gt)["membrane_f1"], 1.0]))
  assert noisy["membrane_f1_sem"] > 0 and [row["name"] for row in noisy["per_image"]] == ["0", "1"]
  assert noisy["v_rand"] < 1.0


def test_real_isbi_labels_score_one_against_themselves(shared_dir):
  image = official.read_gray8(shared_dir / "data" / "isbi2012" / "train" / "labels" / "20.png")
  gt = image == 0
  scores = two_class.dataset_scores([gt.astype(np.float32)], [gt], threshold=0.5)
  assert 0.15 < gt.mean() < 0.3
  assert scores["membrane_f1"] == scores["interior_f1"] == 1.0 and scores["v_rand"] == pytest.approx(1.0)
