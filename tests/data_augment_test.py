"""Augmentations: the warp against numpy indexing and scipy, image/label alignment under every geometric
augmentation, determinism, and each augmentation happening with its configured probability."""

import dataclasses

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from urisc_jax.data import augment, pipeline
from urisc_jax.data.prepare import PreparedImage

GEOMETRIC = {
    "flips": dict(flip_p=1.0),
    "rot90": dict(rot90=True),
    "rotation": dict(rotate_p=1.0, rotate_degrees=180.0),
    "zoom": dict(zoom_p=1.0, zoom_range=(0.6, 1.8)),
    "crop": dict(crop_p=1.0, crop_area=(0.2, 0.6)),
    "translation": dict(translate_p=1.0, translate_fraction=0.5),
}
NONE = dict(flip_p=0.0, rot90=False)


def _two_level_image(shape=(160, 150), block=7, seed=0):
  """Random blocks of gray 40 and 200; the label marks the dark ones (label = image < 128)."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 2, (shape[0] // block + 1, shape[1] // block + 1))
  image = np.where(np.kron(blocks, np.ones((block, block), int)) > 0, 200, 40).astype(np.uint8)
  return image[:shape[0], :shape[1]]


def _prepared(tmp_path, image):
  np.save(tmp_path / "a.image.npy", image)
  np.save(tmp_path / "a.label.npy", (image < 128).astype(np.uint8))
  return [PreparedImage("a", str(tmp_path / "a.image.npy"), str(tmp_path / "a.label.npy"), image.shape, "a.png",
                        "a.tiff")]


def _misaligned_pixels(image, label):
  """Pixels where the label contradicts the image.

  With two gray levels a < b, a bilinear value within (b - a) / 4 of a level has its nearest source pixel at that
  level (the nearest of the four neighbours weighs at least 1/4), so a label sampled by nearest neighbour with the
  same map must agree there: no tolerance band at edges is needed. OpenCV evaluates the bilinear at a position
  within 1/60 px of the exact one, where the nearest neighbour still weighs (1/2 - 1/60)^2 > 0.23, and rounds the
  value: levels within 0.23 (b - a) - 1 = 35.8 of 40 or 200 are decided.
  """
  dark, light = image <= 75, image >= 165
  return int(np.count_nonzero(label[dark] != 1) + np.count_nonzero(label[light] != 0)), int(dark.sum() + light.sum())


def _scipy_warp(window, linear, center, size, order):
  """The same map by scipy.ndimage.affine_transform (float64, no rounding) and the source position of every pixel."""
  c = (size - 1) / 2
  offset = np.asarray(center) - linear @ np.array([c, c])
  warped = ndimage.affine_transform(window.astype(np.float64) if order else window, linear, offset,
                                    output_shape=(size, size), order=order)
  rows, cols = np.mgrid[:size, :size].astype(np.float64)
  positions = np.einsum("ij,jhw->ihw", linear, np.stack([rows, cols])) + offset[:, None, None]
  return warped, positions


# OpenCV rounds a sample position to 1/32 px (its weights to 1/32768 and its result to the nearest level).
_POSITION_ERROR = 1 / 64 + 1 / 1024
ROTATIONS = ((23.0, 1.3, (1.0, 1.0)), (-131.0, 0.8, (0.7, 0.9)), (7.5, 1.0, (0.6, 1.0)))


def test_bilinear_warp_matches_scipy_within_its_rounding():
  """Within 1 gray level of scipy's order=1 on a smooth image; anywhere within 0.5 + the local slopes x 1/60 px."""
  rng = np.random.default_rng(1)
  field = ndimage.gaussian_filter(rng.normal(size=(90, 100)), 8)
  smooth = np.round((field - field.min()) / np.ptp(field) * 255).astype(np.uint8)
  noise = rng.integers(0, 256, (90, 100), dtype=np.uint8)
  slope = lambda a, axis: np.abs(np.diff(a.astype(np.float64), axis=axis)).max()
  assert slope(smooth, 0) + slope(smooth, 1) <= 30  # so the bound below is under one gray level
  center, size = (44.5, 51.0), 48  # reads at most 1.3 x 34 px from the centre: inside the window
  for angle, zoom, fraction in ROTATIONS:
    linear = augment.linear_map(augment.AugmentParams(angle=angle, zoom=zoom, crop_fraction=fraction))
    reference, _ = _scipy_warp(smooth, linear, center, size, order=1)
    error = augment.warp(smooth, linear, center, size, order=1) - reference
    assert np.abs(error).max() <= 1.0 and abs(error.mean()) < 0.1  # unbiased, unlike a rounding-down warp
    reference, positions = _scipy_warp(noise, linear, center, size, order=1)
    error = np.abs(augment.warp(noise, linear, center, size, order=1) - reference)
    # Slopes of the bilinear surface around each sample: the largest neighbour differences near its position.
    row_slope = ndimage.maximum_filter(np.abs(np.diff(noise.astype(np.float64), axis=0)), size=3)
    col_slope = ndimage.maximum_filter(np.abs(np.diff(noise.astype(np.float64), axis=1)), size=3)
    top, left = (np.clip(np.floor(p).astype(int), 0, n - 2) for p, n in zip(positions, noise.shape))
    bound = 0.52 + (row_slope[top, left] + col_slope[top, left]) * _POSITION_ERROR
    assert np.all(error <= bound)
    assert np.mean(error > 1) > 0.1  # the bound is needed on noise: not a vacuous check


def test_bilinear_warp_of_a_real_em_slice_is_within_a_gray_level_of_scipy(shared_dir):
  slice_ = np.asarray(Image.open(shared_dir / "data" / "isbi2012" / "train" / "images" / "00.png"))
  assert slice_.shape == (512, 512) and slice_.dtype == np.uint8
  linear = augment.linear_map(augment.AugmentParams(angle=-37.0, zoom=1.15))
  center, size = (255.5, 256.0), 320  # reads at most 1.2 x 160 px from the centre: inside the slice
  reference, _ = _scipy_warp(slice_, linear, center, size, order=1)
  error = augment.warp(slice_, linear, center, size, order=1) - reference
  assert np.mean(np.abs(error) <= 1) > 0.99 and np.abs(error).max() < 3 and abs(error.mean()) < 0.05


def test_nearest_warp_matches_scipy_but_at_half_pixel_ties():
  label = (ndimage.gaussian_filter(np.random.default_rng(2).normal(size=(90, 100)), 2) > 0).astype(np.uint8)
  center, size = (44.5, 51.0), 48
  for angle, zoom, fraction in ROTATIONS:
    linear = augment.linear_map(augment.AugmentParams(angle=angle, zoom=zoom, crop_fraction=fraction))
    reference, positions = _scipy_warp(label, linear, center, size, order=0)
    differs = augment.warp(label, linear, center, size, order=0) != reference
    # OpenCV's positions are exact to 1/1024 px: only samples that close to a half pixel may round the other way.
    near_tie = np.any(np.abs(positions - np.floor(positions) - 0.5) < 2 / 1024, axis=0)
    assert not np.any(differs & ~near_tie)
    assert np.mean(near_tie) < 0.02


def test_whole_pixel_translation_and_right_angle_rotation_are_exact_on_views():
  """Against numpy indexing, reading a strided read-only view in place (as of the mapped cache)."""
  source = np.random.default_rng(5).integers(0, 256, (120, 130), dtype=np.uint8)
  source.flags.writeable = False
  window = source[10:90, 20:110]  # rows strided by 130
  size = 32
  c = (size - 1) / 2
  shift = augment.linear_map(augment.AugmentParams())
  turn = augment.linear_map(augment.AugmentParams(angle=90.0))
  for order in (0, 1):
    # Crop pixel p reads p + (center - c): a whole-pixel translation by (17, 29).
    moved = augment.warp(window, shift, (17 + c, 29 + c), size, order=order)
    np.testing.assert_array_equal(moved, window[17:17 + size, 29:29 + size])
    # Centre (40.5, 45.5): the crop is window[25:57, 30:62] rotated by a quarter turn clockwise.
    turned = augment.warp(window, turn, (40.5, 45.5), size, order=order)
    np.testing.assert_array_equal(turned, np.rot90(window[25:57, 30:62], -1))


def test_samples_past_the_window_edge_read_it_mirrored():
  window = np.random.default_rng(6).integers(0, 256, (40, 50), dtype=np.uint8)
  padded = np.pad(window, 20, mode="reflect")  # mirrored without repeating the edge, like NpyWindows.read
  linear = augment.linear_map(augment.AugmentParams(angle=30.0, zoom=0.9))
  for order in (0, 1):
    near_edge = augment.warp(window, linear, (5.0, 44.0), 24, order=order)
    np.testing.assert_array_equal(near_edge, augment.warp(padded, linear, (25.0, 64.0), 24, order=order))


def test_warp_threads_do_not_change_the_pixels():
  window = np.random.default_rng(4).integers(0, 256, (900, 900), dtype=np.uint8)
  label = (window < 60).astype(np.uint8)
  linear = augment.linear_map(augment.AugmentParams(angle=31.0, zoom=1.1, crop_fraction=(0.9, 0.8)))
  single = augment.warp_windows([window, label], linear, (449.5, 449.0), 600, threads=1)
  threaded = augment.warp_windows([window, label], linear, (449.5, 449.0), 600, threads=3)
  for a, b in zip(single, threaded):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(single[1], augment.warp(label, linear, (449.5, 449.0), 600, order=0))
  with pytest.raises(ValueError, match="must be uint8"):
    augment.warp(window.astype(np.float32), linear, (449.5, 449.0), 600, order=1)


def test_right_angle_rotation_and_whole_zoom_are_exact():
  window = np.random.default_rng(2).integers(0, 256, (20, 20), dtype=np.uint8)
  rotated = augment.warp(window, augment.linear_map(augment.AugmentParams(angle=90.0)), (9.5, 9.5), 16, order=1)
  np.testing.assert_array_equal(rotated, np.rot90(window[2:18, 2:18], 3))
  zoomed = augment.warp(window, augment.linear_map(augment.AugmentParams(zoom=0.5)), (9.5, 9.5), 8, order=0)
  # Crop pixel p reads source (p - 3.5) * 2 + 9.5 = 2p + 2.5: nearest-neighbour ties resolve to one side.
  assert np.array_equal(zoomed, window[2:18:2, 2:18:2]) or np.array_equal(zoomed, window[3:19:2, 3:19:2])


def test_dihedral_matches_numpy():
  array = np.arange(30).reshape(5, 6)
  params = augment.AugmentParams(flip_rows=True, flip_cols=True, quarter_turns=1)
  np.testing.assert_array_equal(augment.dihedral(array, params), np.rot90(array[::-1, ::-1], 1))


@pytest.mark.parametrize("name", list(GEOMETRIC) + ["all"])
def test_label_stays_aligned_with_the_image(tmp_path, name):
  image = _two_level_image()
  options = augment.AugmentConfig.paper(contrast_p=0, brightness_p=0, gamma_p=0, cutout_p=0) if name == "all" else (
      augment.AugmentConfig(**{**NONE, **GEOMETRIC[name]}))
  examples = pipeline.CropExamples(_prepared(tmp_path, image), crop_size=48, seed=3, augment=options)
  bad = checked = shifted_bad = 0
  for i in range(40):
    example = examples(i)
    crop, label = example["image"][..., 0], example["label"][..., 0]
    mismatches, count = _misaligned_pixels(crop, label)
    bad, checked = bad + mismatches, checked + count
    shifted_bad += _misaligned_pixels(crop[:, 1:], label[:, :-1])[0]
  assert bad == 0 and checked > 0.8 * 40 * 48 * 48
  assert shifted_bad > 100  # the check has teeth: a label one pixel off contradicts the image along block edges


def test_geometric_augmentations_move_a_patch(tmp_path):
  """With grid patches, an unaugmented example is its patch's window; each geometric augmentation changes it."""
  image = _two_level_image()
  prepared = _prepared(tmp_path, image)
  patches = np.array([(0, 40, 40), (0, 60, 50), (0, 20, 90)])
  windows = [image[r:r + 48, c:c + 48] for _, r, c in patches]

  def changed(options):
    examples = pipeline.CropExamples(prepared, crop_size=48, seed=3, augment=augment.AugmentConfig(**options),
                                     patches=patches)
    moved = 0
    for i in range(12):
      crop = examples(i)["image"][..., 0]
      moved += not any(np.array_equal(crop, w) for w in windows)
    return moved

  assert changed(NONE) == 0
  for name, options in GEOMETRIC.items():
    assert changed({**NONE, **options}) >= 6, name


def test_same_seed_and_index_give_the_same_example_and_others_differ(tmp_path):
  prepared = _prepared(tmp_path, _two_level_image())
  options = augment.AugmentConfig.paper()
  first = pipeline.CropExamples(prepared, crop_size=48, seed=5, augment=options)
  again = pipeline.CropExamples(prepared, crop_size=48, seed=5, augment=options)
  for i in (0, 7, 123):
    a, b = first(i), again(i)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(first(0)["image"], first(1)["image"])


def test_each_augmentation_happens_with_its_probability():
  probability = 0.3
  options = augment.AugmentConfig(**{name: probability for name in augment.PROBABILITIES}, rot90=False)
  rng = np.random.default_rng(0)
  draws = [augment.sample(rng, options, 64) for _ in range(3000)]
  happened = {
      "flip_rows": [d.flip_rows for d in draws],
      "flip_cols": [d.flip_cols for d in draws],
      "rotate_p": [d.angle != 0 for d in draws],
      "zoom_p": [d.zoom != 1 for d in draws],
      "crop_p": [d.crop_fraction != (1.0, 1.0) for d in draws],
      "translate_p": [d.translation != (0, 0) for d in draws],
      "contrast_p": [d.contrast != 1 for d in draws],
      "brightness_p": [d.brightness != 0 for d in draws],
      "gamma_p": [d.gamma != 1 for d in draws],
      "cutout_p": [d.cutout_area > 0 for d in draws],
  }
  # Binomial standard error sqrt(0.3 * 0.7 / 3000) = 0.008: allow 4.5 of them. (A translation rounding to (0, 0)
  # is rare: |shift| < 0.5 px on both axes.)
  for name, flags in happened.items():
    assert abs(np.mean(flags) - probability) < 0.037, (name, np.mean(flags))
  never = augment.AugmentConfig(flip_p=0.0, rot90=False)
  for seed in range(50):
    params = augment.sample(np.random.default_rng(seed), never, 64)
    assert params == augment.AugmentParams(noise_seed=params.noise_seed)
  always = augment.AugmentConfig(**{name: 1.0 for name in augment.PROBABILITIES})
  params = augment.sample(np.random.default_rng(1), always, 64)
  assert params.angle != 0 and params.zoom != 1 and params.cutout_area > 0 and params.gamma != 1


def test_switching_one_augmentation_off_leaves_the_others_draws_unchanged():
  full = augment.AugmentConfig.paper(rotate_p=1.0, contrast_p=1.0, zoom_p=1.0)
  without_rotation = dataclasses.replace(full, rotate_p=0.0)
  a = augment.sample(np.random.default_rng(9), full, 64)
  b = augment.sample(np.random.default_rng(9), without_rotation, 64)
  assert a.angle != 0 and b.angle == 0
  assert dataclasses.replace(a, angle=0.0) == b


def test_intensity_table_matches_the_formula():
  params = augment.AugmentParams(contrast=1.3, brightness=-0.05, gamma=0.8)
  table = augment.intensity_table(params, mean=100.0)
  gray = np.arange(256) / 255
  expected = np.clip(100 / 255 + 1.3 * (gray - 100 / 255) - 0.05, 0, 1) ** 0.8 * 255
  np.testing.assert_allclose(table, expected, atol=0.5)
  image = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
  np.testing.assert_array_equal(augment.adjust_intensity(image, params),
                                augment.intensity_table(params, float(image.mean()))[image])
  assert augment.adjust_intensity(image, augment.AugmentParams()) is image


def test_contrast_about_the_mean_keeps_the_mean():
  image = np.random.default_rng(0).integers(60, 200, (64, 64), dtype=np.uint8)
  stretched = augment.adjust_intensity(image, augment.AugmentParams(contrast=1.3))
  assert abs(float(stretched.mean()) - float(image.mean())) < 1.0
  assert stretched.std() == pytest.approx(1.3 * image.std(), rel=0.02)


def test_cutout_covers_its_area_in_blobs_and_leaves_the_rest():
  image = np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)
  params = augment.AugmentParams(cutout_area=0.1, noise_seed=4)
  mask = augment.cutout_mask(params, image.shape, 0.125)
  assert mask.mean() == pytest.approx(0.1, abs=0.02)
  _, blobs = ndimage.label(mask)
  assert 1 <= blobs <= 20  # a few connected shapes, not scattered pixels
  out = augment.apply_cutout(image, params, 0.125)
  np.testing.assert_array_equal(out[~mask], image[~mask])
  assert np.count_nonzero(out[mask] != image[mask]) > 0.9 * mask.sum()
  assert augment.apply_cutout(image, augment.AugmentParams(), 0.125) is image


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="rotate_p=1.5"):
    augment.AugmentConfig(rotate_p=1.5)
  with pytest.raises(ValueError, match="zoom_range"):
    augment.AugmentConfig(zoom_range=(1.2, 0.8))
  with pytest.raises(ValueError, match=r"Unknown config.data.augment keys \['rotation_p'\]"):
    augment.AugmentConfig.from_config({"rotation_p": 0.5})
  assert augment.AugmentConfig.from_config({"zoom_range": [0.9, 1.1]}).zoom_range == (0.9, 1.1)


def test_dihedral_map_folds_flips_and_rotations_into_the_warp():
  window = np.random.default_rng(3).integers(0, 256, (40, 40), dtype=np.uint8)
  for flip_rows in (False, True):
    for flip_cols in (False, True):
      for turns in range(4):
        params = augment.AugmentParams(flip_rows=flip_rows, flip_cols=flip_cols, quarter_turns=turns, angle=20.0)
        linear = augment.linear_map(params)
        separate = augment.dihedral(augment.warp(window, linear, (19.5, 19.5), 24, order=0), params)
        folded = augment.warp(window, linear @ augment.dihedral_map(params), (19.5, 19.5), 24, order=0)
        assert np.mean(separate != folded) < 0.01  # equal but for nearest-neighbour ties at half pixels
        plain = augment.AugmentParams(flip_rows=flip_rows, flip_cols=flip_cols, quarter_turns=turns)
        np.testing.assert_array_equal(augment.warp(window, augment.dihedral_map(plain).astype(float), (19.5, 19.5),
                                                   24, order=1),
                                      augment.dihedral(window[8:32, 8:32], plain))


def test_warp_threads_do_not_change_the_examples(tmp_path):
  prepared = _prepared(tmp_path, _two_level_image((400, 380)))
  one, three = (pipeline.CropExamples(prepared, crop_size=300, seed=2, augment=augment.AugmentConfig.paper(threads=t))
                for t in (1, 3))
  for i in range(6):
    a, b = one(i), three(i)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  with pytest.raises(ValueError, match="threads=0 must be a whole number"):
    augment.AugmentConfig(threads=0)
