"""What the scorer saw is what the results say: a thresholded (Track 2) label scored "official" is read as released,
"binarized" is named binarized@122, and the two differ by the golden values of the official examples."""

import dataclasses
import re

import ml_collections
import numpy as np
import pytest

from urisc_jax import predict
from urisc_jax.data import prepare, sources
from urisc_jax.evaluation import f1 as f1_lib
from urisc_jax.evaluation import ground_truth


def _golden(folder) -> dict:
  """{(pred, gt): {"official": (F, P, R), "binarized": (F, P, R)}} from the examples README."""
  table = {}
  for line in (folder / "README.txt").read_text().splitlines():
    match = re.match(r"\s*(\S+)\s+vs\s+(\S+)\s+F ([\d.]+)\s+P ([\d.]+)\s+R ([\d.]+)\s+F ([\d.]+)\s+P ([\d.]+)\s+R ([\d.]+)",
                     line)
    if match:
      values = [float(v) for v in match.groups()[2:]]
      table[(match[1], match[2])] = {"official": values[:3], "binarized": values[3:]}
  return table


def _config(gt_mode: str, label_threshold):
  config = ml_collections.ConfigDict({"eval": {"gt_mode": gt_mode},
                                      "data": {"label_threshold": label_threshold, "membrane": "black"}})
  return config


@pytest.fixture(scope="module")
def thresholded_example(shared_dir, tmp_path_factory):
  """The examples' gts/1.png (not binary: gray 0..7 and 248..255) prepared as a Track-2 label is: decoded at 122."""
  folder = shared_dir / "data" / "urisc_eval_examples"
  label = folder / "gts" / "1.png"
  image = tmp_path_factory.mktemp("image") / "1.png"
  sources.imageio.write_png(image, np.full(sources.imageio.read_gray(label).shape, 128, np.uint8))
  [prepared] = prepare.prepare_pairs([sources.ImagePair("1", image, label)], tmp_path_factory.mktemp("cache"),
                                     threshold=122, progress=False)
  return folder, prepared


def test_the_two_modes_differ_and_each_is_labelled(thresholded_example):
  folder, prepared = thresholded_example
  golden = _golden(folder)[("pres/1", "gts/1")]
  pred = f1_lib.read_gray8(folder / "pres" / "1.png")
  scores = {}
  for mode in ("official", "binarized"):
    gt = predict.ground_truth(prepared, _config(mode, 122))
    scores[mode] = f1_lib.official_f1(pred, gt, gt_mode=mode)
    np.testing.assert_allclose(scores[mode], golden[mode], atol=1e-6)
  assert abs(scores["official"][0] - scores["binarized"][0]) > 0.01  # 0.5247 against 0.5058
  assert ground_truth.describe("official") == "official"
  assert ground_truth.describe("binarized") == "binarized@122"
  # The cached mask alone is the label binarized: scoring it "official" would have given the binarized value.
  np.testing.assert_allclose(f1_lib.official_f1(pred, predict.ground_truth(prepared), gt_mode="official"),
                             golden["binarized"], atol=1e-6)


def test_binary_labels_score_the_same_both_ways_and_stay_labelled(shared_dir, tmp_path):
  folder = shared_dir / "data" / "urisc_eval_examples"
  gt = f1_lib.read_gray8(folder / "gts" / "1.png")
  binary = np.where(gt <= 122, np.uint8(0), np.uint8(255))
  sources.imageio.write_png(tmp_path / "label.png", binary)
  sources.imageio.write_png(tmp_path / "image.png", np.full(binary.shape, 128, np.uint8))
  [prepared] = prepare.prepare_pairs([sources.ImagePair("1", tmp_path / "image.png", tmp_path / "label.png")],
                                     tmp_path / "cache", progress=False)
  pred = f1_lib.read_gray8(folder / "pres" / "1.png")
  official = f1_lib.official_f1(pred, predict.ground_truth(prepared, _config("official", None)), gt_mode="official")
  binarized = f1_lib.official_f1(pred, predict.ground_truth(prepared, _config("binarized", None)),
                                 gt_mode="binarized")
  assert official == binarized
  np.testing.assert_allclose(official, _golden(folder)[("pres/1", "gts/1")]["binarized"], atol=1e-6)


def test_score_folders_names_the_mode(shared_dir):
  folder = shared_dir / "data" / "urisc_eval_examples"
  for mode, name in (("official", "official"), ("binarized", "binarized@122")):
    result = f1_lib.score_folders(folder / "pres", folder / "gts", gt_mode=mode)
    assert result["gt_mode"] == name
  with pytest.raises(ValueError, match="gt_mode"):
    ground_truth.describe("soft")


def test_official_mode_needs_the_released_label(thresholded_example, tmp_path):
  _, prepared = thresholded_example
  moved = dataclasses.replace(prepared, source_label=str(tmp_path / "gone.png"))
  with pytest.raises(ValueError, match="gt_mode='binarized'"):
    predict.ground_truth(moved, _config("official", 122))
  assert predict.ground_truth(moved, _config("binarized", 122)).shape == prepared.shape
