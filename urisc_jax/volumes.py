"""Chunked volumes in and out: any TensorStore array as input, OME-Zarr (0.4) as output.

Input (`open_input`): a TensorStore JSON spec string, a `file://` URL, or a local path: `*.zarr` (zarr v2 or v3,
an array or an OME-Zarr image group, whose first multiscale level is read), `*.n5`, or a folder with a neuroglancer
`info` file (precomputed). The array is 2-D [H, W] or a 3-D stack [Z, H, W] whose first axis is the section
index (leading axes of size 1, e.g. OME's t and c, are dropped); 8-bit gray, as the rest of the project reads.
The pixel size is read from OME-Zarr multiscales metadata when there is any.

Output (`create_output`): an OME-Zarr 0.4 image group that napari and Neuroglancer open as it is:

    OUT.zarr/                 multiscales "probability": membrane probability, uint8 (p x 255, rounded) or float16
      0/ 1/ ... levels-1/     level k is 2^k x smaller in y and x (mean of 2 x 2), never in z
      labels/membrane/0/ ...  the thresholded mask as an OME label image: 1 = membrane, 0 = background
                              (the competition's TIFF writes the same mask as 0 = membrane, 255 = background)
                              (level k: max of 2 x 2, so thin membranes stay visible when zoomed out)

Arrays are zarr v2 with "/" chunk keys (what OME-Zarr 0.4 asks for), chunked [1, C, C] at level 0 and
[1, C / 2^k, C / 2^k] at level k, so that a block of level 0 aligned to chunks maps to whole chunks of every level:
no two writers ever touch one chunk.
"""

import dataclasses
import json
import pathlib
import urllib.parse

import numpy as np
import tensorstore as ts

from urisc_jax import outputs
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
  return path.suffix in (".zarr", ".n5") or (path / "info").is_file()


def _local_path(text: str) -> pathlib.Path:
  if text.startswith("file://"):
    return pathlib.Path(urllib.parse.unquote(urllib.parse.urlparse(text).path))
  return pathlib.Path(text)


def _read_json(path: pathlib.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise VolumeError(f"cannot read the metadata file {path} ({e}); is the volume complete?") from e


def _multiscales(path: pathlib.Path) -> list | None:
  """The OME multiscales list of a zarr group at `path` (v2 .zattrs or v3 zarr.json), if any."""
  attrs = _read_json(path / ".zattrs")
  if attrs is None:
    v3 = _read_json(path / "zarr.json") or {}
    attrs = v3.get("attributes", {}) if v3.get("node_type") == "group" else {}
    attrs = attrs.get("ome", attrs)
  return attrs.get("multiscales")


def _path_spec(path: pathlib.Path) -> tuple[dict, list | None]:
  """(TensorStore spec, OME multiscales or None) of a local volume path, chosen from the files it holds."""
  if not path.exists():
    raise VolumeError(f"the input volume {path} does not exist; pass --config.predict.input=PATH.zarr (or .n5, a "
                      "precomputed folder, or a TensorStore JSON spec).")
  multiscales = _multiscales(path) if path.suffix == ".zarr" else None
  if multiscales:
    first = multiscales[0]["datasets"][0]["path"]
    spec, _ = _path_spec(path / first)
    return spec, multiscales
  kvstore = {"driver": "file", "path": str(path.resolve())}
  if (path / "zarr.json").is_file():
    return {"driver": "zarr3", "kvstore": kvstore}, None
  if (path / ".zarray").is_file():
    return {"driver": "zarr", "kvstore": kvstore}, None
  if (path / "attributes.json").is_file():
    return {"driver": "n5", "kvstore": kvstore}, None
  if (path / "info").is_file():
    return {"driver": "neuroglancer_precomputed", "kvstore": kvstore}, None
  raise VolumeError(f"{path} holds no zarr array (.zarray / zarr.json), OME-Zarr image group, N5 dataset "
                    "(attributes.json) or precomputed volume (info): pass the array itself or a TensorStore JSON "
                    "spec.")


def input_spec(text: str) -> tuple[dict, list | None]:
  """(TensorStore spec, OME multiscales or None) for --config.predict.input: a JSON spec, a file:// URL or a path."""
  text = str(text).strip()
  if text.startswith("{"):
    try:
      spec = json.loads(text)
    except ValueError as e:
      raise VolumeError(f"--config.predict.input is not valid JSON ({e}): pass a TensorStore spec such as "
                        '{"driver": "zarr", "kvstore": "file:///data/em.zarr"}.') from e
    return spec, None
  return _path_spec(_local_path(text))


def _ome_scale(multiscales: list | None, ndim: int) -> tuple[list[float], list[str]]:
  """Pixel size and unit per stored axis of the first level of OME multiscales (1.0 / "" where not given)."""
  scale, units = [1.0] * ndim, [""] * ndim
  if not multiscales:
    return scale, units
  first = multiscales[0]
  axes = first.get("axes", [])
  for transform in first["datasets"][0].get("coordinateTransformations", []):
    if transform.get("type") == "scale" and len(transform.get("scale", [])) == ndim:
      scale = [float(s) for s in transform["scale"]]
  if len(axes) == ndim:
    units = [a.get("unit", "") if isinstance(a, dict) else "" for a in axes]
  return scale, units


def open_input(text: str) -> InputVolume:
  """Opens --config.predict.input as an InputVolume (shape checked, metadata read); see the module docstring.

  The recorded spec is that of the view predicted: leading size-1 axes dropped, a precomputed volume's
  [x, y, z, channel] turned into [z, y, x], and the origin moved to 0 (so block coordinates start at 0).
  """
  spec, multiscales = input_spec(text)
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
  scale, units = _ome_scale(multiscales, len(shape))
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
  kept, scale, units = shape[drop:], scale[drop:], units[drop:]
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


def create_output(path, volume: InputVolume, *, chunk: int, levels: int, dtype: str) -> OutputVolume:
  """Creates (or reopens, when it matches) the OME-Zarr group at `path` for a prediction of `volume`.

  Args:
    path: OUT.zarr.
    volume: the input, whose shape, dimensionality and pixel size the output takes.
    chunk: chunk side C at level 0 (a multiple of 2^(levels-1), so every level's chunks tile its blocks).
    levels: pyramid levels (1 = full resolution only).
    dtype: probability dtype, "uint8" or "float16".

  Returns:
    The OutputVolume.
  """
  path = pathlib.Path(path)
  if path.suffix != ".zarr":
    raise VolumeError(f"--config.predict.output={path}: a volume's prediction is an OME-Zarr group; name it *.zarr.")
  if dtype not in PROBABILITY_DTYPES:
    raise VolumeError(f"config.predict.volume.dtype={dtype!r}: must be one of {PROBABILITY_DTYPES}.")
  ndim = volume.ndim
  shape = volume.shape if ndim == 3 else volume.shape[1:]
  try:
    path.mkdir(parents=True, exist_ok=True)
    (path / MASK_PATH).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise PermissionError(f"cannot create the output volume {path} ({e.strerror}); pass a writable "
                          "--config.predict.output=OUT.zarr.") from e
  for group in (path, path / "labels", path / MASK_PATH):
    outputs.write_json(group / ".zgroup", {"zarr_format": 2})
  outputs.write_json(path / ".zattrs", _multiscales_attrs("probability", ndim, levels, volume.scale, volume.units,
                                                          "mean"))
  outputs.write_json(path / "labels" / ".zattrs", {"labels": ["membrane"]})
  mask_attrs = _multiscales_attrs("membrane", ndim, levels, volume.scale, volume.units, "max")
  mask_attrs["image-label"] = {"version": OME_VERSION, "source": {"image": "../../"},
                               "colors": [{"label-value": 1, "rgba": [255, 0, 255, 255]}]}
  outputs.write_json(path / MASK_PATH / ".zattrs", mask_attrs)
  probability, mask = [], []
  for level in range(levels):
    for folder, kind, specs in ((path, dtype, probability), (path / MASK_PATH, "uint8", mask)):
      spec = _array_spec((folder / str(level)).resolve(), level_shape(shape, level), level_chunks(ndim, chunk, level),
                         kind)
      try:
        ts.open(spec, create=True, open=True).result()
      except ValueError as e:
        raise VolumeError(f"{folder / str(level)} exists with another shape, chunking or dtype than this prediction "
                          f"needs ({e}); remove it or pass another --config.predict.output.") from e
      specs.append(spec)
  return OutputVolume(str(path), tuple(probability), tuple(mask), ndim, dtype)


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
