"""Sizes derived from what a file claims are capped before anything is allocated: an image's pixel size (TIFF tags,
ImageJ metadata, config.predict.input_pixel_nm) times its size must fit config.data.max_image_pixels and keep enough
pixels for the network; a volume's declared section size must fit the cap before a section is read whole. Each
refusal is a DataError (exit 2) naming the file, the claim, the resulting size and the keys that fix it."""

import tracemalloc

import ml_collections
import numpy as np
import pytest
import tensorstore as ts
import tifffile

from configs import tiny
from urisc_jax import predict, resolution
from urisc_jax.data import dataset, imageio

TRAIN_NM = 2.18


def _config(**predict_options):
  return ml_collections.ConfigDict({"data": {"pixel_nm": TRAIN_NM},
                                    "predict": {"match_resolution": True, "input_pixel_nm": None, **predict_options}})


def _tiff(path, *, resolution_value=None, unit=None, imagej_unit=None, side=64):
  gray = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
  if imagej_unit is not None:
    tifffile.imwrite(path, gray, imagej=True, resolution=resolution_value, metadata={"unit": imagej_unit})
  else:
    tifffile.imwrite(path, gray, resolution=resolution_value, resolutionunit=unit)
  return path


@pytest.fixture(autouse=True)
def _default_cap():
  previous = imageio.set_max_pixels(None)
  yield
  imageio.set_max_pixels(previous)


# ------------------------------------------------------------------------------------- pixel size x image size

@pytest.mark.parametrize("claim,pixel_nm", [
    ("1 px/cm tag", 1e7),               # exited 1 with MemoryError
    ("654 nm/px ImageJ metadata", 654.0),  # grew past 4 GB in 7 s
])
def test_a_pixel_size_that_would_upsample_past_the_cap_is_refused_before_any_allocation(tmp_path, claim, pixel_nm):
  if claim.startswith("1 px/cm"):
    path = _tiff(tmp_path / "one_per_cm.tif", resolution_value=(1, 1), unit="CENTIMETER")
  else:
    path = _tiff(tmp_path / "imagej.tif", resolution_value=(1 / pixel_nm, 1 / pixel_nm), imagej_unit="nm")
  before = path.read_bytes()
  tracemalloc.start()
  with pytest.raises(resolution.ResolutionError) as raised:
    predict.input_scale_factor(_config(), path, (64, 64))
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  message = str(raised.value)
  assert isinstance(raised.value, imageio.DataError)  # main's input errors: exit 2, one line
  assert str(path) in message and f"{pixel_nm:g} nm" in message and "from the file's resolution metadata" in message
  assert "config.data.max_image_pixels" in message and "--config.predict.input_pixel_nm=" in message
  assert "64 x 64" in message
  assert peak < 20 * 2**20  # the check is arithmetic: no resampled image was allocated
  assert path.read_bytes() == before


def test_a_configured_pixel_size_is_capped_the_same_way(tmp_path):
  path = _tiff(tmp_path / "plain.tif")
  with pytest.raises(resolution.ResolutionError, match=r"1e\+06 nm \(config.predict.input_pixel_nm\)") as raised:
    predict.input_scale_factor(_config(input_pixel_nm=1e6), path, (64, 64))
  assert "config.data.max_image_pixels" in str(raised.value)


def test_the_cap_is_config_data_max_image_pixels_and_raising_it_lets_the_image_through(tmp_path):
  path = _tiff(tmp_path / "four_nm.tif", resolution_value=(1 / 4.36, 1 / 4.36), imagej_unit="nm")  # factor 2
  imageio.set_max_pixels(100 * 100)
  with pytest.raises(resolution.ResolutionError, match=r"at least 16384"):
    predict.input_scale_factor(_config(), path, (64, 64))  # 128 x 128 after resampling
  imageio.set_max_pixels(128 * 128)
  assert predict.input_scale_factor(_config(), path, (64, 64)) == pytest.approx(2.0)


def test_a_pixel_size_that_would_shrink_the_image_below_the_network_minimum_is_refused(tmp_path):
  path = _tiff(tmp_path / "tiny_pixels.tif", resolution_value=(1 / 0.0025, 1 / 0.0025), imagej_unit="nm")
  with pytest.raises(resolution.ResolutionError) as raised:
    predict.input_scale_factor(_config(), path, (64, 64))
  message = str(raised.value)
  assert str(path) in message and "0.0025 nm" in message and "1 x 1" in message
  assert f"{resolution.MIN_MATCHED_SIDE} pixels per side" in message and "--config.predict.input_pixel_nm=" in message


def test_small_images_and_moderate_factors_still_pass(tmp_path):
  path = _tiff(tmp_path / "small.tif", side=20)
  assert predict.input_scale_factor(_config(input_pixel_nm=TRAIN_NM), path, (20, 20)) == 1.0  # as recorded
  assert predict.input_scale_factor(_config(input_pixel_nm=1.5 * TRAIN_NM), path, (20, 20)) == pytest.approx(1.5)
  assert predict.input_scale_factor(_config(input_pixel_nm=TRAIN_NM / 2), path, (64, 64)) == pytest.approx(0.5)
  assert predict.input_scale_factor(_config(match_resolution=False, input_pixel_nm=1e6), path, (64, 64)) == 1.0


def _zero_denominators(path):
  """Sets the denominator of both resolution tags to 0 in the file's bytes (tifffile refuses to write one)."""
  with tifffile.TiffFile(path) as tif:
    offsets = [tif.pages[0].tags[name].valueoffset for name in ("XResolution", "YResolution")]
  data = bytearray(path.read_bytes())
  for offset in offsets:
    data[offset + 4:offset + 8] = b"\0\0\0\0"
  path.write_bytes(bytes(data))
  return path


def test_a_zero_denominator_resolution_is_a_data_error_naming_the_file(tmp_path):
  path = _zero_denominators(_tiff(tmp_path / "zero_den.tif", resolution_value=(72, 72), unit="INCH"))
  with pytest.raises(imageio.DataError, match="zero denominator") as raised:
    resolution.pixel_size_nm(path)
  assert str(path) in str(raised.value) and "--config.predict.input_pixel_nm=" in str(raised.value)
  # Given in the config, the file's tag is not needed and not read.
  assert predict.input_scale_factor(_config(input_pixel_nm=TRAIN_NM), path, (64, 64)) == 1.0


def test_predict_refuses_a_tiff_that_claims_sub_angstrom_pixels_instead_of_a_constant_map(tmp_path, monkeypatch):
  # The network is a stand-in (a constant map, what a 1 x 1 input gives): this checks --mode=predict's path from the
  # file's claim to the refusal, not the model.
  monkeypatch.setattr(predict, "restore_variables", lambda config, workdir, model: ({}, 1, {}))
  monkeypatch.setattr(predict, "tile_forward", lambda config, model, variables: None)
  monkeypatch.setattr(predict, "probabilities", lambda forward, gray, options: np.full(gray.shape, 0.5, np.float32))
  config = tiny.get_config()
  images = tmp_path / "images"
  images.mkdir()
  _tiff(images / "claims_0.0025nm.tif", resolution_value=(1 / 0.0025, 1 / 0.0025), imagej_unit="nm")
  config.data.pixel_nm = TRAIN_NM
  config.predict.input, config.predict.output, config.predict.threshold = str(images), str(tmp_path / "out"), 0.5
  with pytest.raises(resolution.ResolutionError, match="0.0025 nm"):
    predict.predict_files(config, tmp_path / "run")
  assert not list((tmp_path / "out").glob("*.tif*"))  # no submission of a constant map


# ---------------------------------------------------------------------------------------- volume sections read whole

def test_a_volume_section_above_the_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
  shape = (1, 3000, 2000)  # sparse: no chunk written, a few bytes on disk whatever the declared size
  for name in ("test.zarr", "test_labels.zarr"):
    ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / name)},
             "metadata": {"shape": list(shape), "chunks": [1, 512, 512], "dtype": "|u1"}}, create=True).result()
  config = tiny.get_config()
  config.data.source = "tensorstore"
  config.data.tensorstore.test.image = str(tmp_path / "test.zarr")
  config.data.tensorstore.test.label = str(tmp_path / "test_labels.zarr")
  sections = dataset.prepared_split(config.data, tmp_path, "test")
  reads = []
  from urisc_jax.data import volume_source  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(volume_source.TensorStoreWindows, "read", lambda self, *box: reads.append(box))
  imageio.set_max_pixels(1_000_000)
  for whole in (sections[0].image, sections[0].label, sections[0].official_label):
    with pytest.raises(imageio.DataError) as raised:
      whole()
    message = str(raised.value)
    assert "test" in message and ".zarr" in message and "(1, 3000, 2000)" in message
    assert "2000 x 3000" in message and "config.data.max_image_pixels" in message
  assert reads == []  # nothing was read
  imageio.set_max_pixels(6_000_000)
  sections[0].image()
  assert reads == [(0, 0, 3000, 2000)]
