"""Augmentations: the warp against scipy, image/label alignment under every geometric augmentation, determinism,
and each augmentation happening with its configured probability."""

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
  same map must agree there: no tolerance band at edges is needed.
  """
  dark, light = image <= 80, image >= 160
  return int(np.count_nonzero(label[dark] != 1) + np.count_nonzero(label[light] != 0)), int(dark.sum() + light.sum())


def test_warp_matches_scipy_affine_transform():
  rng = np.random.default_rng(1)
  window = rng.integers(0, 256, (90, 100), dtype=np.uint8)
  for angle, zoom, fraction in ((23.0, 1.3, (1.0, 1.0)), (-131.0, 0.8, (0.7, 0.9)), (7.5, 1.0, (0.6, 1.0))):
    params = augment.AugmentParams(angle=angle, zoom=zoom, crop_fraction=fraction)
    linear = augment.linear_map(params)
    center = (44.5, 51.0)
    out = augment.warp(window, linear, center, 48, order=1)
    nearest = augment.warp(window, linear, center, 48, order=0)
    c = (48 - 1) / 2
    offset = np.asarray(center) - linear @ np.array([c, c])
    reference = ndimage.affine_transform(window.astype(np.float64), linear, offset, output_shape=(48, 48), order=1)
    # Pillow's 8-bit bilinear rounds down: equal to floor(reference) up to float rounding at integers.
    assert np.all(out >= np.floor(reference - 1e-6)) and np.all(out <= np.floor(reference + 1e-6))
    reference_nearest = ndimage.affine_transform(window, linear, offset, output_shape=(48, 48), order=0)
    assert np.mean(nearest != reference_nearest) < 0.01  # only ties at exactly half a pixel may round apart


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


def test_banded_and_threaded_warps_equal_one_warp_of_the_whole_crop():
  """Bands of rows, warped one after another or in threads, give the same crop, here the one a single Pillow call
  gives (each band restarts Pillow's coordinates, so in general only up to float rounding at exact ties)."""
  window = np.random.default_rng(4).integers(0, 256, (900, 900), dtype=np.uint8)
  label = (window < 60).astype(np.uint8)
  linear = augment.linear_map(augment.AugmentParams(angle=31.0, zoom=1.1, crop_fraction=(0.9, 0.8)))
  size = 600  # bands of 256, 256 and 88 rows
  c = (size - 1) / 2
  shift = np.array([449.5, 449.0]) - linear @ np.array([c, c]) + 0.5 - linear @ np.array([0.5, 0.5])
  data = (linear[1, 1], linear[1, 0], shift[1], linear[0, 1], linear[0, 0], shift[0])
  whole = np.asarray(Image.fromarray(window).transform((size, size), Image.Transform.AFFINE, data,
                                                       resample=Image.Resampling.BILINEAR))
  single = augment.warp_windows([window, label], linear, (449.5, 449.0), size, threads=1)
  threaded = augment.warp_windows([Image.fromarray(window), label], linear, (449.5, 449.0), size, threads=3)
  np.testing.assert_array_equal(single[0], whole)
  for a, b in zip(single, threaded):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(single[1], augment.warp(label, linear, (449.5, 449.0), size, order=0))


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
