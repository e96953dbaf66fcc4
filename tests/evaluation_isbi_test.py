"""Tests of the ISBI 2012 V_rand / V_info scores: hand computations, brute force, scikit-image and real labels."""

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import adapted_rand_error
from skimage.metrics import variation_of_information

from urisc_jax.evaluation import f1 as f1_lib
from urisc_jax.evaluation import isbi


def _scores(gt_labels, proposal_labels):
  table = isbi.contingency_table(np.asarray(gt_labels), np.asarray(proposal_labels))
  return isbi.rand_scores(table), isbi.info_scores(table)


def test_a_merge_of_two_cells():
  # GT cells of 2, 2 and 4 pixels; the proposal merges the first two.
  rand, info = _scores([1, 1, 2, 2, 3, 3, 3, 3], [1, 1, 1, 1, 2, 2, 2, 2])
  # sum p^2 = (4 + 4 + 16) / 64, sum t^2 = (4 + 4 + 16) / 64, sum s^2 = (16 + 16) / 64
  assert rand == pytest.approx({"f_score": 48 / 56, "split": 1.0, "merge": 24 / 32}, abs=1e-15)
  # H(T) = 1.5 bits, H(S) = 1 bit, S is a function of T so I = H(S) = 1 bit.
  assert info["h_gt"] == pytest.approx(1.5 * math.log(2), abs=1e-15)
  assert info["h_proposal"] == pytest.approx(math.log(2), abs=1e-15)
  assert (info["split"], info["merge"], info["f_score"]) == pytest.approx((1.0, 2 / 3, 0.8), abs=1e-15)


def test_a_split_of_one_cell():
  rand, info = _scores([1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 2, 2, 3, 3, 3, 3])
  assert rand == pytest.approx({"f_score": 48 / 56, "split": 24 / 32, "merge": 1.0}, abs=1e-15)
  assert (info["split"], info["merge"], info["f_score"]) == pytest.approx((2 / 3, 1.0, 0.8), abs=1e-15)


def test_border_pixels_inside_a_cell_are_singletons():
  # Cell 1 (4 px): 3 in segment 1, one on a proposal border; cell 2 (4 px) all in segment 2.
  rand, _ = _scores([1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 0, 2, 2, 2, 2])
  # sum n_ij^2 = 9 + 16 + 1 (singleton), sum t^2 = 32, sum s^2 = 9 + 16 + 1
  assert rand == pytest.approx({"f_score": 52 / 58, "split": 26 / 32, "merge": 1.0}, abs=1e-15)


def test_identical_partitions_score_one_and_gt_membrane_is_ignored():
  rng = np.random.default_rng(0)
  gt = rng.integers(1, 8, (20, 20))
  permutation = rng.permutation(20) + 1
  proposal = permutation[gt]  # the same partition under other names
  rand, info = _scores(gt, proposal)
  assert rand["f_score"] == 1.0 and info["f_score"] == pytest.approx(1.0, abs=1e-12)
  gt_with_membrane = gt.copy()
  gt_with_membrane[::3] = 0
  noisy = proposal.copy()
  noisy[::3] = rng.integers(0, 30, noisy[::3].shape)  # anything on GT membrane is not scored
  rand, info = _scores(gt_with_membrane, noisy)
  assert rand["f_score"] == 1.0 and info["f_score"] == pytest.approx(1.0, abs=1e-12)


def _with_unique_singletons(proposal):
  relabelled = proposal.copy()
  border = proposal == 0
  relabelled[border] = proposal.max() + 1 + np.arange(np.count_nonzero(border))
  return relabelled


def test_rand_matches_a_brute_force_pair_count():
  rng = np.random.default_rng(1)
  gt = rng.integers(0, 4, 40)
  proposal = rng.integers(0, 4, 40)
  scored = gt > 0
  g, s = gt[scored], _with_unique_singletons(proposal)[scored]
  same_gt = g[:, None] == g[None, :]  # ordered pairs, each pixel with itself included (N^2 normalization)
  same_s = s[:, None] == s[None, :]
  both = np.count_nonzero(same_gt & same_s)
  rand, _ = _scores(gt, proposal)
  assert rand["split"] == pytest.approx(both / np.count_nonzero(same_gt), abs=1e-15)
  assert rand["merge"] == pytest.approx(both / np.count_nonzero(same_s), abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_scikit_image(seed):
  rng = np.random.default_rng(seed)
  gt = rng.integers(0, 6, (30, 30))
  proposal = rng.integers(0, 5, (30, 30))
  proposal[:10] = gt[:10]  # some agreement, so the scores are not near zero
  table = isbi.contingency_table(gt, proposal)
  singletons = _with_unique_singletons(proposal)
  are, _, _ = adapted_rand_error(gt, singletons, ignore_labels=(0,))
  rand = isbi.rand_scores(table, exclude_self_pairs=True)
  assert rand["f_score"] == pytest.approx(1.0 - are, abs=1e-12)
  info = isbi.info_scores(table)
  # scikit-image returns (H(S | T), H(T | S)) in bits.
  h_s_given_t, h_t_given_s = variation_of_information(gt, singletons, ignore_labels=(0,)) * math.log(2)
  assert info["h_proposal_given_gt"] == pytest.approx(h_s_given_t, abs=1e-12)
  assert info["h_gt_given_proposal"] == pytest.approx(h_t_given_s, abs=1e-12)


def test_watershed_border_is_one_pixel_on_the_probability_crest():
  # One row: seeds at both ends, membrane probability rising towards the right seed.
  interior = np.array([[1.0, 0.4, 0.3, 0.2, 0.1, 0.05, 1.0]])
  assert isbi.segment_proposal(interior, 0.5).tolist() == [[1, 1, 1, 1, 1, 0, 2]]
  flat = np.array([[1.0, 0, 0, 0, 0, 0, 1.0]])  # a binary proposal: the border falls mid-way
  assert isbi.segment_proposal(flat, 0.5).tolist() == [[1, 1, 1, 0, 2, 2, 2]]
  assert not isbi.segment_proposal(flat, 1.0).any()  # nothing interior: all border


def _two_cells():
  """4 x 9 image, membrane = column 4: GT cells of 16 pixels left and right."""
  membrane = np.zeros((4, 9), bool)
  membrane[:, 4] = True
  return membrane


def test_pipeline_merge_through_a_gap():
  gt = _two_cells()
  proposal = gt.copy()
  proposal[0, 4] = False  # one missing membrane pixel joins both cells
  result = isbi.isbi_scores(gt, proposal.astype(np.float32), thresholds=(0.5,))
  # One segment over 32 pixels: sum p^2 = 2 * 16^2, sum t^2 = 2 * 16^2, sum s^2 = 32^2.
  assert result["v_rand"] == pytest.approx(2 / 3, abs=1e-15)
  assert result["v_info"] == 0.0  # one segment carries no information
  # Scores average over slices, which may differ in size: add a perfectly predicted 4 x 4 slice.
  small = np.zeros((4, 4), bool)
  mixed = isbi.isbi_scores([gt, small], [proposal.astype(np.float32), small.astype(np.float32)], thresholds=(0.5,))
  assert mixed["v_rand"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-15)
  assert [s["v_rand"] for s in mixed["per_slice"]] == pytest.approx([2 / 3, 1.0], abs=1e-15)
  assert mixed["per_slice"][1]["v_info"] == 1.0  # one cell predicted as one segment


def test_pipeline_split_by_an_extra_line():
  gt = _two_cells()
  proposal = gt.copy()
  proposal[:, 1] = True  # splits the left cell into column 0 and columns 2..3; column 1 becomes border
  labels = isbi.segment_proposal(1.0 - proposal, 0.5)
  assert (labels[:, 1] == 0).all() and (labels[:, 4] == 0).all()
  scores = isbi.slice_scores(gt, 1.0 - proposal, 0.5)
  # Left cell: 4 px in segment A, 8 px in B, 4 border singletons; right cell: 16 px in C. N = 32.
  sum_joint = 16 + 64 + 256 + 4
  assert scores["v_rand"] == pytest.approx(2 * sum_joint / (512 + sum_joint), abs=1e-15)
  n = 32
  h = lambda sizes: math.log(n) - sum(c * math.log(c) for c in sizes) / n
  h_gt, h_s = h([16, 16]), h([4, 8, 16, 1, 1, 1, 1])
  mutual = h_gt + h_s - h_s  # S refines T, so H(T, S) = H(S)
  assert scores["v_info_split"] == pytest.approx(mutual / h_s, abs=1e-12)
  assert scores["v_info_merge"] == pytest.approx(1.0, abs=1e-12)


def test_best_threshold_and_perfect_proposal():
  gt = _two_cells()
  stack = np.stack([gt, gt[:, ::-1]])
  result = isbi.isbi_scores(stack, stack.astype(np.float64))
  assert result["num_slices"] == 2
  assert result["v_rand"] == 1.0 and result["v_info"] == pytest.approx(1.0, abs=1e-12)
  assert result["v_rand_threshold"] == 0.0  # ties keep the lowest threshold
  assert [row["threshold"] for row in result["per_threshold"]] == list(isbi.THRESHOLDS)
  assert result["per_threshold"][-1]["v_rand"] < 1.0  # at 1.0 nothing is interior


def test_input_errors():
  gt = _two_cells()
  with pytest.raises(ValueError, match="shape"):
    isbi.isbi_scores(gt, np.zeros((4, 8)))
  with pytest.raises(ValueError, match="within"):
    isbi.isbi_scores(gt, np.full(gt.shape, 1.5))
  with pytest.raises(ValueError, match="no cell"):
    isbi.isbi_scores(np.ones((4, 4), bool), np.zeros((4, 4)), thresholds=(0.5,))


def test_real_isbi_labels(shared_dir):
  folder = shared_dir / "data" / "isbi2012" / "train" / "labels"
  gt = np.stack([f1_lib.read_gray8(folder / f"{k:02d}.png") == 0 for k in (0, 1)])
  assert 0.15 < gt.mean() < 0.3  # black = membrane, about 22 % of the pixels
  self_scores = isbi.isbi_scores(gt[:1], gt[:1].astype(np.float32), thresholds=(0.0, 0.5, 1.0))
  assert self_scores["v_rand"] == 1.0 and self_scores["v_info"] == pytest.approx(1.0, abs=1e-12)
  dilated = np.stack([ndimage.binary_dilation(m) for m in gt])
  eroded = np.stack([ndimage.binary_erosion(m) for m in gt])
  thick = isbi.isbi_scores(gt, dilated.astype(np.float32), thresholds=(0.5,))
  thin = isbi.isbi_scores(gt, eroded.astype(np.float32), thresholds=(0.5,))
  # Thicker membranes keep the cells apart (only border pixels cost); thinned membranes break and merge cells.
  assert 0.99 < thick["v_rand"] < 1.0 and 0.99 < thick["v_info"] < 1.0
  assert thin["v_rand"] < 0.5 and thin["v_info"] < thick["v_info"]
