"""Tests of the evaluation report: files written, numbers equal to the scorers they summarize."""

import json
import re

import numpy as np
import pytest
import tifffile
from PIL import Image

from urisc_jax.evaluation import f1 as f1_lib
from urisc_jax.evaluation import isbi
from urisc_jax.evaluation import report


def _grid(shift: int = 0) -> np.ndarray:
  """24 x 24 membrane mask: lines at rows / columns 0 and 12 (+ shift)."""
  membrane = np.zeros((24, 24), bool)
  membrane[[0, 12 + shift], :] = True
  membrane[:, [0, 12 + shift]] = True
  return membrane


def _to_png(membrane: np.ndarray) -> np.ndarray:
  return np.where(membrane, 0, 255).astype(np.uint8)


@pytest.fixture()
def folders(tmp_path):
  pred_dir, gt_dir, prob_dir = (tmp_path / name for name in ("pred", "gt", "prob"))
  for folder in (pred_dir, gt_dir, prob_dir):
    folder.mkdir()
  rng = np.random.default_rng(0)
  gt = _grid()
  for name, pred in (("a", gt), ("b", _grid(shift=1))):
    Image.fromarray(_to_png(pred)).save(pred_dir / f"{name}.png")
    tifffile.imwrite(gt_dir / f"{name}.tif", _to_png(gt))
    prob = np.clip(pred + rng.normal(0, 0.05, pred.shape), 0, 1).astype(np.float32)
    if name == "a":
      np.save(prob_dir / "a.npy", prob)
    else:
      tifffile.imwrite(prob_dir / "b.tif", prob)
  return pred_dir, gt_dir, prob_dir


def test_report_numbers_and_files(folders, tmp_path):
  pred_dir, gt_dir, _ = folders
  result = report.evaluate_folders(pred_dir, gt_dir, tmp_path / "out")
  f_a = f1_lib.official_f1(_to_png(_grid()), _to_png(_grid()))[0]
  f_b = f1_lib.official_f1(_to_png(_grid(1)), _to_png(_grid()))[0]
  assert f_a == 1.0 and 0 < f_b < 1
  assert result["mean_f1"] == pytest.approx((f_a + f_b) / 2, abs=1e-15)
  assert result["sem_f1"] == pytest.approx(f1_lib.mean_and_sem([f_a, f_b])[1], abs=1e-15)
  stored = json.loads((tmp_path / "out" / "evaluation.json").read_text())
  assert stored["mean_f1"] == pytest.approx(result["mean_f1"], abs=1e-15)
  assert [row["name"] for row in stored["images"]] == ["a", "b"]
  assert "isbi" not in stored
  markdown = (tmp_path / "out" / "evaluation.md").read_text()
  assert "| a | 1.0000 | 1.0000 | 1.0000 |" in markdown
  mean_line = re.search(r"Mean F1 = ([0-9.]+) \+- ([0-9.]+)", markdown)
  assert mean_line and float(mean_line.group(1)) == pytest.approx(result["mean_f1"], abs=1e-4)


def test_report_with_probabilities_adds_isbi_scores(folders, tmp_path):
  pred_dir, gt_dir, prob_dir = folders
  result = report.evaluate_folders(pred_dir, gt_dir, tmp_path / "out", prob_dir=prob_dir, thresholds=(0.3, 0.5))
  probs = [np.load(prob_dir / "a.npy"), tifffile.imread(prob_dir / "b.tif")]
  direct = isbi.isbi_scores([_grid(), _grid()], probs, thresholds=(0.3, 0.5))
  assert result["isbi"]["v_rand"] == pytest.approx(direct["v_rand"], abs=1e-15)
  assert result["isbi"]["v_info_threshold"] == direct["v_info_threshold"]
  assert result["images"][0]["v_rand"] == pytest.approx(1.0, abs=1e-15)  # a: perfect up to small noise
  assert result["images"][1]["v_rand"] < 1.0
  stored = json.loads((tmp_path / "out" / "evaluation.json").read_text())
  assert stored["isbi"]["v_rand"] == pytest.approx(direct["v_rand"], abs=1e-15)
  assert "V_rand" in (tmp_path / "out" / "evaluation.md").read_text()


def test_probability_errors(folders, tmp_path):
  pred_dir, gt_dir, prob_dir = folders
  (prob_dir / "b.tif").unlink()
  with pytest.raises(f1_lib.PairingError, match="for: b"):
    report.evaluate_folders(pred_dir, gt_dir, tmp_path / "out", prob_dir=prob_dir)
  np.save(prob_dir / "b.npy", np.zeros((24, 24), np.uint8))
  with pytest.raises(f1_lib.ImageReadError, match="b.npy.*float"):
    report.evaluate_folders(pred_dir, gt_dir, tmp_path / "out", prob_dir=prob_dir)
  np.save(prob_dir / "b.npy", np.full((24, 24), 1.5, np.float32))
  with pytest.raises(f1_lib.ImageReadError, match="within"):
    report.read_probability(prob_dir / "b.npy")


def test_report_on_the_official_examples(shared_dir, tmp_path):
  folder = shared_dir / "data" / "urisc_eval_examples"
  result = report.evaluate_folders(folder / "pres", folder / "gts", tmp_path)
  assert result["mean_f1"] == pytest.approx(0.524748, abs=1e-6)  # README golden value, official mode
  stored = json.loads((tmp_path / "evaluation.json").read_text())
  assert stored["sem_f1"] is None  # one image: no standard error
