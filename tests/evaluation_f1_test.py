"""Tests of the official U-RISC F1 scorer: golden values, hand computations, format checks and file handling."""

import math
import pathlib
import re

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from urisc_jax.evaluation import f1 as f1_lib
from urisc_jax.evaluation import official_f1

WHITE, BLACK = 255, 0


def _golden_rows(readme: pathlib.Path):
  """Parses the golden-value table of the examples README: (pred, gt, official (F, P, R), binarized (F, P, R))."""
  number = r"([0-9.]+)"
  triple = rf"F {number}\s+P {number}\s+R {number}"
  pattern = re.compile(rf"^\s*(\S+)\s+vs\s+(\S+)\s+{triple}\s+{triple}\s*$")
  rows = []
  for line in readme.read_text().splitlines():
    match = pattern.match(line)
    if match:
      values = [float(v) for v in match.groups()[2:]]
      rows.append((match.group(1), match.group(2), tuple(values[:3]), tuple(values[3:])))
  return rows


def _example_path(folder: pathlib.Path, name: str) -> pathlib.Path:
  path = folder / name
  return path if path.suffix else path.with_suffix(".png")


def test_golden_values_of_the_official_examples(shared_dir):
  folder = shared_dir / "data" / "urisc_eval_examples"
  rows = _golden_rows(folder / "README.txt")
  assert len(rows) == 2, "the README golden-value table was not found"
  for pred_name, gt_name, official, binarized in rows:
    pred = f1_lib.read_gray8(_example_path(folder, pred_name))
    gt = f1_lib.read_gray8(_example_path(folder, gt_name))
    assert gt.shape == pred.shape == (1024, 1024)
    np.testing.assert_allclose(official_f1(pred, gt), official, atol=1e-6)
    np.testing.assert_allclose(official_f1(pred, gt, gt_mode="binarized"), binarized, atol=1e-6)


def test_score_folders_on_the_official_examples(shared_dir):
  folder = shared_dir / "data" / "urisc_eval_examples"
  result = f1_lib.score_folders(folder / "pres", folder / "gts")
  expected = official_f1(f1_lib.read_gray8(folder / "pres" / "1.png"), f1_lib.read_gray8(folder / "gts" / "1.png"))
  assert result["num_images"] == 1 and result["images"][0]["name"] == "1"
  assert result["mean_f1"] == pytest.approx(expected[0], abs=1e-15)
  assert math.isnan(result["sem_f1"])


def _hand_example():
  """10 x 10: predicted membrane = row 0; GT membrane = row 0 cols 0..4 (gray 0) and row 1 at gray 200."""
  pred = np.full((10, 10), WHITE, np.uint8)
  pred[0] = BLACK
  gt = np.full((10, 10), WHITE, np.uint8)
  gt[0, :5] = BLACK
  gt[1] = 200
  return pred, gt


def test_official_mode_weighs_recall_by_gray_level():
  pred, gt = _hand_example()
  precision = 5 / 10  # pred pixels on any non-white GT pixel
  recall = (5 * 255) / (5 * 255 + 10 * (255 - 200))  # GT weight covered / all GT weight
  expected_f1 = 2 * precision * recall / (precision + recall)
  assert official_f1(pred, gt) == pytest.approx((expected_f1, precision, recall), abs=1e-15)


def test_binarized_mode_thresholds_ground_truth_at_122():
  pred, gt = _hand_example()
  assert official_f1(pred, gt, gt_mode="binarized") == pytest.approx((2 / 3, 0.5, 1.0), abs=1e-15)
  gt[1] = 122  # gray <= 122 is membrane: row 1 joins the ground truth (15 pixels), none of it predicted.
  precision, recall = 5 / 10, 5 / 15
  expected_f1 = 2 * precision * recall / (precision + recall)
  assert official_f1(pred, gt, gt_mode="binarized") == pytest.approx((expected_f1, precision, recall), abs=1e-15)


def test_perfect_prediction_scores_one_in_both_modes():
  rng = np.random.default_rng(0)
  membrane = rng.random((32, 32)) < 0.1
  image = np.where(membrane, BLACK, WHITE).astype(np.uint8)
  for mode in f1_lib.GT_MODES:
    assert official_f1(image, image, gt_mode=mode) == (1.0, 1.0, 1.0)


def test_empty_cases():
  empty = np.full((8, 8), WHITE, np.uint8)
  some = empty.copy()
  some[0, :3] = BLACK
  assert official_f1(empty, some) == (0.0, 1.0, 0.0)
  assert official_f1(some, empty) == (0.0, 0.0, 1.0)
  assert official_f1(empty, empty) == (1.0, 1.0, 1.0)


def test_rgb_with_equal_channels_equals_gray():
  pred, gt = _hand_example()
  rgb = lambda x: np.repeat(x[..., None], 3, axis=-1)
  assert official_f1(rgb(pred), rgb(gt)) == official_f1(pred, gt)


@pytest.mark.parametrize("bound_pix", [1, 2, 3])
def test_boundary_tolerance_matches_a_distance_transform(bound_pix):
  rng = np.random.default_rng(bound_pix)
  gt_membrane = rng.random((40, 40)) < 0.08
  pred_membrane = rng.random((40, 40)) < 0.08
  pred = np.where(pred_membrane, BLACK, WHITE).astype(np.uint8)
  gt = np.where(gt_membrane, BLACK, WHITE).astype(np.uint8)
  # Independent reference: Euclidean distance from each pixel to the nearest membrane pixel of the other map.
  dist_to_gt = ndimage.distance_transform_edt(~gt_membrane)
  dist_to_pred = ndimage.distance_transform_edt(~pred_membrane)
  precision = np.count_nonzero(pred_membrane & (dist_to_gt <= bound_pix)) / np.count_nonzero(pred_membrane)
  recall = np.count_nonzero(gt_membrane & (dist_to_pred <= bound_pix)) / np.count_nonzero(gt_membrane)
  f1, p, r = official_f1(pred, gt, bound_pix=bound_pix)
  assert (p, r) == pytest.approx((precision, recall), abs=1e-15)
  assert f1 == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-15)


def test_boundary_tolerance_uses_a_euclidean_disk():
  pred = np.full((11, 11), WHITE, np.uint8)
  gt = pred.copy()
  gt[5, 5] = BLACK
  pred[6, 6] = BLACK  # diagonal neighbour: distance sqrt(2)
  assert official_f1(pred, gt, bound_pix=0)[0] == 0.0
  assert official_f1(pred, gt, bound_pix=1)[0] == 0.0
  assert official_f1(pred, gt, bound_pix=2)[0] == 1.0


@pytest.mark.parametrize("background, membrane_values, message", [
    (WHITE, (0, 128), "3 gray values"),
    (1, (0,), "not 0 and 255"),  # a 0/1 mask saved without scaling
])
def test_non_binary_predictions_are_rejected(background, membrane_values, message):
  pred = np.full((12, 12), background, np.uint8)
  for i, v in enumerate(membrane_values):
    pred[0, i] = v
  with pytest.raises(f1_lib.SubmissionFormatError, match=message):
    official_f1(pred, np.full((12, 12), WHITE, np.uint8))


def test_background_to_membrane_ratio_of_five_is_the_limit():
  gt = np.full((6, 10), WHITE, np.uint8)
  pred = gt.copy()
  pred.reshape(-1)[:10] = BLACK  # 10 membrane, 50 background: ratio exactly 5 passes
  official_f1(pred, gt)
  pred.reshape(-1)[10] = BLACK  # 11 membrane, 49 background
  with pytest.raises(f1_lib.SubmissionFormatError, match="polarity"):
    official_f1(pred, gt)
  with pytest.raises(f1_lib.SubmissionFormatError, match="polarity"):
    official_f1(255 - pred, gt)  # an inverted submission


def test_shape_dtype_and_color_errors():
  pred, gt = _hand_example()
  with pytest.raises(f1_lib.SubmissionFormatError, match="shape"):
    official_f1(pred, gt[:, :9])
  with pytest.raises(f1_lib.SubmissionFormatError, match="uint8"):
    official_f1(pred.astype(np.float32), gt)
  colored = np.repeat(gt[..., None], 3, axis=-1)
  colored[0, 0, 1] = 7
  with pytest.raises(f1_lib.SubmissionFormatError, match="unequal"):
    official_f1(pred, colored)
  with pytest.raises(ValueError, match="gt_mode"):
    official_f1(pred, gt, gt_mode="soft")
  with pytest.raises(ValueError, match="bound_pix"):
    official_f1(pred, gt, bound_pix=-1)


def test_pixel_error_counts_mismatches():
  pred = np.array([[1, 1, 0, 0], [0, 0, 0, 1]], bool)
  gt = np.array([[1, 0, 0, 0], [0, 0, 1, 1]], bool)
  assert f1_lib.pixel_error(pred, gt) == 2 / 8
  assert f1_lib.pixel_error(gt, gt) == 0.0


def test_mean_and_sem():
  mean, sem = f1_lib.mean_and_sem([1.0, 2.0, 3.0, 4.0])
  assert mean == 2.5
  # s.e. = sqrt(sum (x - mean)^2 / (n - 1)) / sqrt(n) = sqrt(5 / 3) / 2
  assert sem == pytest.approx(math.sqrt(5 / 3) / 2, abs=1e-15)
  with pytest.raises(ValueError):
    f1_lib.mean_and_sem([])


def test_read_gray8_formats(tmp_path):
  gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
  Image.fromarray(gray).save(tmp_path / "gray.png")
  Image.fromarray(np.repeat(gray[..., None], 3, axis=-1)).save(tmp_path / "rgb.png")
  tifffile.imwrite(tmp_path / "gray.tif", gray)
  tifffile.imwrite(tmp_path / "rgb.tiff", np.repeat(gray[..., None], 3, axis=-1))
  for name in ("gray.png", "rgb.png", "gray.tif", "rgb.tiff"):
    image = f1_lib.read_gray8(tmp_path / name)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, gray)


def test_read_gray8_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.png"):
    f1_lib.read_gray8(tmp_path / "missing.png")
  (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  with pytest.raises(f1_lib.ImageReadError, match="corrupt.png"):
    f1_lib.read_gray8(tmp_path / "corrupt.png")
  Image.fromarray(np.zeros((4, 4), np.uint16) + 1000).save(tmp_path / "deep.png")
  with pytest.raises(f1_lib.ImageReadError, match="deep.png"):
    f1_lib.read_gray8(tmp_path / "deep.png")
  tifffile.imwrite(tmp_path / "deep.tif", np.zeros((4, 4), np.uint16))
  with pytest.raises(f1_lib.ImageReadError, match="deep.tif"):
    f1_lib.read_gray8(tmp_path / "deep.tif")
  colored = np.zeros((4, 4, 3), np.uint8)
  colored[..., 0] = 255
  Image.fromarray(colored).save(tmp_path / "red.png")
  with pytest.raises(f1_lib.ImageReadError, match="red.png.*unequal"):
    f1_lib.read_gray8(tmp_path / "red.png")


def _write_pair(pred_dir, gt_dir, stem, pred, gt):
  Image.fromarray(pred).save(pred_dir / f"{stem}.png")
  tifffile.imwrite(gt_dir / f"{stem}.tiff", gt)


def test_score_folders_pairs_by_stem_and_averages(tmp_path):
  pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
  pred_dir.mkdir()
  gt_dir.mkdir()
  pred_a, gt_a = _hand_example()
  pred_b = np.full((10, 10), WHITE, np.uint8)
  pred_b[:, 0] = BLACK
  gt_b = pred_b.copy()
  _write_pair(pred_dir, gt_dir, "a", pred_a, gt_a)
  _write_pair(pred_dir, gt_dir, "b", pred_b, gt_b)
  result = f1_lib.score_folders(pred_dir, gt_dir)
  f_a = official_f1(pred_a, gt_a)[0]
  assert [row["name"] for row in result["images"]] == ["a", "b"]
  assert result["images"][1]["f1"] == 1.0
  assert result["mean_f1"] == pytest.approx((f_a + 1.0) / 2, abs=1e-15)
  assert result["sem_f1"] == pytest.approx(abs(1.0 - f_a) / 2, abs=1e-15)  # n = 2: s.e. = |x1 - x2| / 2
  binarized = f1_lib.score_folders(pred_dir, gt_dir, gt_mode="binarized")
  assert binarized["images"][0]["f1"] == pytest.approx(2 / 3, abs=1e-15)


def test_score_folders_reports_unpaired_and_bad_files(tmp_path):
  pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
  pred_dir.mkdir()
  gt_dir.mkdir()
  pred, gt = _hand_example()
  _write_pair(pred_dir, gt_dir, "a", pred, gt)
  Image.fromarray(pred).save(pred_dir / "only_pred.png")
  tifffile.imwrite(gt_dir / "only_gt.tif", gt)
  with pytest.raises(f1_lib.PairingError, match="only_gt.*only_pred"):
    f1_lib.score_folders(pred_dir, gt_dir)
  (pred_dir / "only_pred.png").unlink()
  (gt_dir / "only_gt.tif").unlink()
  Image.fromarray(255 - pred).save(pred_dir / "a.png")  # inverted polarity
  with pytest.raises(f1_lib.SubmissionFormatError, match="a.png"):
    f1_lib.score_folders(pred_dir, gt_dir)
  # Not strict: the rejected submission scores 0 and its row says why, as the competition treated it.
  _write_pair(pred_dir, gt_dir, "b", pred, gt)
  lenient = f1_lib.score_folders(pred_dir, gt_dir, strict=False)
  rejected, accepted = lenient["images"]
  assert (rejected["f1"], rejected["precision"], rejected["recall"]) == (0.0, 0.0, 0.0)
  assert "background pixels" in rejected["rejected"] or "gray" in rejected["rejected"]
  assert "rejected" not in accepted and lenient["num_rejected"] == 1
  assert lenient["mean_f1"] == pytest.approx(accepted["f1"] / 2)
