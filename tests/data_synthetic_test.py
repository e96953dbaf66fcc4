"""Tests for the synthetic EM generator: determinism, geometry, labels, block independence, release layout."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from urisc_jax.data import imageio
from urisc_jax.data import synthetic


def _best_threshold_f1(image, membrane):
  """Best F1 over all global thresholds 'membrane = gray <= t' (a classifier that sees no context)."""
  dark_counts = np.bincount(image.ravel(), minlength=256)
  hit_counts = np.bincount(image[membrane], minlength=256)
  predicted, hits = np.cumsum(dark_counts), np.cumsum(hit_counts)
  precision = hits / np.maximum(predicted, 1)
  recall = hits / membrane.sum()
  return float(np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12)))


@pytest.fixture(scope="module")
def urisc_sample():
  config = synthetic.urisc_like(1024, 1024)
  return config, synthetic.render(config, 3)


def test_same_seed_same_bytes_other_seed_differs():
  config = synthetic.urisc_like(200, 330)
  image, label = synthetic.render(config, 11)
  again_image, again_label = synthetic.render(config, 11)
  other_image, other_label = synthetic.render(config, 12)
  assert image.dtype == label.dtype == np.uint8 and image.shape == label.shape == (200, 330)
  np.testing.assert_array_equal(image, again_image)
  np.testing.assert_array_equal(label, again_label)
  assert np.mean(image != other_image) > 0.5
  assert np.any(label != other_label)


@pytest.mark.parametrize("preset", ["urisc", "isbi"])
def test_block_rendering_equals_whole_image(preset):
  """Any window renders alone to exactly its pixels in a bigger image, whatever the block size (bounded memory)."""
  config = synthetic.PRESETS[preset](400, 520)
  image, label = synthetic.render(config, 5)
  window = (slice(123, 360), slice(77, 466))
  block_image, block_label = synthetic.render_block(config, 5, 123, 77, 237, 389)
  np.testing.assert_array_equal(block_image, image[window])
  np.testing.assert_array_equal(block_label, label[window])
  small_blocks = synthetic.render(dataclasses.replace(config, block_size=96), 5)
  np.testing.assert_array_equal(small_blocks[0], image)
  np.testing.assert_array_equal(small_blocks[1], label)


@pytest.mark.parametrize("preset,size,seeds,tolerance", [("urisc", 2048, (0, 1), 0.1), ("isbi", 768, (0, 1), 0.06)])
def test_membrane_fraction_matches_request(preset, size, seeds, tolerance):
  config = synthetic.PRESETS[preset](size, size)
  fractions = [np.mean(synthetic.render(config, seed)[1] == synthetic.MEMBRANE) for seed in seeds]
  assert abs(np.mean(fractions) / config.membrane_fraction - 1) < tolerance, fractions


def test_membrane_fraction_follows_other_requests():
  config = synthetic.urisc_like(1024, 1024, membrane_fraction=0.12)
  fraction = np.mean(synthetic.render(config, 0)[1] == synthetic.MEMBRANE)
  assert abs(fraction / 0.12 - 1) < 0.15, fraction


def test_label_is_binary_and_membranes_thin(urisc_sample):
  config, (image, label) = urisc_sample
  assert set(np.unique(label)) == {synthetic.MEMBRANE, synthetic.BACKGROUND}
  membrane = label == synthetic.MEMBRANE
  # Distance of every membrane pixel to the nearest background pixel: a band of width w has all of them <= w / 2.
  depth = ndimage.distance_transform_edt(membrane)[membrane]
  half_width = config.membrane_width_px * (1 + config.membrane_width_jitter) / 2
  assert np.percentile(depth, 99) <= half_width + 1
  assert np.median(depth) <= config.membrane_width_px / 4 + 1
  # The image is rendered anti-aliased and blurred, not painted from the label.
  assert len(np.unique(image)) > 100


@pytest.mark.parametrize("preset,size,overrides,min_inner_cells", [
    ("urisc", 1024, {}, 1), ("urisc", 1024, dict(membrane_fraction=0.12), 10), ("isbi", 512, {}, 50)])
def test_membranes_close_every_cell(preset, size, overrides, min_inner_cells):
  """Background components never join two cells, and each cell inside the image is one component."""
  config = synthetic.PRESETS[preset](size, size, **overrides)
  _, label = synthetic.render(config, 1)
  cells = synthetic.render_cells(config, 1, 0, 0, size, size)
  components, count = ndimage.label(label == synthetic.BACKGROUND)
  index = np.arange(1, count + 1)
  lowest, highest = ndimage.minimum(cells, components, index), ndimage.maximum(cells, components, index)
  np.testing.assert_array_equal(lowest, highest)  # one cell per component
  sizes = ndimage.sum(np.ones_like(components), components, index)
  on_border = np.zeros(count + 1, bool)
  on_border[np.concatenate([components[0], components[-1], components[:, 0], components[:, -1]])] = True
  # Slivers of a pixel or two can be pinched off by the bands where three cells meet; ignore those.
  big = sizes >= config.membrane_width_px ** 2
  inner_cells = lowest[big & ~on_border[1:]]
  assert len(inner_cells) >= min_inner_cells
  assert len(np.unique(inner_cells)) == len(inner_cells)  # no inner cell split in two
  # Cells visible in the image match the seed density: a grid cell of area spacing^2 holds one cell, or four.
  # A cell of mean area A shows when its centre lies within about sqrt(A) / 2 of the image.
  area = config.cell_size ** 2 / (1 + 3 * config.subdivided_fraction)
  expected = (size + np.sqrt(area)) ** 2 / area
  assert 0.6 * expected < len(np.unique(lowest)) < 1.6 * expected


def test_geometry_matches_brute_force():
  """Exact seed pruning per tile: same nearest cell and boundary distance as testing every seed."""
  config = synthetic.isbi_like()
  plane = synthetic._plane(config, 7)
  ys, xs = np.arange(200.0, 248.0), np.arange(-60.0, 4.0)
  cap = 9.0
  cells, _, dist = synthetic._geometry(plane, ys, xs, cap)
  wy, wx = plane.warp_grid(ys, xs)
  py, px = ys[:, None] + wy, xs[None, :] + wx
  a = plane.stretch
  qy, qx = a[0, 0] * py + a[0, 1] * px, a[1, 0] * py + a[1, 1] * px
  grid = np.arange(-8, 12)
  gy, gx = np.meshgrid(grid, grid, indexing="ij")
  sy, sx = plane.seeds(gy, gx)
  used = sy < 1e11
  slot = np.broadcast_to(np.arange(sy.shape[-1]), sy.shape)
  gy, gx = np.broadcast_to(gy[..., None], sy.shape)[used], np.broadcast_to(gx[..., None], sy.shape)[used]
  slot, sy, sx = slot[used], sy[used], sx[used]
  d2 = (qy[..., None] - sy) ** 2 + (qx[..., None] - sx) ** 2
  nearest = d2.argmin(-1)
  by, bx = a[0, 0] * sy + a[0, 1] * sx, a[1, 0] * sy + a[1, 1] * sx
  sep = np.hypot(by - by[nearest][..., None], bx - bx[nearest][..., None])
  with np.errstate(divide="ignore", invalid="ignore"):
    bisector = np.where(sep > 0, (d2 - np.take_along_axis(d2, nearest[..., None], -1)) / (2 * sep), np.inf)
  expected = np.minimum(bisector.min(-1), cap)
  np.testing.assert_allclose(dist, expected, atol=2e-3)
  np.testing.assert_array_equal(cells, synthetic._cell_keys(gy[nearest], gx[nearest], slot[nearest]))
  assert np.mean(dist < cap) > 0.2  # the window crosses membranes


def test_distractors_fool_a_global_threshold(urisc_sample):
  """Organelles look like membrane locally but are not labelled: no global threshold recovers the label."""
  config, (image, label) = urisc_sample
  membrane = label == synthetic.MEMBRANE
  with_organelles = _best_threshold_f1(image, membrane)
  assert with_organelles < 0.85
  bare = dataclasses.replace(config, mitochondria_per_cell=0, vesicle_clusters_per_cell=0, er_per_cell=0)
  bare_image, bare_label = synthetic.render(bare, 3)
  np.testing.assert_array_equal(bare_label, label)  # distractors never change the label
  assert _best_threshold_f1(bare_image, membrane) > with_organelles + 0.03
  # Dark pixels far from any membrane: the organelles.
  far = ndimage.distance_transform_edt(~membrane) > config.membrane_width_px
  dark = image < np.percentile(image[membrane], 50)
  assert np.sum(dark & far) > 0.1 * np.sum(dark & membrane)
  assert np.sum((bare_image < np.percentile(image[membrane], 50)) & far) < 0.5 * np.sum(dark & far)


def test_invalid_config_and_seed_raise():
  with pytest.raises(ValueError, match="membrane_fraction"):
    synthetic.urisc_like(membrane_fraction=0.9)
  with pytest.raises(ValueError, match="membrane_width_px"):
    synthetic.urisc_like(membrane_width_px=1.0)
  with pytest.raises(ValueError, match="seed"):
    synthetic.render(synthetic.urisc_like(32, 32), -1)


def test_release_layout_resume_and_skip(tmp_path, monkeypatch):
  kwargs = dict(num_train=2, num_val=1, num_test=1, height=96, width=120, seed=4)
  calls = []
  real_render = synthetic.render

  def counting_render(config, seed):
    calls.append(seed)
    if len(calls) == 3 and crash[0]:
      raise KeyboardInterrupt  # an interrupted run
    return real_render(config, seed)

  crash = [True]
  monkeypatch.setattr(synthetic, "render", counting_render)
  with pytest.raises(KeyboardInterrupt):
    synthetic.write_release(tmp_path, **kwargs)
  assert not json.loads((tmp_path / synthetic.MANIFEST).read_text())["complete"]
  assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporary files left behind
  crash[0] = False
  calls.clear()
  paths = synthetic.write_release(tmp_path, **kwargs)
  assert len(calls) == 2  # the two images written before the interruption are kept
  assert [p.relative_to(tmp_path).as_posix() for p in paths[:2]] == [
      "imgs/Track1/train/train_000.png", "label/Track1/train/train_000.tiff"]
  assert len(paths) == 8 and all(p.is_file() for p in paths)

  png = Image.open(tmp_path / "imgs/Track1/val/val_000.png")
  tiff = Image.open(tmp_path / "label/Track1/val/val_000.tiff")
  assert png.mode == "RGB" and tiff.mode == "L" and tiff.format == "TIFF"
  rgb = np.asarray(png)
  expected_image, expected_label = real_render(synthetic.urisc_like(96, 120), synthetic.image_seed(4, "val", 0))
  for channel in range(3):
    np.testing.assert_array_equal(rgb[..., channel], expected_image)
  np.testing.assert_array_equal(np.asarray(tiff), expected_label)

  calls.clear()
  assert synthetic.write_release(tmp_path, **kwargs) == paths
  assert not calls  # same parameters, all files present: nothing rendered

  smaller = synthetic.write_release(tmp_path, **dict(kwargs, num_train=1, num_test=0))
  assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*") if p.name != "synthetic.json") == \
      sorted(p.relative_to(tmp_path).as_posix() for p in smaller)


def test_release_refuses_a_folder_with_other_data(tmp_path):
  (tmp_path / "imgs/Track1/train").mkdir(parents=True)
  (tmp_path / "imgs/Track1/train/0001.png").write_bytes(b"")
  with pytest.raises(imageio.DataError, match="refusing"):
    synthetic.write_release(tmp_path, num_train=1, num_val=0, num_test=0, height=32, width=32, seed=0)
