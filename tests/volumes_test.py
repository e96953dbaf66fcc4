"""Chunked volumes: every input format opens to the same [Z, H, W] view, pixel sizes come from OME-Zarr metadata,
and the output is an OME-Zarr 0.4 image with a label image that the `ome-zarr` reader and zarr's reader accept."""

import json
import pathlib

import numpy as np
import pytest
import tensorstore as ts
import zarr

from urisc_jax import volumes

SHAPE = (3, 70, 90)


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)


def _create(spec: dict, data: np.ndarray) -> None:
  store = ts.open(spec, create=True).result()
  store.write(data).result()


def _kv(path: pathlib.Path) -> dict:
  return {"driver": "file", "path": str(path)}


def _write_all_formats(root: pathlib.Path, data: np.ndarray) -> dict[str, str]:
  """The same stack as zarr v2, zarr v3, N5 and neuroglancer precomputed; returns {format: input string}."""
  z, h, w = data.shape
  _create({"driver": "zarr", "kvstore": _kv(root / "v2.zarr"), "metadata": {"shape": list(data.shape),
                                                                            "chunks": [1, 32, 32], "dtype": "|u1"}},
          data)
  _create({"driver": "zarr3", "kvstore": _kv(root / "v3.zarr"),
           "metadata": {"shape": list(data.shape), "data_type": "uint8",
                        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, 32, 32]}}}}, data)
  _create({"driver": "n5", "kvstore": _kv(root / "em.n5"),
           "metadata": {"dimensions": list(data.shape), "blockSize": [1, 32, 32], "dataType": "uint8",
                        "compression": {"type": "raw"}}}, data)
  _create({"driver": "neuroglancer_precomputed", "kvstore": _kv(root / "precomputed"),
           "multiscale_metadata": {"type": "image", "data_type": "uint8", "num_channels": 1},
           "scale_metadata": {"size": [w, h, z], "resolution": [4, 4, 40], "encoding": "raw",
                              "chunk_size": [32, 32, 1], "voxel_offset": [5, 6, 7]}},
          data.T[..., None])  # precomputed stores [x, y, z, channel]
  return {"zarr v2": str(root / "v2.zarr"), "zarr v3": str(root / "v3.zarr"), "n5": str(root / "em.n5"),
          "precomputed": str(root / "precomputed"),
          "file URL": (root / "v2.zarr").as_uri(),
          "JSON spec": json.dumps({"driver": "zarr", "kvstore": {"driver": "file", "path": str(root / "v2.zarr")}})}


def test_every_input_format_reads_the_same_sections(stack, tmp_path):
  inputs = _write_all_formats(tmp_path, stack)
  for name, text in inputs.items():
    assert volumes.is_volume_input(text), name
    volume = volumes.open_input(text)
    assert volume.shape == SHAPE and volume.ndim == 3, name
    reader = volumes.SectionReader(volume)
    np.testing.assert_array_equal(reader.read(1, slice(10, 50), slice(0, 90)), stack[1, 10:50], err_msg=name)
    np.testing.assert_array_equal(reader.read(2, slice(0, 70), slice(33, 34)), stack[2, :, 33:34], err_msg=name)
  assert not volumes.is_volume_input(str(tmp_path / "image.png"))


def test_a_2d_array_is_one_section_and_leading_unit_axes_are_dropped(stack, tmp_path):
  _create({"driver": "zarr", "kvstore": _kv(tmp_path / "a.zarr"),
           "metadata": {"shape": [70, 90], "chunks": [32, 32], "dtype": "|u1"}}, stack[0])
  _create({"driver": "zarr", "kvstore": _kv(tmp_path / "tc.zarr"),
           "metadata": {"shape": [1, 1, *SHAPE], "chunks": [1, 1, 1, 32, 32], "dtype": "|u1"}}, stack[None, None])
  flat = volumes.open_input(str(tmp_path / "a.zarr"))
  assert (flat.shape, flat.ndim) == ((1, 70, 90), 2)
  np.testing.assert_array_equal(volumes.SectionReader(flat).read(0, slice(0, 70), slice(0, 90)), stack[0])
  tczyx = volumes.open_input(str(tmp_path / "tc.zarr"))
  assert (tczyx.shape, tczyx.ndim) == (SHAPE, 3)
  np.testing.assert_array_equal(volumes.SectionReader(tczyx).read(2, slice(0, 70), slice(0, 90)), stack[2])


def test_the_pixel_size_comes_from_ome_zarr_metadata(stack, tmp_path):
  group = tmp_path / "image.zarr"
  _create({"driver": "zarr", "kvstore": _kv(group / "s0"),
           "metadata": {"shape": list(SHAPE), "chunks": [1, 32, 32], "dtype": "|u1"}}, stack)
  (group / ".zgroup").write_text('{"zarr_format": 2}')
  axes = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
  (group / ".zattrs").write_text(json.dumps({"multiscales": [{
      "version": "0.4", "axes": axes,
      "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [50.0, 2.18, 2.18]}]}]}]}))
  volume = volumes.open_input(str(group))
  assert volume.scale == (50.0, 2.18, 2.18) and volume.units == ("nanometer",) * 3
  np.testing.assert_array_equal(volumes.SectionReader(volume).read(0, slice(0, 70), slice(0, 90)), stack[0])


@pytest.mark.parametrize("make,fragment", [
    (lambda p: _create({"driver": "zarr", "kvstore": _kv(p), "metadata": {"shape": [2, 8, 8], "chunks": [1, 8, 8],
                                                                          "dtype": "<u2"}}, np.zeros((2, 8, 8),
                                                                                                     np.uint16)),
     "not 8-bit gray"),
    (lambda p: _create({"driver": "zarr", "kvstore": _kv(p), "metadata": {"shape": [2, 2, 8, 8],
                                                                          "chunks": [1, 1, 8, 8], "dtype": "|u1"}},
                       np.zeros((2, 2, 8, 8), np.uint8)), "leading axes of size 1"),
    (lambda p: p.mkdir(), "holds no zarr array"),
    (lambda p: None, "does not exist"),
])
def test_bad_inputs_are_refused_naming_the_fix(tmp_path, make, fragment):
  path = tmp_path / "bad.zarr"
  make(path)
  with pytest.raises(volumes.VolumeError, match=fragment):
    volumes.open_input(str(path))
  with pytest.raises(volumes.VolumeError, match="not valid JSON"):
    volumes.open_input("{not json")


def test_the_output_is_ome_zarr_that_ome_zarr_and_zarr_read(tmp_path):
  from ome_zarr.format import FormatV04  # pylint: disable=g-import-not-at-top
  from ome_zarr.io import parse_url  # pylint: disable=g-import-not-at-top
  from ome_zarr.reader import Reader  # pylint: disable=g-import-not-at-top
  volume = volumes.InputVolume(spec={}, shape=(2, 300, 500), ndim=3, scale=(50.0, 4.0, 4.0),
                               units=("nanometer",) * 3)
  out = volumes.create_output(tmp_path / "out.zarr", volume, chunk=128, levels=3, dtype="uint8")
  rng = np.random.default_rng(1)
  probability = rng.integers(0, 256, (2, 300, 500), dtype=np.uint8)
  mask = (rng.random((2, 300, 500)) < 0.1).astype(np.uint8)
  writer = volumes.OutputWriter(out)
  for z in range(2):  # two blocks per section, split at a chunk boundary
    writer.write(z, 0, 0, probability[z, :256], mask[z, :256])
    writer.write(z, 256, 0, probability[z, 256:], mask[z, 256:])
  nodes = {node.metadata.get("name"): node for node in Reader(parse_url(tmp_path / "out.zarr", fmt=FormatV04()))()}
  image, label = nodes["probability"], nodes["membrane"]
  assert [d.shape for d in image.data] == [(2, 300, 500), (2, 150, 250), (2, 75, 125)]
  assert [t[0]["scale"] for t in image.metadata["coordinateTransformations"]] == [
      [50.0, 4.0, 4.0], [50.0, 8.0, 8.0], [50.0, 16.0, 16.0]]
  assert [a["name"] for a in image.metadata["axes"]] == ["z", "y", "x"]
  np.testing.assert_array_equal(np.asarray(image.data[0]), probability)
  np.testing.assert_array_equal(np.asarray(label.data[0]), mask)
  expected = probability
  for level in (1, 2):
    expected = volumes.downsample(expected, "mean")
    np.testing.assert_array_equal(np.asarray(image.data[level]), expected)
  group = zarr.open_group(tmp_path / "out.zarr", mode="r")
  assert group.attrs["multiscales"][0]["version"] == "0.4"
  assert group["labels"].attrs["labels"] == ["membrane"]
  assert group["labels/membrane"].attrs["image-label"]["source"]["image"] == "../../"
  assert group["0"].chunks == (1, 128, 128) and group["2"].chunks == (1, 32, 32)
  np.testing.assert_array_equal(group["labels/membrane/1"][:], volumes.downsample(mask, "max"))
  # Reopening for the same prediction works; another shape is refused.
  volumes.create_output(tmp_path / "out.zarr", volume, chunk=128, levels=3, dtype="uint8")
  other = volumes.InputVolume(spec={}, shape=(2, 301, 500), ndim=3)
  with pytest.raises(volumes.VolumeError, match="another shape"):
    volumes.create_output(tmp_path / "out.zarr", other, chunk=128, levels=3, dtype="uint8")


def test_downsampling_against_explicit_sums():
  a = np.arange(15, dtype=np.uint8).reshape(3, 5)
  mean = volumes.downsample(a, "mean")
  assert mean.shape == (2, 3)
  # Top-left quad 0, 1, 5, 6 -> 3; the odd edge repeats itself: quad (10, 11, 10, 11) -> 10.5 -> 11 (half up).
  assert mean[0, 0] == 3 and mean[1, 0] == 11
  rng = np.random.default_rng(0)
  big = rng.integers(0, 256, (2, 9, 12), dtype=np.uint8)  # against the float mean, rounded half up
  reference = np.floor(np.pad(big, [(0, 0), (0, 1), (0, 0)], mode="edge").astype(np.float64)
                       .reshape(2, 5, 2, 6, 2).mean(axis=(2, 4)) + 0.5)
  np.testing.assert_array_equal(volumes.downsample(big, "mean"), reference)
  floats = rng.random((4, 6)).astype(np.float16)
  np.testing.assert_allclose(volumes.downsample(floats, "mean"),
                             floats.astype(np.float32).reshape(2, 2, 3, 2).mean(axis=(1, 3)), rtol=1e-3)
  np.testing.assert_array_equal(volumes.downsample(a, "max"), [[6, 8, 9], [11, 13, 14]])
  probability = np.array([[0.0, 1.0], [0.5, 0.5]], np.float32)
  np.testing.assert_array_equal(volumes.quantize_probability(probability, "uint8"), [[0, 255], [128, 128]])
  assert volumes.quantize_probability(probability, "float16").dtype == np.float16


def test_main_refuses_a_missing_volume_with_exit_status_2(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(__file__).resolve().parents[1]
  (tmp_path / "run").mkdir()  # prediction refuses a workdir that does not exist before it reads the input
  out = subprocess.run([sys.executable, "-m", "urisc_jax.main", "--config=configs/default.py",
                        f"--workdir={tmp_path / 'run'}", "--mode=predict",
                        f"--config.predict.input={tmp_path / 'missing.zarr'}",
                        f"--config.predict.output={tmp_path / 'out.zarr'}"],
                       cwd=repo, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "missing.zarr does not exist" in out.stderr and not (tmp_path / "out.zarr").exists()
