"""Resolution matching: an input at another pixel size is predicted at the training pixel size and resampled back;
pixel sizes come from the config or the file (TIFF tags, ImageJ metadata, OME-Zarr)."""

import json

import ml_collections
import numpy as np
import pytest
import scipy.ndimage as ndi
import tifffile

from urisc_jax import predict, resolution
from urisc_jax.data import resample, synthetic

THRESHOLDS = np.linspace(0.05, 0.95, 19)


def scale_tuned_model(gray: np.ndarray) -> np.ndarray:
  """A fixed stand-in for a trained network: a difference of Gaussians (3 and 12 px) tuned to the synthetic
  U-RISC-like membranes at 2.18 nm/px (about 6 px wide), then a sigmoid. Like a CNN, it knows membranes by their
  width in pixels, which is what a change of pixel size breaks; a network trained in a fixture would need hundreds
  of steps to be that good, and its score would then depend on its training as well."""
  dark = 255.0 - gray.astype(np.float64)
  response = ndi.gaussian_filter(dark, 3.0) - ndi.gaussian_filter(dark, 12.0)
  return (1 / (1 + np.exp(-(response - 10.0) / 4.0))).astype(np.float32)


def _f1(probability, truth, threshold) -> float:
  predicted = probability >= threshold
  return 2 * np.count_nonzero(predicted & truth) / max(np.count_nonzero(predicted) + np.count_nonzero(truth), 1)


def test_a_2x_downsampled_copy_scores_like_the_original_only_when_matched():
  image, label = synthetic.render(synthetic.urisc_like(384, 384), 7)
  truth = label == 0  # black = membrane
  scores = [_f1(scale_tuned_model(image), truth, t) for t in THRESHOLDS]
  threshold, original = THRESHOLDS[int(np.argmax(scores))], max(scores)  # chosen at the training resolution
  half = resample.scaled_shape(image.shape, 0.5)
  small, small_truth = resample.resize_gray(image, half), resample.resize_mask(truth, half)
  factor = resolution.scale_factor(2 * 2.18, 2.18)
  matched = resolution.matched_probabilities(scale_tuned_model, small, factor)
  unmatched = resolution.matched_probabilities(scale_tuned_model, small, 1.0)
  assert factor == 2.0 and matched.shape == unmatched.shape == small.shape
  on, off = _f1(matched, small_truth, threshold), _f1(unmatched, small_truth, threshold)
  print(f"F1 original {original:.3f}, 2x downsampled: matched {on:.3f}, unmatched {off:.3f}")
  assert abs(on - original) < 0.03 and off < on - 0.05


def _config(**predict_options):
  return ml_collections.ConfigDict({"data": {"pixel_nm": 2.18},
                                    "predict": {"match_resolution": True, "input_pixel_nm": None, **predict_options}})


# ImageJ's text metadata is ASCII: it spells the micro sign as the six characters \u00B5.
@pytest.mark.parametrize("unit,size", [("nm", 4.0), ("angstrom", 40.0), ("micron", 0.004), ("\\u00B5m", 0.004),
                                       ("pm", 4000.0)])
def test_an_image_pixel_size_in_any_length_unit_is_the_same_in_nm(tmp_path, unit, size):
  """ImageJ metadata in angstrom (or ImageJ's escaped micro sign) is the same 4 nm as in nm: images and volumes read
  units through one table (urisc_jax/units.py), so no unit is understood by one and skipped by the other."""
  tifffile.imwrite(tmp_path / "imagej.tif", np.zeros((8, 8), np.uint8), imagej=True, resolution=(1 / size, 1 / size),
                   metadata={"unit": unit})
  assert resolution.pixel_size_nm(tmp_path / "imagej.tif") == pytest.approx(4.0)


def test_a_pixel_size_in_a_unit_that_is_no_length_is_unknown(tmp_path):
  tifffile.imwrite(tmp_path / "imagej.tif", np.zeros((8, 8), np.uint8), imagej=True, resolution=(0.25, 0.25),
                   metadata={"unit": "second"})
  assert resolution.pixel_size_nm(tmp_path / "imagej.tif") is None


def test_pixel_size_from_tiff_tags_imagej_metadata_and_ome_zarr(tmp_path):
  gray = np.zeros((8, 8), np.uint8)
  tifffile.imwrite(tmp_path / "imagej.tif", gray, imagej=True, resolution=(1 / 4.0, 1 / 4.0), metadata={"unit": "nm"})
  tifffile.imwrite(tmp_path / "tags.tif", gray, resolution=(1e7 / 4.36, 1e7 / 4.36), resolutionunit="CENTIMETER")
  tifffile.imwrite(tmp_path / "plain.tif", gray)
  ome = tmp_path / "image.ome.zarr"
  ome.mkdir()
  (ome / ".zattrs").write_text(json.dumps({"multiscales": [{
      "axes": [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}],
      "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.004, 0.004]}]}]}]}))
  assert resolution.pixel_size_nm(tmp_path / "imagej.tif") == pytest.approx(4.0)
  assert resolution.pixel_size_nm(tmp_path / "tags.tif") == pytest.approx(4.36)
  assert resolution.pixel_size_nm(ome) == pytest.approx(4.0)
  assert resolution.pixel_size_nm(tmp_path / "plain.tif") is None

  assert predict.input_scale_factor(_config(), tmp_path / "imagej.tif") == pytest.approx(4.0 / 2.18)
  assert predict.input_scale_factor(_config(input_pixel_nm=1.09), tmp_path / "imagej.tif") == pytest.approx(0.5)
  assert predict.input_scale_factor(_config(), tmp_path / "plain.tif") == 1.0  # unknown: as the training data
  assert predict.input_scale_factor(_config(match_resolution=False), tmp_path / "imagej.tif") == 1.0


def test_resampling_round_trip_keeps_shape_and_range():
  probability = np.random.default_rng(0).random((37, 53)).astype(np.float32)
  out = resolution.matched_probabilities(lambda gray: gray.astype(np.float32) / 255, (probability * 255).astype(np.uint8),
                                         1.7)
  assert out.shape == (37, 53) and 0 <= out.min() and out.max() <= 1
  flat = resample.resize(np.full((40, 40), 0.3, np.float32), (13, 17))  # averaging keeps a constant
  np.testing.assert_allclose(flat, 0.3, atol=1e-6)
  with pytest.raises(ValueError, match="positive"):
    resolution.scale_factor(-1.0, 2.18)
