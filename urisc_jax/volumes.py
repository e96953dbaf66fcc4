"""Chunked volumes in and out: any TensorStore array as input, OME-Zarr (0.4) as output.

Input (`open_input`): a TensorStore JSON spec string, a `file://` URL, or a local path: `*.zarr` (zarr v2 or v3,
an array or an OME-Zarr image group, whose first multiscale level is read), `*.n5`, or a folder with a neuroglancer
`info` file (precomputed). The array is 2-D [H, W] or a 3-D stack [Z, H, W] whose first axis is the section
index (leading axes of size 1, e.g. OME's t and c, are dropped); 8-bit gray, as the rest of the project reads.
The pixel size is read from OME-Zarr multiscales metadata when there is any, converted to nm from any OME-NGFF
length unit. Input metadata is checked before use, and whatever cannot be a gray volume is refused with one
VolumeError naming the file and the fix: garbled multiscales, a dataset path leaving the image group, a unit that
is no length, a colour axis ([..., H, W, 3] or an OME channel axis), an empty array. A folder is a precomputed
volume only when its `info` is a precomputed info and it holds no images.

Output (`create_output`): an OME-Zarr 0.4 image group that napari and Neuroglancer open as it is:

    OUT.zarr/                 multiscales "probability": membrane probability, uint8 (p x 255, rounded) or float16
      0/ 1/ ... levels-1/     level k is 2^k x smaller in y and x (mean of 2 x 2), never in z
      labels/membrane/0/ ...  the thresholded mask as an OME label image: 1 = membrane, 0 = background
                              (the competition's TIFF writes the same mask as 0 = membrane, 255 = background)
                              (level k: max of 2 x 2, so thin membranes stay visible when zoomed out)

Arrays are zarr v2 with "/" chunk keys (what OME-Zarr 0.4 asks for), chunked [1, C, C] at level 0 and
[1, C / 2^k, C / 2^k] at level k, so that a block of level 0 aligned to chunks maps to whole chunks of every level:
no two writers ever touch one chunk.

The output is never the input, inside it or holding it (`check_output_apart`, real paths), is never written through
a symlink (`refuse_symlinks`), and a new one appears whole or not at all: it is built in a temporary sibling folder
and renamed into place (`create_output`). `output_location` turns --config.predict.output (a path or file:// URL)
into the absolute path that workers on any folder share.
"""

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import stat
import tempfile
import urllib.parse

import numpy as np
import tensorstore as ts

from urisc_jax import outputs
from urisc_jax.units import TIME_UNITS, nm_factor
from urisc_jax.data.imageio import DataError

OME_VERSION = "0.4"
PROBABILITY_DTYPES = ("uint8", "float16")
MASK_PATH = "labels/membrane"
_COMPRESSOR = {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 2}
# TensorStore's chunk cache per opened input: bounds memory whatever the volume's size.
INPUT_CACHE_BYTES = 64 << 20
# How long opening a volume may wait for its storage (config.predict.volume.open_timeout_s, set by main): TensorStore
# has no request timeout of its own, and an http:// server that never answers, or gs:// without a network, held the
# open forever.
OPEN_TIMEOUT_S = 60.0


def set_open_timeout(seconds: float) -> None:
  global OPEN_TIMEOUT_S
  OPEN_TIMEOUT_S = float(seconds)


class VolumeError(DataError):
  """A volume that cannot be read or written as asked; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class InputVolume:
  """An opened input volume.

  Attributes:
    spec: the TensorStore spec (JSON) of the array read, picklable, for workers to reopen.
    shape: (Z, H, W); Z = 1 for a 2-D image.
    ndim: 2 or 3, as stored (after leading size-1 axes are dropped).
    scale: pixel size per axis of `shape` (z, y, x); 1.0 where unknown.
    units: unit per axis of `shape` ("" where unknown).
  """
  spec: dict
  shape: tuple[int, int, int]
  ndim: int
  scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
  units: tuple[str, str, str] = ("", "", "")


def is_volume_input(text: str) -> bool:
  """Whether --config.predict.input names a chunked volume (else: an image file or a folder of images)."""
  text = str(text).strip()
  if text.startswith("{") or text.startswith("file://"):
    return True
  path = pathlib.Path(text.rstrip("/"))
  return path.suffix in (".zarr", ".n5") or (_precomputed_info(path) is not None and not _holds_images(path))


def _local_path(text: str) -> pathlib.Path:
  if text.startswith("file://"):
    return pathlib.Path(urllib.parse.unquote(urllib.parse.urlparse(text).path))
  return pathlib.Path(text)


# Metadata files are a few KB; a bigger one is not metadata (and is not read whole into memory).
MAX_METADATA_BYTES = 16 << 20


def _read_json(path: pathlib.Path) -> dict | None:
  """The JSON object in `path`, None when there is no such file; anything else than a readable object is refused."""
  try:
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # a folder, or a pipe that would block the read forever
      raise VolumeError(f"the metadata file {path} is not a regular file; is the volume complete?")
    if info.st_size > MAX_METADATA_BYTES:
      raise VolumeError(f"the metadata file {path} is {info.st_size} bytes, more than metadata ever is "
                        f"({MAX_METADATA_BYTES} bytes); is it the right file?")
    value = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError, RecursionError) as e:
    raise VolumeError(f"cannot read the metadata file {path} ({type(e).__name__}: {str(e)[:200]}); is the volume "
                      "complete?") from e
  if not isinstance(value, dict):
    raise VolumeError(f"the metadata file {path} holds a JSON {type(value).__name__}, not an object; is the volume "
                      "complete?")
  return value


def _holds_images(path: pathlib.Path) -> bool:
  """Whether the folder holds image files: then they are the input, whatever else lies beside them."""
  from urisc_jax.data import sources  # pylint: disable=g-import-not-at-top
  try:
    return any(p.suffix.lower() in sources.IMAGE_SUFFIXES and p.is_file() for p in path.iterdir())
  except OSError:
    return False


def _precomputed_info(path: pathlib.Path) -> dict | None:
  """The neuroglancer precomputed `info` of the folder `path` when it is one (a JSON object with "type" and a
  non-empty "scales" list), else None: a text file that happens to be named `info` does not make a volume."""
  info = path / "info"
  try:
    if not info.is_file() or info.stat().st_size > MAX_METADATA_BYTES:
      return None
    value = json.loads(info.read_text())
  except (OSError, ValueError, RecursionError):
    return None
  if isinstance(value, dict) and isinstance(value.get("type"), str) and isinstance(value.get("scales"), list) \
      and value["scales"]:
    return value
  return None


@dataclasses.dataclass(frozen=True)
class Multiscale:
  """The first multiscale image of OME-Zarr metadata, checked.

  Attributes:
    source: the metadata file (.zattrs or zarr.json), named in every error about it.
    path: the level-0 dataset path, relative to the group.
    axes: per axis {"name", "type", "unit"} (strings, "" where not given), or None when the metadata has none.
    scale: the level-0 scale per axis (positive, finite), or None when not given.
  """
  source: pathlib.Path
  path: str
  axes: tuple[dict, ...] | None
  scale: tuple[float, ...] | None

  def error(self, problem: str) -> "VolumeError":
    return _metadata_error(self.source, problem)


def _metadata_error(source: pathlib.Path, problem: str) -> VolumeError:
  return VolumeError(f"{source}: the OME-Zarr multiscales metadata {problem}; fix the metadata (OME-NGFF 0.4: "
                     '"multiscales": [{"axes": [...], "datasets": [{"path": "0", "coordinateTransformations": '
                     '[{"type": "scale", "scale": [...]}]}]}]) or pass the array itself (e.g. GROUP.zarr/0).')


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_multiscales(attrs: dict, source: pathlib.Path) -> Multiscale | None:
  """The checked first multiscale image of OME attributes `attrs` (read from `source`); None when there is none.

  Every field the reader uses is checked for its type and range here, so that garbled metadata is one VolumeError
  naming the file and the field, never a KeyError or TypeError deep in the reader.
  """
  multiscales = attrs.get("multiscales")
  if multiscales is None:
    return None
  if not isinstance(multiscales, list) or not multiscales:
    raise _metadata_error(source, f'"multiscales" is {_show(multiscales)}, not a non-empty list')
  first = multiscales[0]
  if not isinstance(first, dict):
    raise _metadata_error(source, f'"multiscales"[0] is {_show(first)}, not an object')
  datasets = first.get("datasets")
  if not isinstance(datasets, list) or not datasets:
    raise _metadata_error(source, f'"datasets" is {_show(datasets)}, not a non-empty list')
  level0 = datasets[0]
  if not isinstance(level0, dict):
    raise _metadata_error(source, f'"datasets"[0] is {_show(level0)}, not an object')
  path = level0.get("path")
  if not isinstance(path, str) or not path:
    raise _metadata_error(source, f'"datasets"[0]["path"] is {_show(path)}, not a dataset path such as "0"')
  axes = first.get("axes")
  if axes is not None:
    if not isinstance(axes, list):
      raise _metadata_error(source, f'"axes" is {_show(axes)}, not a list')
    axes = tuple(_axis(a, i, source) for i, a in enumerate(axes))
  transforms = level0.get("coordinateTransformations", [])
  if not isinstance(transforms, list):
    raise _metadata_error(source, f'"coordinateTransformations" of "datasets"[0] is {_show(transforms)}, not a list')
  scale = None
  for transform in transforms:
    if not isinstance(transform, dict) or not isinstance(transform.get("type"), str):
      raise _metadata_error(source, f"a coordinate transformation of \"datasets\"[0] is {_show(transform)}, not an "
                            'object with a "type"')
    if transform["type"] == "scale" and scale is None:
      values = transform.get("scale")
      if not isinstance(values, list) or not values or not all(_is_number(v) for v in values):
        raise _metadata_error(source, f'the scale of "datasets"[0] is {_show(values)}, not a list of numbers')
      if not all(math.isfinite(v) and v > 0 for v in values):
        raise _metadata_error(source, f'the scale of "datasets"[0] is {_show(values)}: pixel sizes must be positive '
                              "and finite")
      scale = tuple(float(v) for v in values)
  if axes is not None and scale is not None and len(axes) != len(scale):
    raise _metadata_error(source, f"has {len(axes)} axes but a scale of {len(scale)} values")
  return Multiscale(source, path, axes, scale)


def _axis(axis, index: int, source: pathlib.Path) -> dict:
  """One checked axis as {"name", "type", "unit"}; OME-NGFF 0.3 wrote axes as bare names."""
  if isinstance(axis, str):
    return {"name": axis, "type": "", "unit": ""}
  if not isinstance(axis, dict):
    raise _metadata_error(source, f'"axes"[{index}] is {_show(axis)}, not an object')
  checked = {}
  for key in ("name", "type", "unit"):
    value = axis.get(key, "")
    if value is None and key != "name":
      value = ""
    if not isinstance(value, str):
      raise _metadata_error(source, f'"axes"[{index}]["{key}"] is {_show(value)}, not a string')
    checked[key] = value
  return checked


def _show(value) -> str:
  """A short description of a metadata value for an error message."""
  text = json.dumps(value, default=str) if not isinstance(value, float) or math.isfinite(value) else str(value)
  return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _short_repr(text: str, limit: int = 80) -> str:
  """repr of a string from a file, cut to `limit` characters: an error message stays one readable line."""
  return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _multiscales(path: pathlib.Path) -> Multiscale | None:
  """The OME multiscales of a zarr group at `path` (v2 .zattrs or v3 zarr.json, OME-NGFF 0.4 or 0.5), if any."""
  source = path / ".zattrs"
  attrs = _read_json(source)
  if attrs is None:
    source = path / "zarr.json"
    v3 = _read_json(source) or {}
    if v3.get("node_type") != "group":
      return None
    attrs = v3.get("attributes", {})
    if not isinstance(attrs, dict):
      raise _metadata_error(source, f'"attributes" is {_show(attrs)}, not an object')
    attrs = attrs.get("ome", attrs)
    if not isinstance(attrs, dict):
      raise _metadata_error(source, f'"ome" is {_show(attrs)}, not an object')
  return parse_multiscales(attrs, source)


def _dataset_folder(group: pathlib.Path, multiscale: Multiscale) -> pathlib.Path:
  """The level-0 dataset folder, which must lie inside the group: the metadata names a relative path without '..'
  that does not lead out through a symlink (an image group's metadata must not reach other files)."""
  text, shown = multiscale.path, _short_repr(multiscale.path)
  relative = pathlib.PurePosixPath(text)
  if "\x00" in text or "\\" in text or relative.is_absolute() or ".." in relative.parts or not relative.parts:
    raise multiscale.error(f'names the dataset path {shown}, which is not a path inside the image group {group}')
  folder = group / relative
  try:
    inside = folder.resolve().is_relative_to(group.resolve()) and folder.resolve() != group.resolve()
  except (OSError, RuntimeError) as e:  # a symlink loop
    raise multiscale.error(f"names the dataset path {shown}, which cannot be resolved ({e})") from e
  if not inside:
    raise multiscale.error(f"names the dataset path {shown}, which leads out of the image group {group} (through "
                           f"a symlink to {folder.resolve()})")
  return folder


def _array_spec_at(path: pathlib.Path) -> dict | None:
  """The TensorStore spec of the array stored at `path`, None when it holds none."""
  kvstore = {"driver": "file", "path": str(path.resolve())}
  if (path / "zarr.json").is_file():
    return {"driver": "zarr3", "kvstore": kvstore}
  if (path / ".zarray").is_file():
    return {"driver": "zarr", "kvstore": kvstore}
  if (path / "attributes.json").is_file():
    return {"driver": "n5", "kvstore": kvstore}
  if (path / "info").is_file():
    if _precomputed_info(path) is None:
      raise VolumeError(f"{path / 'info'} is not a neuroglancer precomputed info file (a JSON object with \"type\" "
                        'and "scales"): pass a precomputed volume, a zarr array or a TensorStore JSON spec.')
    return {"driver": "neuroglancer_precomputed", "kvstore": kvstore}
  return None


def _path_spec(path: pathlib.Path) -> tuple[dict, Multiscale | None]:
  """(TensorStore spec, OME multiscales or None) of a local volume path, chosen from the files it holds."""
  if not path.exists():
    raise VolumeError(f"the input volume {path} does not exist; pass --config.predict.input=PATH.zarr (or .n5, a "
                      "precomputed folder, or a TensorStore JSON spec).")
  multiscale = _multiscales(path) if path.suffix == ".zarr" else None
  if multiscale is not None:
    folder = _dataset_folder(path, multiscale)
    try:
      spec = _array_spec_at(folder) if folder.is_dir() else None
      missing = spec is None and not folder.exists()
    except OSError as e:  # e.g. a name too long for the file system
      raise multiscale.error(f"names the dataset path {_short_repr(multiscale.path)}, which cannot be read "
                             f"({e.strerror})") from e
    if spec is None:
      raise multiscale.error(f"names the dataset path {_short_repr(multiscale.path)}, which "
                             f"{'does not exist' if missing else 'holds no array'} in the image group {path}")
    return spec, multiscale
  spec = _array_spec_at(path)
  if spec is None:
    raise VolumeError(f"{path} holds no zarr array (.zarray / zarr.json), OME-Zarr image group, N5 dataset "
                      "(attributes.json) or precomputed volume (info): pass the array itself or a TensorStore JSON "
                      "spec.")
  return spec, None


def input_spec(text: str) -> tuple[dict, Multiscale | None]:
  """(TensorStore spec, OME multiscales or None) for --config.predict.input: a JSON spec, a file:// URL or a path."""
  text = str(text).strip()
  if text.startswith("{"):
    try:
      spec = json.loads(text)
    except (ValueError, RecursionError) as e:
      raise VolumeError(f"--config.predict.input is not valid JSON ({e}): pass a TensorStore spec such as "
                        '{"driver": "zarr", "kvstore": "file:///data/em.zarr"}.') from e
    if not isinstance(spec, dict):
      raise VolumeError("--config.predict.input is JSON but not an object: pass a TensorStore spec such as "
                        '{"driver": "zarr", "kvstore": "file:///data/em.zarr"}.')
    return spec, None
  return _path_spec(_local_path(text))


def _ome_scale(multiscale: Multiscale | None, ndim: int) -> tuple[list[float], list[str], list[dict | None]]:
  """Pixel size, unit and axis (or None) per stored axis of the first level (1.0 / "" / None where not given); the
  metadata must describe as many axes as the array has."""
  if multiscale is None:
    return [1.0] * ndim, [""] * ndim, [None] * ndim
  for what, values in (("axes", multiscale.axes), ("scale values", multiscale.scale)):
    if values is not None and len(values) != ndim:
      raise multiscale.error(f"gives {len(values)} {what} for the {ndim}-D array {multiscale.path!r}")
  scale = list(multiscale.scale) if multiscale.scale is not None else [1.0] * ndim
  axes = list(multiscale.axes) if multiscale.axes is not None else [None] * ndim
  return scale, [a["unit"] if a else "" for a in axes], axes


def _in_nm(scale: list[float], units: list[str], axes: list[dict | None], where: str) -> tuple[list, list]:
  """The kept axes' pixel sizes in nanometres (unit "nanometer") wherever a length unit is given; a unit that is no
  length is refused on y and x (and allowed on the section axis when it is a time unit), never skipped: a skipped
  unit would let a volume at another pixel size through the pixel-size check."""
  scale, units = list(scale), list(units)
  for i, unit in enumerate(units):
    if not unit:
      continue
    factor = nm_factor(unit)
    if factor is not None:
      scale[i], units[i] = scale[i] * factor[0] / factor[1], "nanometer"
    elif not (unit.strip().lower() in TIME_UNITS and i < len(units) - 2):
      name = axes[i]["name"] if axes[i] else str(i)
      raise VolumeError(f"{where}: the axis {name!r} has the unit {unit!r}, which is not a length unit of OME-NGFF "
                        "(e.g. nanometer, micrometer, angstrom); fix the unit in the metadata.")
  return scale, units


def _is_channel(axis: dict | None) -> bool:
  return bool(axis) and (axis["type"].lower() == "channel" or axis["name"].lower() in ("c", "channel"))


def _check_gray(text: str, shape: tuple[int, ...], axes: list[dict | None]) -> None:
  """Refuses colour volumes: a channel axis of the metadata longer than 1, or (without axes saying the last axis is
  x) a trailing axis of 3 or 4, the layout of RGB(A) images ([H, W, 3], [Z, H, W, 4]); read as gray they would be
  predicted as sections 3 pixels wide."""
  for n, axis in zip(shape, axes):
    if _is_channel(axis) and n > 1:
      raise VolumeError(f"the input volume {text} has shape {list(shape)} with a channel axis {axis['name']!r} of "
                        f"{n}: convert it to 8-bit grayscale (one channel) first, or select one channel with a "
                        "TensorStore spec transform.")
  last = axes[-1]
  if len(shape) >= 3 and shape[-1] in (3, 4) and not (last and last["name"].lower() == "x"):
    raise VolumeError(f"the input volume {text} has shape {list(shape)}: a last axis of {shape[-1]} is the layout of "
                      f"{'RGB' if shape[-1] == 3 else 'RGBA'} colour, not a section {shape[-1]} pixels wide; convert "
                      "it to 8-bit grayscale [Z, H, W] first (e.g. the mean of the colour channels).")


def open_input(text: str) -> InputVolume:
  """Opens --config.predict.input as an InputVolume (shape checked, metadata read); see the module docstring.

  The recorded spec is that of the view predicted: leading size-1 axes dropped, a precomputed volume's
  [x, y, z, channel] turned into [z, y, x], and the origin moved to 0 (so block coordinates start at 0). Pixel
  sizes are converted to nanometres.
  """
  spec, multiscale = input_spec(text)
  store = _open(spec, read=True)
  if store.dtype != ts.uint8:
    raise VolumeError(f"the input volume {text} holds {store.dtype.name}, not 8-bit gray (uint8): convert it to "
                      "uint8 (e.g. scale 0..max to 0..255), as for image files.")
  if spec.get("driver") == "neuroglancer_precomputed" or store.spec().to_json().get("driver") == \
      "neuroglancer_precomputed":
    if store.shape[-1] != 1:
      raise VolumeError(f"the precomputed volume {text} has {store.shape[-1]} channels; expected 1 (gray).")
    store = store[..., 0].T  # [x, y, z, c] -> [z, y, x]
  shape = tuple(int(n) for n in store.shape)
  if not shape or 0 in shape:
    raise VolumeError(f"the input volume {text} is empty (shape {list(shape)}): there is nothing to predict; pass a "
                      "volume with at least one section of at least 1 x 1 pixels.")
  scale, units, axes = _ome_scale(multiscale, len(shape))
  _check_gray(text, shape, axes)
  drop = 0
  while len(shape) - drop > 3:
    if shape[drop] != 1:
      raise VolumeError(f"the input volume {text} has shape {shape}: expected [H, W] or [Z, H, W] (leading axes "
                        "of size 1 are dropped); select one channel/time point with a TensorStore spec transform.")
    drop += 1
  if len(shape) - drop not in (2, 3):
    raise VolumeError(f"the input volume {text} has shape {shape}: expected a 2-D image [H, W] or a 3-D stack "
                      "[Z, H, W].")
  store = store.translate_to[0]
  if drop:
    store = store[(0,) * drop]
  kept = shape[drop:]
  scale, units = _in_nm(scale[drop:], units[drop:], axes[drop:], str(multiscale.source) if multiscale else text)
  if len(kept) == 2:
    kept, scale, units = (1, *kept), [1.0, *scale], ["", *units]
  return InputVolume(spec=store.spec().to_json(), shape=tuple(kept), ndim=len(shape) - drop,
                     scale=tuple(scale), units=tuple(units))


def _open(spec: dict, **kwargs) -> ts.TensorStore:
  opening = ts.open(spec, context=ts.Context({"cache_pool": {"total_bytes_limit": INPUT_CACHE_BYTES}}), **kwargs)
  try:
    return opening.result(timeout=OPEN_TIMEOUT_S)
  except TimeoutError as e:
    opening.cancel()
    raise VolumeError(f"TensorStore got no answer within {OPEN_TIMEOUT_S:g} s (config.predict.volume.open_timeout_s) "
                      f"opening {json.dumps(spec)}: check that its server is up and reachable from here, or raise "
                      "the deadline.") from e
  except ValueError as e:  # TensorStore reports missing, corrupt and mismatched arrays as ValueError
    raise VolumeError(f"TensorStore cannot open {json.dumps(spec)}: {e}") from e


class SectionReader:
  """Reads regions of one volume's sections; opened once per process (TensorStore keeps a bounded chunk cache)."""

  def __init__(self, volume: InputVolume):
    self.volume = volume
    self._store = _open(volume.spec, read=True)

  def read(self, z: int, rows: slice, cols: slice) -> np.ndarray:
    """uint8 [rows, cols] of section z."""
    region = self._store[z, rows, cols] if self.volume.ndim == 3 else self._store[rows, cols]
    return np.asarray(region.read().result())


# --- OME-Zarr output -----------------------------------------------------------------------------------------------


def level_shape(shape: tuple[int, ...], level: int) -> tuple[int, ...]:
  """Shape of pyramid `level`: y and x (the last two axes) divided by 2^level, rounded up."""
  f = 2 ** level
  return (*shape[:-2], -(-shape[-2] // f), -(-shape[-1] // f))


def level_chunks(ndim: int, chunk: int, level: int) -> list[int]:
  c = max(1, chunk >> level)
  return [1] * (ndim - 2) + [c, c]


def _multiscales_attrs(name: str, ndim: int, levels: int, scale, units, kind: str) -> dict:
  axis_names = ("z", "y", "x")[3 - ndim:]
  axes = [{"name": n, "type": "space", **({"unit": u} if u else {})} for n, u in zip(axis_names, units[3 - ndim:])]
  datasets = []
  for level in range(levels):
    s = [float(v) for v in scale[3 - ndim:]]
    s[-2:] = [v * 2 ** level for v in s[-2:]]
    datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": s}]})
  return {"multiscales": [{"version": OME_VERSION, "name": name, "axes": axes, "datasets": datasets, "type": kind,
                           "metadata": {"description": f"{kind} of 2 x 2 per level, in y and x only"}}]}


def _array_spec(path: pathlib.Path, shape, chunks, dtype: str) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
          "metadata": {"shape": list(shape), "chunks": list(chunks), "dtype": np.dtype(dtype).str,
                       "compressor": _COMPRESSOR, "dimension_separator": "/", "fill_value": 0, "order": "C"}}


@dataclasses.dataclass(frozen=True)
class OutputVolume:
  """Where the blocks of one prediction go: the level specs of the probability and the mask (picklable)."""
  path: str
  probability: tuple[dict, ...]
  mask: tuple[dict, ...]
  ndim: int
  dtype: str


def output_location(text) -> pathlib.Path:
  """--config.predict.output as an absolute, symlink-free local path (a `file://` URL or a path, relative ones taken
  from the current folder).

  Absolute because the path travels to Dask workers, whose working folder may be another (an external cluster);
  resolved because the output is compared with the input by where its files really are. Other URL schemes are
  refused: the output's metadata, markers and run record are written with local file operations.
  """
  text = str(text).strip()
  scheme = urllib.parse.urlparse(text).scheme if "://" in text else ""
  if scheme and scheme != "file":
    raise VolumeError(f"--config.predict.output={text}: {scheme}:// outputs cannot be written (the OME-Zarr output "
                      "is a local or mounted folder); pass a path or a file:///absolute/OUT.zarr URL.")
  if scheme == "file" and urllib.parse.urlparse(text).netloc not in ("", "localhost"):
    raise VolumeError(f"--config.predict.output={text}: a file:// URL names another host; pass file:///ABS/OUT.zarr "
                      "or a path.")
  given = _local_path(text)
  if given.suffix != ".zarr":
    raise VolumeError(f"--config.predict.output={text}: a volume's prediction is an OME-Zarr group; name it *.zarr.")
  return pathlib.Path(os.path.realpath(given))


def _file_kvstore_paths(spec) -> list[str]:
  """Every local path a TensorStore spec reads: "file" kvstores (as dicts or file:// URLs), at any depth (a
  "base" of a transform driver, a zarr3 kvstore stack)."""
  found = []
  if isinstance(spec, dict):
    if spec.get("driver") == "file" and isinstance(spec.get("path"), str):
      found.append(spec["path"])
    for value in spec.values():
      found += _file_kvstore_paths(value)
  elif isinstance(spec, list):
    for value in spec:
      found += _file_kvstore_paths(value)
  elif isinstance(spec, str) and spec.startswith("file://"):
    found.append(str(_local_path(spec)))
  return found


def input_locations(text: str, volume: InputVolume) -> list[pathlib.Path]:
  """The real (resolved) local folders --config.predict.input reads: the path or file:// URL given, and the file
  kvstores of the opened spec (for an OME-Zarr group, its level-0 array inside it). Remote inputs give none."""
  text = str(text).strip()
  paths = _file_kvstore_paths(volume.spec)
  if text.startswith("{"):
    try:
      paths += _file_kvstore_paths(json.loads(text))
    except ValueError:
      pass
  elif "://" not in text or text.startswith("file://"):
    paths.append(str(_local_path(text)))
  return sorted({pathlib.Path(os.path.realpath(p.rstrip("/") or "/")) for p in paths})


def _contains(outer: pathlib.Path, inner: pathlib.Path) -> bool:
  return inner == outer or outer in inner.parents


def check_output_apart(out_path: pathlib.Path, inputs: list[pathlib.Path]) -> None:
  """Refuses an output that is the input, lies inside it, or holds it (both resolved, so a symlink to the input
  counts as the input): writing there would overwrite the data being read."""
  out_path = pathlib.Path(os.path.realpath(out_path))
  for location in inputs:
    if _contains(location, out_path) or _contains(out_path, location):
      raise VolumeError(f"--config.predict.output={out_path} overlaps the input volume {location} (the same folder, "
                        "inside it or holding it, symlinks resolved): the prediction would overwrite the data it "
                        "reads. Pass an output outside the input, e.g. --config.predict.output=PRED.zarr beside it.")


def refuse_symlinks(out_path: pathlib.Path) -> None:
  """Refuses an output holding a symlink where the prediction writes: among the entries of the output, its label
  groups, its block markers and the first folder level of every array (sections, or rows of a 2-D output). A write
  there would land wherever the link points (another user's data, the input)."""
  out_path = pathlib.Path(out_path)
  if not out_path.is_dir():
    return
  folders = [out_path, out_path / "labels", out_path / MASK_PATH, out_path / ".blocks"]
  folders += [group / name for group in (out_path, out_path / MASK_PATH) if group.is_dir() and not group.is_symlink()
              for name in os.listdir(group) if name.isdigit()]
  for folder in folders:
    if folder.is_symlink():
      raise VolumeError(f"the output {out_path} holds a symlink, {folder} -> {os.readlink(folder)}: a prediction "
                        "never writes through links. Remove the link, or pass a new --config.predict.output.")
    if not folder.is_dir():
      continue
    with os.scandir(folder) as entries:
      for entry in entries:
        if entry.is_symlink():
          raise VolumeError(f"the output {out_path} holds a symlink, {entry.path} -> {os.readlink(entry.path)}: a "
                            "prediction never writes through links. Remove the link, or pass a new "
                            "--config.predict.output.")


def _group_files(volume: InputVolume, levels: int) -> dict[str, dict]:
  """The OME-Zarr group metadata files of an output (relative path -> JSON)."""
  ndim = volume.ndim
  mask_attrs = _multiscales_attrs("membrane", ndim, levels, volume.scale, volume.units, "max")
  mask_attrs["image-label"] = {"version": OME_VERSION, "source": {"image": "../../"},
                               "colors": [{"label-value": 1, "rgba": [255, 0, 255, 255]}]}
  files = {f"{group}/.zgroup".lstrip("/"): {"zarr_format": 2} for group in ("", "labels", MASK_PATH)}
  files[".zattrs"] = _multiscales_attrs("probability", ndim, levels, volume.scale, volume.units, "mean")
  files["labels/.zattrs"] = {"labels": ["membrane"]}
  files[f"{MASK_PATH}/.zattrs"] = mask_attrs
  return files


def _level_specs(path: pathlib.Path, volume: InputVolume, chunk: int, levels: int, dtype: str):
  """[(probability spec, mask spec)] per level, for arrays under `path`."""
  shape = volume.shape if volume.ndim == 3 else volume.shape[1:]
  return [tuple(_array_spec(folder / str(level), level_shape(shape, level), level_chunks(volume.ndim, chunk, level),
                            kind)
                for folder, kind in ((path, dtype), (path / MASK_PATH, "uint8")))
          for level in range(levels)]


def output_volume(path, volume: InputVolume, *, chunk: int, levels: int, dtype: str) -> OutputVolume:
  """The OutputVolume a prediction of `volume` into `path` writes, without creating anything (the driver checks an
  existing output's markers against it before any write)."""
  specs = _level_specs(pathlib.Path(path), volume, chunk, levels, dtype)
  return OutputVolume(str(path), tuple(p for p, _ in specs), tuple(m for _, m in specs), volume.ndim, dtype)


def create_output(path, volume: InputVolume, *, chunk: int, levels: int, dtype: str,
                  record: dict | None = None) -> OutputVolume:
  """Creates the OME-Zarr group at `path` for a prediction of `volume`, or reopens the one an earlier attempt made.

  A new output is built whole in a temporary sibling folder (groups, arrays, and `record` as .blocks/run.json) and
  renamed into place (onto `path` when that is an empty folder): an attempt stopped midway leaves no skeleton
  without its run record, so a later attempt recognises it. An existing output is only reopened: the caller has
  checked that it is this prediction's (`volume_predict`), and its metadata is not rewritten.

  Args:
    path: OUT.zarr (absolute; see `output_location`).
    volume: the input, whose shape, dimensionality and pixel size the output takes.
    chunk: chunk side C at level 0 (a multiple of 2^(levels-1), so every level's chunks tile its blocks).
    levels: pyramid levels (1 = full resolution only).
    dtype: probability dtype, "uint8" or "float16".
    record: written as .blocks/run.json of a new output.

  Returns:
    The OutputVolume.
  """
  path = pathlib.Path(path)
  if path.suffix != ".zarr":
    raise VolumeError(f"--config.predict.output={path}: a volume's prediction is an OME-Zarr group; name it *.zarr.")
  if dtype not in PROBABILITY_DTYPES:
    raise VolumeError(f"config.predict.volume.dtype={dtype!r}: must be one of {PROBABILITY_DTYPES}.")
  fresh = not path.exists() or (path.is_dir() and not any(path.iterdir()))
  try:
    if fresh:
      path.parent.mkdir(parents=True, exist_ok=True)
      build = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
      try:
        os.chmod(build, 0o777 & ~_umask())
        for name, payload in _group_files(volume, levels).items():
          outputs.write_json(build / name, payload)
        if record is not None:
          outputs.write_json(build / ".blocks" / "run.json", record)
        for specs in _level_specs(build, volume, chunk, levels, dtype):
          for spec in specs:
            ts.open(spec, create=True).result()
        os.replace(build, path)  # replaces an empty folder at `path` too
      except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    else:
      (path / MASK_PATH).mkdir(parents=True, exist_ok=True)
      for name, payload in _group_files(volume, levels).items():
        if not (path / name).exists():  # an output of an earlier version may lack one; never rewrite one
          outputs.write_json(path / name, payload)
  except OSError as e:
    raise PermissionError(f"cannot create the output volume {path} ({e.strerror or e}); pass a writable "
                          "--config.predict.output=OUT.zarr.") from e
  out = output_volume(path, volume, chunk=chunk, levels=levels, dtype=dtype)
  for spec in (*out.probability, *out.mask):
    try:
      ts.open(spec, create=True, open=True).result()
    except ValueError as e:
      raise VolumeError(f"{spec['kvstore']['path']} exists with another shape, chunking or dtype than this prediction "
                        f"needs ({e}); remove it or pass another --config.predict.output.") from e
  return out


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def block_chunk_files(out: OutputVolume, z: int, top: int, bottom: int, left: int, right: int) -> list[str]:
  """The chunk files a block of section z writes (probability and mask, every level), relative to the output folder
  (so that a moved output still matches): zarr v2 keys "z/row/col" ("row/col" for a 2-D output) under each array."""
  files = []
  for specs in (out.probability, out.mask):
    for level, spec in enumerate(specs):
      chunk = int(spec["metadata"]["chunks"][-1])
      folder = os.path.relpath(spec["kvstore"]["path"], out.path)
      bottom_k, right_k = -(-bottom // 2 ** level), -(-right // 2 ** level)  # the level's edge, rounded up
      rows = range((top >> level) // chunk, -(-bottom_k // chunk))
      cols = range((left >> level) // chunk, -(-right_k // chunk))
      for r in rows:
        for c in cols:
          files.append(f"{folder}/{z}/{r}/{c}" if out.ndim == 3 else f"{folder}/{r}/{c}")
  return files


def chunk_fingerprint(root, files: list[str]) -> dict[str, str]:
  """{"stat": digest of each file's size and modification time, "content": digest of their bytes} of `files` under
  `root` (a chunk not stored counts as absent: TensorStore writes no file for an all-fill chunk). A block's marker
  records it once the block's chunks are written; `chunks_intact` compares on a rerun."""
  stat_hash, content_hash = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
  for name in files:
    path = pathlib.Path(root) / name
    try:
      stat = path.stat()
      data = path.read_bytes()
    except FileNotFoundError:
      stat, data = None, None
    stat_hash.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode() if stat else f"{name}:-;".encode())
    content_hash.update(f"{name}:{len(data)}:".encode() + data if data is not None else f"{name}:-;".encode())
  return {"stat": stat_hash.hexdigest(), "content": content_hash.hexdigest()}


def _stat_fingerprint(root, files: list[str]) -> str:
  stat_hash = hashlib.blake2b(digest_size=16)
  for name in files:
    try:
      stat = (pathlib.Path(root) / name).stat()
    except FileNotFoundError:
      stat = None
    stat_hash.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode() if stat else f"{name}:-;".encode())
  return stat_hash.hexdigest()


def chunks_intact(root, files: list[str], recorded: dict) -> bool:
  """Whether `files` under `root` are as `chunk_fingerprint` recorded them: a stat each; their bytes are read and
  hashed only where a size or modification time moved (a copied output costs a read, not a recomputation)."""
  try:
    if _stat_fingerprint(root, files) == recorded.get("stat"):
      return True
    return chunk_fingerprint(root, files)["content"] == recorded.get("content")
  except (OSError, AttributeError):
    return False


def downsample(array: np.ndarray, how: str) -> np.ndarray:
  """2 x 2 reduction of the last two axes ('mean' or 'max'); an odd edge is reduced with itself (edge padding).

  Shape [..., H, W] -> [..., ceil(H / 2), ceil(W / 2)]. Integer means round half up, (a + b + c + d + 2) // 4, in
  integer arithmetic; float means are computed in float32 and cast back. Four strided views, no float copy of an
  integer block: this runs once per block and level on the workers.
  """
  h, w = array.shape[-2:]
  pad = [(0, 0)] * (array.ndim - 2) + [(0, h % 2), (0, w % 2)]
  a = np.pad(array, pad, mode="edge") if h % 2 or w % 2 else array
  quads = (a[..., 0::2, 0::2], a[..., 0::2, 1::2], a[..., 1::2, 0::2], a[..., 1::2, 1::2])
  if how == "max":
    return np.maximum(np.maximum(quads[0], quads[1]), np.maximum(quads[2], quads[3]))
  if np.issubdtype(array.dtype, np.integer):
    total = quads[0].astype(np.int32)
    for q in quads[1:]:
      total += q
    total += 2
    total //= 4
    return total.astype(array.dtype)
  total = quads[0].astype(np.float32)
  for q in quads[1:]:
    total += q
  total *= np.float32(0.25)
  return total.astype(array.dtype)


def quantize_probability(probability: np.ndarray, dtype: str) -> np.ndarray:
  """float32 probability -> the stored dtype: uint8 = round(p x 255), float16 = p."""
  if dtype == "uint8":
    return np.round(probability * np.float32(255)).astype(np.uint8)
  return probability.astype(np.float16)


class OutputWriter:
  """Writes a block of level-0 results and its pyramid into an OutputVolume; opened once per process."""

  def __init__(self, out: OutputVolume):
    self.out = out
    self._probability = [ts.open(s, write=True).result() for s in out.probability]
    self._mask = [ts.open(s, write=True).result() for s in out.mask]

  def write(self, z: int, top: int, left: int, probability: np.ndarray, mask: np.ndarray) -> None:
    """Writes probability (stored dtype) and mask (uint8 0/1), both [h, w], at (z, top, left) of level 0 and their
    2^k reductions at every level k; returns once every write is durable."""
    futures = []
    for level, (p_store, m_store) in enumerate(zip(self._probability, self._mask)):
      if level:
        probability, mask = downsample(probability, "mean"), downsample(mask, "max")
      r, c = top >> level, left >> level
      index = (z,) if self.out.ndim == 3 else ()
      for store, data in ((p_store, probability), (m_store, mask)):
        region = store[(*index, slice(r, r + data.shape[0]), slice(c, c + data.shape[1]))]
        futures.append(region.write(data))
    for f in futures:
      f.result()


def open_level(path, level: int = 0, *, labels: bool = False) -> np.ndarray:
  """Reads a whole level of an output volume (tests, small volumes): probability, or the mask with `labels`."""
  folder = pathlib.Path(path) / (MASK_PATH if labels else "") / str(level)
  return np.asarray(ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder)}},
                            read=True).result().read().result())
