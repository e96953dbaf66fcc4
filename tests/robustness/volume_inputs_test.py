"""Volume inputs that are not what they seem are refused with one line naming the file and the fix, and narrow
sections are tiled in linear time: the read side of blockwise volume prediction.

Each case builds a small input the way a careless or unlucky user could (an RGB stack, an Angstrom pixel size,
garbled OME-Zarr metadata, an empty array, a stray `info` file among images, a dataset path leaving the group, a
section a few pixels high) and calls the library function the prediction calls.
"""

import json
import pathlib

import ml_collections
import numpy as np
import pytest
import tensorstore as ts

from urisc_jax import blockwise, inference, volumes


def _create(path: pathlib.Path, data: np.ndarray, *, driver: str = "zarr") -> None:
  if driver == "zarr":
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"shape": list(data.shape), "chunks": [max(1, min(n, 32)) for n in data.shape],
                         "dtype": "|u1"}}
  else:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"shape": list(data.shape), "data_type": "uint8",
                         "chunk_grid": {"name": "regular",
                                        "configuration": {"chunk_shape": [max(1, min(n, 32)) for n in data.shape]}}}}
  store = ts.open(spec, create=True).result()
  if data.size:
    store.write(data).result()


# --- sections narrower than a tile -----------------------------------------------------------------------------------


def _box_forward(tiles):
  """A stand-in network with a 5 px receptive field (integer box sums: exact, no rounding)."""
  k = 11
  x = np.pad(np.asarray(tiles[..., 0], np.int64), [(0, 0), (6, 5), (6, 5)])
  c = x.cumsum(1).cumsum(2)
  return (c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]).astype(np.float32) / 1024


@pytest.mark.parametrize("halo", [16, None], ids=["halo", "blended"])
@pytest.mark.parametrize("shape", [(8, 5000), (5000, 8), (1, 3000)])
def test_a_section_narrower_than_a_tile_costs_tiles_linear_in_its_length(shape, halo):
  config = ml_collections.ConfigDict({"tile": 64, "step": 0.5, "blend": "gaussian", "halo": halo, "batch_size": 4})
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  tiles = []

  def forward(batch):
    tiles.append(len(batch))
    return _box_forward(batch)

  plan = blockwise.section_plan(shape, config)
  whole = inference.predict_logits(forward, image, tile=plan.tile, step=0.5, blend="gaussian", batch_size=4,
                                   halo=halo)
  whole_tiles, tiles[:] = sum(tiles), []
  out = np.full(shape, np.nan, np.float32)
  blocks = blockwise.block_grid(shape, 256, chunk=32)
  for b in blocks:
    out[b.top:b.bottom, b.left:b.right] = blockwise.predict_block_logits(forward, lambda r, c: image[r, c], plan, b)
  np.testing.assert_array_equal(out, whole)
  # Each block computes the tiles reaching into it (at most 256 / stride + 2 per axis, batches padded to 4), not the
  # whole section's: before, 20 blocks of an 8 x 5000 section computed 20 x 160 tiles.
  per_block = 4 * -(-(256 // 32 + 3) // 4)
  assert sum(tiles) <= len(blocks) * per_block, (sum(tiles), whole_tiles, len(blocks))
  assert sum(tiles) <= 2 * whole_tiles + 4 * len(blocks), (sum(tiles), whole_tiles)


# --- colour, empty -------------------------------------------------------------------------------------------------


def _ome_group(group: pathlib.Path, data: np.ndarray, *, axes=None, scale=None, path="0", v3=False) -> pathlib.Path:
  """An OME-Zarr image group holding `data` at `path` (zarr v2 + OME 0.4, or zarr v3 + OME 0.5)."""
  _create(group / path, data, driver="zarr3" if v3 else "zarr")
  axes = axes if axes is not None else [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"[-data.ndim:]]
  dataset = {"path": path, "coordinateTransformations": [{"type": "scale", "scale": scale or [1.0] * data.ndim}]}
  multiscales = [{"version": "0.4", "axes": axes, "datasets": [dataset]}]
  if v3:
    (group / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
        "ome": {"version": "0.5", "multiscales": multiscales}}}))
  else:
    (group / ".zgroup").write_text('{"zarr_format": 2}')
    (group / ".zattrs").write_text(json.dumps({"multiscales": multiscales}))
  return group


@pytest.mark.parametrize("shape", [(1, 40, 50, 3), (40, 50, 3), (2, 40, 50, 4)])
def test_an_rgb_volume_is_refused_naming_its_shape_and_the_fix(tmp_path, shape):
  _create(tmp_path / "rgb.zarr", np.zeros(shape, np.uint8))
  with pytest.raises(volumes.VolumeError, match=r"convert it to 8-bit grayscale") as refused:
    volumes.open_input(str(tmp_path / "rgb.zarr"))
  assert str(list(shape)) in str(refused.value)


def test_an_ome_channel_axis_is_refused_and_an_x_axis_of_three_is_not(tmp_path):
  axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
  group = _ome_group(tmp_path / "cyx.zarr", np.zeros((3, 40, 50), np.uint8), axes=axes)
  with pytest.raises(volumes.VolumeError, match=r"channel axis 'c' of 3.*grayscale"):
    volumes.open_input(str(group))
  narrow = volumes.open_input(str(_ome_group(tmp_path / "zyx.zarr", np.zeros((2, 40, 3), np.uint8))))
  assert narrow.shape == (2, 40, 3)  # the metadata says the last axis is x: a (useless but honest) 3 px section


@pytest.mark.parametrize("shape", [(0, 0), (2, 0, 64), (0, 64, 64), (1, 0, 8, 8)])
def test_an_empty_volume_is_refused_naming_its_shape(tmp_path, shape):
  _create(tmp_path / "empty.zarr", np.zeros(shape, np.uint8))
  with pytest.raises(volumes.VolumeError, match="is empty") as refused:
    volumes.open_input(str(tmp_path / "empty.zarr"))
  assert str(list(shape)) in str(refused.value)


# --- pixel size units ----------------------------------------------------------------------------------------------


def test_a_volume_in_angstrom_is_treated_as_the_same_volume_in_nm(tmp_path):
  from urisc_jax import volume_predict  # pylint: disable=g-import-not-at-top
  data = np.zeros((2, 40, 50), np.uint8)
  in_nm = volumes.open_input(str(_ome_group(tmp_path / "nm.zarr", data, scale=[40.0, 4.0, 4.0])))
  angstrom = [{"name": n, "type": "space", "unit": "angstrom"} for n in "zyx"]
  in_a = volumes.open_input(str(_ome_group(tmp_path / "a.zarr", data, axes=angstrom, scale=[400.0, 40.0, 40.0])))
  assert (in_a.scale, in_a.units) == (in_nm.scale, in_nm.units) == ((40.0, 4.0, 4.0), ("nanometer",) * 3)
  for train_nm, refused in ((4.0, False), (2.18, True)):
    for volume in (in_nm, in_a):
      config = ml_collections.ConfigDict({"predict": {"input": "v.zarr", "input_pixel_nm": None,
                                                      "match_resolution": True}, "data": {"pixel_nm": train_nm}})
      if refused:
        with pytest.raises(volumes.VolumeError, match="4 nm pixels"):
          volume_predict._check_pixel_size(config, volume)  # pylint: disable=protected-access
      else:
        volume_predict._check_pixel_size(config, volume)  # pylint: disable=protected-access


@pytest.mark.parametrize("unit, size, nm", [
    ("micrometer", 0.004, 4.0), ("\u00b5m", 0.004, 4.0), ("\u03bcm", 0.004, 4.0), ("picometer", 4000.0, 4.0),
    ("attometer", 4e9, 4.0), ("millimeter", 4e-6, 4.0), ("meter", 4e-9, 4.0), ("inch", 1.0, 2.54e7),
    ("foot", 1.0, 3.048e8), ("yard", 1.0, 9.144e8), ("mile", 1e-12, 1.609344), ("parsec", 1e-25, 3.0856775814913673),
    ("yottameter", 1e-33, 1.0), ("Angstrom", 22.0, 2.2)])
def test_every_ome_space_unit_converts_to_nm(tmp_path, unit, size, nm):
  axes = [{"name": n, "type": "space", "unit": unit} for n in "yx"]
  volume = volumes.open_input(str(_ome_group(tmp_path / "u.zarr", np.zeros((40, 50), np.uint8), axes=axes,
                                             scale=[size, size])))
  assert volume.units[1:] == ("nanometer",) * 2
  np.testing.assert_allclose(volume.scale[1:], (nm, nm), rtol=1e-12)


def test_an_unknown_unit_is_refused_naming_it_and_a_time_unit_is_allowed_on_the_section_axis(tmp_path):
  data = np.zeros((2, 40, 50), np.uint8)
  axes = [{"name": "z", "type": "space"}, {"name": "y", "type": "space", "unit": "furlong"},
          {"name": "x", "type": "space", "unit": "furlong"}]
  with pytest.raises(volumes.VolumeError, match=r"\.zattrs: the axis 'y' has the unit 'furlong'"):
    volumes.open_input(str(_ome_group(tmp_path / "f.zarr", data, axes=axes)))
  axes = [{"name": "t", "type": "time", "unit": "second"}, {"name": "y", "type": "space", "unit": "nanometer"},
          {"name": "x", "type": "space", "unit": "nanometer"}]
  timed = volumes.open_input(str(_ome_group(tmp_path / "t.zarr", data, axes=axes, scale=[2.0, 4.0, 4.0])))
  assert timed.scale == (2.0, 4.0, 4.0) and timed.units == ("second", "nanometer", "nanometer")
  axes[1]["unit"] = "second"
  with pytest.raises(volumes.VolumeError, match="'second'"):
    volumes.open_input(str(_ome_group(tmp_path / "s.zarr", data, axes=axes)))


# --- garbled OME-Zarr multiscales ----------------------------------------------------------------------------------


def _garble(multiscales, how):
  """One of the seven forms of garbled multiscales metadata."""
  first, dataset = multiscales[0], multiscales[0]["datasets"][0]
  if how == "missing datasets":
    del first["datasets"]
  elif how == "missing path":
    del dataset["path"]
  elif how == "multiscales a dict":
    return first
  elif how == "path a number":
    dataset["path"] = 0
  elif how == "empty datasets":
    first["datasets"] = []
  elif how == "axes a string":
    first["axes"] = "zyx"
  elif how == "transformations a dict":
    dataset["coordinateTransformations"] = {"type": "scale", "scale": [1, 1, 1]}
  elif how == "transformation without type":
    dataset["coordinateTransformations"] = [{"scale": [1, 1, 1]}]
  elif how == "scale too short":
    dataset["coordinateTransformations"][0]["scale"] = [1.0, 1.0]
  elif how == "scale non-numeric":
    dataset["coordinateTransformations"][0]["scale"] = ["4nm", 1, 1]
  elif how == "scale zero":
    dataset["coordinateTransformations"][0]["scale"] = [1.0, 0.0, 4.0]
  elif how == "scale negative":
    dataset["coordinateTransformations"][0]["scale"] = [1.0, -4.0, 4.0]
  elif how == "entry not a dict":
    return [1]
  elif how == "dataset not a dict":
    first["datasets"] = ["0"]
  elif how == "axis not a dict":
    first["axes"] = [1, 2, 3]
  elif how == "axes of another length":
    first["axes"] = first["axes"][:2]
    del dataset["coordinateTransformations"]
  return multiscales


GARBLES = ["missing datasets", "missing path", "multiscales a dict", "path a number", "empty datasets",
           "axes a string", "transformations a dict", "transformation without type", "scale too short",
           "scale non-numeric", "scale zero", "scale negative", "entry not a dict", "dataset not a dict",
           "axis not a dict", "axes of another length"]


@pytest.mark.parametrize("v3", [False, True], ids=["zarr v2", "zarr v3"])
@pytest.mark.parametrize("how", GARBLES)
def test_garbled_multiscales_are_one_error_naming_the_metadata_file(tmp_path, how, v3):
  group = _ome_group(tmp_path / "g.zarr", np.zeros((2, 40, 50), np.uint8), v3=v3)
  source = group / ("zarr.json" if v3 else ".zattrs")
  attrs = json.loads(source.read_text())
  holder = attrs["attributes"]["ome"] if v3 else attrs
  holder["multiscales"] = _garble(holder["multiscales"], how)
  source.write_text(json.dumps(attrs))
  with pytest.raises(volumes.VolumeError) as refused:
    volumes.open_input(str(group))
  assert str(refused.value).startswith(f"{source}: the OME-Zarr multiscales metadata"), refused.value
  assert "\n" not in str(refused.value)


# --- dataset paths out of the group --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["absolute", "dot-dot", "symlink", "itself", "missing", "too long"])
def test_a_dataset_path_out_of_the_group_is_refused_blaming_the_metadata(tmp_path, where):
  outside = tmp_path / "other.zarr"
  _create(outside / "0", np.full((2, 40, 50), 7, np.uint8))
  group = _ome_group(tmp_path / "g.zarr", np.zeros((2, 40, 50), np.uint8))
  path = {"absolute": str(outside / "0"), "dot-dot": "../other.zarr/0", "symlink": "s0", "itself": ".",
          "missing": "9", "too long": "0" + "[" * 5000}[where]
  if where == "symlink":
    (group / "s0").symlink_to(outside / "0", target_is_directory=True)
  attrs = json.loads((group / ".zattrs").read_text())
  attrs["multiscales"][0]["datasets"][0]["path"] = path
  (group / ".zattrs").write_text(json.dumps(attrs))
  with pytest.raises(volumes.VolumeError) as refused:
    volumes.open_input(str(group))
  message = str(refused.value)
  assert message.startswith(f"{group / '.zattrs'}: the OME-Zarr multiscales metadata names the dataset path "
                            f"{path[:80]!r}"), message
  assert "does not exist; pass --config.predict.input" not in message
  assert len(message) < 1000 and "\n" not in message


# --- a text file named info among images ---------------------------------------------------------------------------


def test_a_folder_of_images_with_a_file_named_info_is_read_as_images(tmp_path):
  from urisc_jax.data import imageio  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "images"
  folder.mkdir()
  imageio.write_png(folder / "a.png", np.zeros((16, 16), np.uint8))
  imageio.write_tiff(folder / "b.tif", np.zeros((16, 16), np.uint8))
  (folder / "info").write_text("Acquired 2024-03-01 at 4 nm.\n")
  assert not volumes.is_volume_input(str(folder))
  (folder / "info").write_text('{"type": "image", "scales": [{"key": "s0"}]}')  # even a precomputed info beside them
  assert not volumes.is_volume_input(str(folder))
  lone = tmp_path / "notes"
  lone.mkdir()
  (lone / "info").write_text("not JSON")
  assert not volumes.is_volume_input(str(lone))
  with pytest.raises(volumes.VolumeError, match=r"notes/info is not a neuroglancer precomputed info file"):
    volumes.open_input(lone.as_uri())


# --- end to end: exit 2 and one line -------------------------------------------------------------------------------


def test_predict_on_garbled_multiscales_exits_2_with_one_line(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  group = _ome_group(tmp_path / "g.zarr", np.zeros((2, 40, 50), np.uint8))
  (group / ".zattrs").write_text(json.dumps({"multiscales": [{"datasets": []}]}))
  before = {p: p.read_bytes() for p in group.rglob("*") if p.is_file()}
  root = pathlib.Path(__file__).resolve().parents[2]
  (tmp_path / "work").mkdir()  # an existing run's folder: --mode=predict refuses a --workdir that does not exist
  result = subprocess.run([sys.executable, "-m", "urisc_jax.main", f"--config={root / 'configs/tiny.py'}",
                           f"--workdir={tmp_path / 'work'}", "--mode=predict", f"--config.predict.input={group}",
                           f"--config.predict.output={tmp_path / 'out.zarr'}"], cwd=root, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and f"{group / '.zattrs'}: the OME-Zarr multiscales metadata" in lines[0], result.stderr
  assert before == {p: p.read_bytes() for p in group.rglob("*") if p.is_file()}


def test_metadata_that_is_a_pipe_is_refused_not_waited_on(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  group = _ome_group(tmp_path / "g.zarr", np.zeros((2, 40, 50), np.uint8))
  (group / ".zattrs").unlink()
  os.mkfifo(group / ".zattrs")  # nobody writes: a read would block forever
  with pytest.raises(volumes.VolumeError, match=r"\.zattrs is not a regular file"):
    volumes.open_input(str(group))
