"""Tests of the image definition criteria and the Track-2 downsampling."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from urisc_jax.evaluation import criteria


def _loop_reference(image):
  """Straight loops over the textbook sums, divided by their number of terms."""
  f = image.astype(float)
  height, width = f.shape
  mu = f.sum() / f.size
  brenner = sum((f[y, x + 2] - f[y, x]) ** 2 for y in range(height) for x in range(width - 2))
  smd2 = sum(abs(f[y, x] - f[y, x + 1]) * abs(f[y, x] - f[y + 1, x])
             for y in range(height - 1) for x in range(width - 1))
  variance = sum((f[y, x] - mu) ** 2 for y in range(height) for x in range(width))
  vollath = sum(f[y, x] * f[y, x + 1] for y in range(height) for x in range(width - 1))
  return {"brenner": brenner / (height * (width - 2)), "smd2": smd2 / ((height - 1) * (width - 1)),
          "variance": variance / f.size, "vollath": vollath / (height * (width - 1)) - mu * mu}


def test_hand_computed_3x3():
  image = np.array([[1, 2, 4], [0, 3, 3], [5, 1, 0]], np.uint8)
  # Brenner: (4-1)^2 + (3-0)^2 + (0-5)^2 = 43 over 3 terms.
  # SMD2: |1-2||1-0| + |2-4||2-3| + |0-3||0-5| + |3-3||3-1| = 1 + 2 + 15 + 0 = 18 over 4 terms.
  # Variance: sum f^2 / 9 - mu^2 = 65/9 - (19/9)^2 = 224/81.
  # Vollath: (1*2 + 2*4 + 0*3 + 3*3 + 5*1 + 1*0) / 6 - (19/9)^2 = 4 - 361/81 = -37/81.
  expected = {"brenner": 43 / 3, "smd2": 18 / 4, "variance": 224 / 81, "vollath": -37 / 81}
  assert criteria.image_criteria(image) == pytest.approx(expected, abs=1e-12)


def test_matches_loops_on_a_random_image(monkeypatch):
  monkeypatch.setattr(criteria, "_BLOCK_ROWS", 3)  # several row blocks, including a ragged last one
  image = np.random.default_rng(0).integers(0, 256, (11, 9)).astype(np.uint8)
  assert criteria.image_criteria(image) == pytest.approx(_loop_reference(image), rel=1e-12)


def test_constant_image_scores_zero():
  values = criteria.image_criteria(np.full((20, 30), 137, np.uint8))
  assert values["brenner"] == values["smd2"] == values["variance"] == 0.0
  assert values["vollath"] == pytest.approx(0.0, abs=1e-9)


def test_blurring_lowers_definition():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (64, 64)).astype(np.float64)
  blurred = ndimage.gaussian_filter(image, 1.5)
  sharp, soft = criteria.image_criteria(image), criteria.image_criteria(blurred)
  for name in ("brenner", "smd2", "variance"):
    assert soft[name] < 0.5 * sharp[name]


def test_normalization_makes_a_tiled_copy_score_the_same():
  rng = np.random.default_rng(2)
  image = ndimage.gaussian_filter(rng.random((48, 48)) * 255, 1.0, mode="wrap")
  tiled = np.tile(image, (2, 2))
  single, double = criteria.image_criteria(image), criteria.image_criteria(tiled)
  assert double["variance"] == pytest.approx(single["variance"], rel=1e-12)  # same histogram
  for name in ("brenner", "smd2", "vollath"):
    # Only the terms across the seams differ (a few percent of the terms).
    assert double[name] == pytest.approx(single[name], rel=0.05)


def test_criteria_table_rows():
  images = {"a": np.zeros((4, 5), np.uint8), "b": np.arange(30, dtype=np.uint8).reshape(5, 6)}
  rows = criteria.criteria_table(images)
  assert [row["name"] for row in rows] == ["a", "b"]
  assert (rows[1]["height"], rows[1]["width"]) == (5, 6)
  assert rows[1]["brenner"] == pytest.approx(4.0)  # f(x + 2) - f(x) = 2 everywhere


def test_area_downsampling_averages_blocks():
  base = np.random.default_rng(3).integers(10, 240, (4, 6))
  # Each 2 x 2 block is base +- 5 with a zero-sum pattern, so its mean is exactly the base value.
  image = (np.kron(base, np.ones((2, 2), int)) + np.tile([[5, -5], [-5, 5]], (4, 6))).astype(np.uint8)
  np.testing.assert_array_equal(criteria.downsample(image, (4, 6), "area"), base)


@pytest.mark.parametrize("method", criteria.METHODS)
def test_downsample_shapes_and_constants(method):
  image = np.full((50, 40), 90, np.uint8)
  small = criteria.downsample(image, (10, 8), method)
  assert small.shape == (10, 8) and small.dtype == np.uint8 and (small == 90).all()
  soft = criteria.downsample(np.full((50, 40), 0.25), (10, 8), method)
  assert soft.dtype == np.float32 and np.allclose(soft, 0.25, atol=1e-6)


def test_downsample_errors():
  with pytest.raises(ValueError, match="method"):
    criteria.downsample(np.zeros((8, 8), np.uint8), (4, 4), "nearest-ish")
  with pytest.raises(ValueError, match="dtype"):
    criteria.downsample(np.zeros((8, 8), np.int32), (4, 4))


def test_compare_original_and_downsampled_writes_tables_and_figure(tmp_path):
  rng = np.random.default_rng(4)
  paths = []
  for name in ("x", "y"):
    gray = ndimage.gaussian_filter(rng.random((64, 48)) * 255, 0.7).astype(np.uint8)
    Image.fromarray(np.repeat(gray[..., None], 3, axis=-1)).save(tmp_path / f"{name}.png")  # 3-channel gray
    paths.append(tmp_path / f"{name}.png")
  result = criteria.compare_original_and_downsampled(paths, tmp_path / "out", size=(16, 12),
                                                     methods=("area", "bicubic"))
  assert len(result["rows"]) == 2 * 3
  original = [row for row in result["rows"] if row["image"] == "x" and row["version"] == "original"][0]
  gray_x = np.asarray(Image.open(paths[0]))[..., 0]
  assert original["brenner"] == pytest.approx(criteria.brenner(gray_x), rel=1e-12)
  area = [row for row in result["rows"] if row["version"] == "area"]
  assert all((row["height"], row["width"]) == (16, 12) for row in area)
  assert result["summary"]["area"]["variance"]["mean"] == pytest.approx(np.mean([r["variance"] for r in area]))
  stored = json.loads((tmp_path / "out" / "criteria.json").read_text())
  assert stored["rows"][0]["brenner"] == pytest.approx(result["rows"][0]["brenner"])
  markdown = (tmp_path / "out" / "criteria.md").read_text()
  assert "| x | original | 64 x 48 |" in markdown and "bicubic" in markdown
  assert (tmp_path / "out" / "criteria.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arrays_given_as_loaders_score_like_the_same_images_on_disk(tmp_path):
  rng = np.random.default_rng(5)
  gray = ndimage.gaussian_filter(rng.random((64, 48)) * 255, 0.7).astype(np.uint8)
  Image.fromarray(gray).save(tmp_path / "slice07.png")
  from_file = criteria.compare_original_and_downsampled([tmp_path / "slice07.png"], tmp_path / "a", size=(16, 12),
                                                        methods=("area",))
  from_array = criteria.compare_original_and_downsampled([("slice07", lambda: gray)], tmp_path / "b", size=(16, 12),
                                                         methods=("area",))
  for row_file, row_array in zip(from_file["rows"], from_array["rows"]):
    assert row_array["path"] == "" and row_file["path"].endswith("slice07.png")
    assert {k: v for k, v in row_file.items() if k != "path"} == {k: v for k, v in row_array.items() if k != "path"}
