"""Reads PyTorch checkpoints without torch and without running pickled code, and maps them onto the Flax models.

A `.pth` / `.pth.tar` file written by `torch.save` (torch >= 1.6) is a zip: `<dir>/data.pkl` pickles the object
and every tensor's storage is a raw little-endian record `<dir>/data/<key>`. Unpickling an untrusted file can run
any Python function it names, so `read_checkpoint` uses an Unpickler whose `find_class` knows only what rebuilds
tensors (torch._utils._rebuild_tensor_v2, the torch storage types, collections.OrderedDict, a few builtins and
numpy array/scalar reconstruction); any other global is refused with `UnsafeCheckpointError` naming it, before
anything is called. This is torch's own `weights_only=True` rule, re-implemented with numpy.

Nothing a file does outlives its load: for each global, `find_class` hands the pickle a new stand-in object that
forwards calls to this load's reader, never a shared function, type or storage type; and the pickle's BUILD opcode,
which sets an object's state, is refused except on the OrderedDicts, numpy arrays and dtypes the load itself has
just built. (Otherwise one file could, say, turn the float32 storage type into int8 for every later load.) The
pure-Python unpickler is used: the C one sizes its memo by the largest index the file names (a 9-byte pickle asked
it for 2 GB), and its BUILD cannot be overridden. numpy arrays are limited to bool, integer, float and complex
dtypes, whose pickled state is checked before numpy sees it (numpy crashes on some object-array states).

Sizes are capped, so that a small hostile file cannot take the machine's memory (zip bombs, a tensor that repeats
one stored element a billion times). Each cap is a module default that a keyword argument of `read_checkpoint` (or
`load_encoder_weights`) overrides for one call; going over one raises `CheckpointLimitError`, which names it:
- max_bytes = MAX_CHECKPOINT_BYTES (4 GiB): the storage records in total, decompressed. Each record's declared size
  is checked before it is inflated, and it is inflated in bounded chunks that may not exceed that size. The tensors
  and other objects that data.pkl builds (copies of parts of the storages) may total as much again.
- max_pickle_bytes = MAX_PICKLE_BYTES (16 MiB): data.pkl, decompressed. Its opcodes alone can build Python objects
  of up to about 100 times its size (1.6 GB at the default; torch writes about 150 bytes per tensor, so the default
  fits over 100,000 tensors).
- max_records = MAX_RECORDS (100,000): entries in the zip.
- max_tensor_elements = MAX_TENSOR_ELEMENTS (2**32): elements of one storage or numpy array.
Besides, a tensor may not hold more elements than its storage (torch.save never writes such expanded views for
parameters), a storage record must hold exactly the bytes its element count needs, only stored or deflated zip
records are read (torch writes them stored), and data.pkl may not nest tuples over 100 deep nor spend more than
10**8 steps hashing dict keys and set items (tuples and ints do not cache their hash).

Key layouts understood by `load_encoder_weights`:
- torchvision ResNet (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ..., `fc.*` ignored);
- CEM500K MoCoV2 (`state_dict` with `module.encoder_q.` + torchvision names; `fc`, `encoder_k`, `queue`,
  `queue_ptr` ignored; `norms` = [mean, std] of the input normalization);
- DataParallel's `module.` prefix and segmentation_models_pytorch's `encoder.` prefix.
`load_state_dict` loads a whole segmentation_models_pytorch U-Net / LinkNet state dict (`encoder.*`,
`decoder.blocks.*`, `segmentation_head.*`).

Conversions: conv weight OIHW -> HWIO kernel; transposed conv [Cin, Cout/groups, k, k] -> [k, k, Cin/groups, Cout];
BatchNorm weight, bias -> params scale, bias; running_mean, running_var -> batch_stats mean, var. A 3-channel first
conv loaded into a 1-channel model sums its RGB kernels (a gray image seen as R = G = B gives the same output).
"""

import _compat_pickle
import collections
import dataclasses
import io
import math
import pickle
import re
import reprlib
import struct
import sys
import zipfile
import zlib
from typing import Any, Callable, Mapping, Sequence

import flax.traverse_util
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from urisc_jax.models import InputNormalization

MAX_CHECKPOINT_BYTES = 4 * 2**30
MAX_PICKLE_BYTES = 16 * 2**20
MAX_RECORDS = 100_000
MAX_TENSOR_ELEMENTS = 2**32

# keyword of read_checkpoint -> the module default it overrides.
_LIMIT_DEFAULTS = {"max_bytes": "MAX_CHECKPOINT_BYTES", "max_pickle_bytes": "MAX_PICKLE_BYTES",
                   "max_records": "MAX_RECORDS", "max_tensor_elements": "MAX_TENSOR_ELEMENTS"}
_MAX_DIMS = 64  # dimensions of a tensor or numpy array, as in torch
_MAX_NESTING = 100  # tuples nested deeper are refused: hashing one recurses in C without a guard and crashes Python
# Steps (tuple items, 64-bit int digits) of hashing dict keys and set items that one load may take: tuples and ints
# do not cache their hash, so a pickle that reuses one large tuple as a key over and over would run for hours.
_MAX_HASH_STEPS = 10**8
_CHUNK_BYTES = 1 << 20  # records are inflated this much at a time
_NUMPY_KINDS = "biufc"  # numpy arrays and scalars read: bool, int, uint, float, complex
_TEXT_ENCODINGS = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "ascii"})
# What a damaged zip makes zipfile raise, besides BadZipFile.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error, ValueError, struct.error,
               OverflowError, NotImplementedError)


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
  """A checkpoint whose pickle names a global outside the tensor-rebuilding allowlist, or changes one."""


class CheckpointLimitError(CheckpointError):
  """A checkpoint over one of the size limits; the message names the limit and the keyword that raises it."""


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}

# (module, name) -> (the _RestrictedUnpickler method that stands for it, or None for a name that is only an
# argument; fewest and most arguments), or the element dtype of a torch storage type. Names only: the objects the
# pickle gets are made per load (`_Global`), so no file can change what another load sees.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): ("_rebuild_tensor", 4, 7),
    ("torch._utils", "_rebuild_tensor"): ("_rebuild_tensor", 4, 4),
    ("torch._utils", "_rebuild_parameter"): ("_rebuild_parameter", 1, 3),
    ("torch", "Size"): ("_torch_size", 0, 1),
    ("collections", "OrderedDict"): ("_ordered_dict", 0, 1),
    ("builtins", "set"): ("_set", 0, 1),
    ("builtins", "frozenset"): ("_frozenset", 0, 1),
    ("builtins", "bytearray"): ("_bytearray", 0, 2),
    # Protocol-2 pickles (torch's default) spell bytes as _codecs.encode(text, 'latin1').
    ("_codecs", "encode"): ("_encode", 1, 2),
    ("numpy", "dtype"): ("_numpy_dtype", 1, 3),
    ("numpy", "ndarray"): (None, 0, 0),  # the first argument of _reconstruct
}
for _numpy_core in ("numpy.core.multiarray", "numpy._core.multiarray"):
  _SAFE_GLOBALS[(_numpy_core, "_reconstruct")] = ("_numpy_reconstruct", 3, 3)
  _SAFE_GLOBALS[(_numpy_core, "scalar")] = ("_numpy_scalar", 1, 2)
for _storage_name, _dtype in _STORAGE_DTYPES.items():
  _SAFE_GLOBALS[("torch", _storage_name)] = np.dtype(_dtype)
  _SAFE_GLOBALS[("torch.storage", _storage_name)] = np.dtype(_dtype)


@dataclasses.dataclass(frozen=True)
class _Limits:
  """The size caps of one `read_checkpoint` call (see the module docstring)."""
  max_bytes: int
  max_pickle_bytes: int
  max_records: int
  max_tensor_elements: int

  @classmethod
  def resolve(cls, **given: int | None) -> "_Limits":
    """The given caps, and the module defaults (read now, so that changing them takes effect) for the others."""
    values = {}
    for name, constant in _LIMIT_DEFAULTS.items():
      value = globals()[constant] if given[name] is None else given[name]
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"read_checkpoint: {name} must be an int >= 0 (bytes or elements), got {value!r}")
      values[name] = value
    return cls(**values)


def _over_limit(path: str, what: str, name: str, limit: int) -> CheckpointLimitError:
  return CheckpointLimitError(
      f"{path}: {what}, over {name}={limit:,}. The limit guards against hostile files (zip bombs, tensors larger "
      f"than their storage); if you trust this file, pass a larger {name}= to read_checkpoint or "
      f"load_encoder_weights (default torch_import.{_LIMIT_DEFAULTS[name]})")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 80


def _brief(value: Any) -> str:
  """A short repr of something a file chose, for messages: bounded whatever its size or depth."""
  try:
    return _REPR.repr(value)
  except Exception:  # pylint: disable=broad-except  # e.g. an int too long to print
    return f"<{type(value).__name__}>"


def _error_text(error: BaseException) -> str:
  try:
    text = str(error)
  except Exception:  # pylint: disable=broad-except
    text = "?"
  return text if len(text) <= 200 else text[:200] + "..."


class _Global:
  """What the pickle gets for an allowlisted global: a new object per lookup, with no state a file can change.

  It forwards calls, once their number of arguments is checked, to the method of this load's unpickler that stands
  for the global; the unpickler refuses BUILD on it.
  """
  __slots__ = ("name", "storage_dtype", "_path", "_call", "_arity")

  def __init__(self, name: str, path: str, call: Callable[..., Any] | None = None, arity: tuple[int, int] = (0, 0),
               storage_dtype: np.dtype | None = None):
    self.name, self.storage_dtype = name, storage_dtype
    self._path, self._call, self._arity = path, call, arity

  def __call__(self, *args: Any) -> Any:
    if self._call is None:
      raise UnsafeCheckpointError(f"{self._path}: refusing to call {self.name}: a checkpoint only names it as a type")
    low, high = self._arity
    if not low <= len(args) <= high:
      takes = f"{low}" if low == high else f"{low} to {high}"
      raise CheckpointError(f"{self._path}: data.pkl calls {self.name} with {len(args)} arguments; it takes {takes} "
                            "(corrupt file?)")
    return self._call(*args)

  def __repr__(self) -> str:
    return f"<checkpoint global {self.name}>"


def _read_record(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> bytearray:
  """A record's bytes, inflated a chunk at a time; never more than its declared size, which callers check first."""
  name = _brief(info.filename)
  if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x41:
    raise CheckpointError(f"{path}: zip record {name} is encrypted or compressed with method {info.compress_type}; "
                          "torch writes records stored, and only stored or deflated ones are read (re-save the "
                          "checkpoint with torch.save)")
  data = bytearray()
  try:
    with archive.open(info) as record:
      while chunk := record.read(_CHUNK_BYTES):
        data += chunk
        if len(data) > info.file_size:
          raise CheckpointError(f"{path}: zip record {name} inflates past its declared {info.file_size:,} bytes "
                                "(corrupt or hostile file)")
  except CheckpointError:
    raise
  except _ZIP_ERRORS as e:
    raise CheckpointError(f"{path}: cannot read zip record {name} ({type(e).__name__}: {_error_text(e)}); the file "
                          "is damaged (truncated download?): get a fresh copy") from None
  if len(data) != info.file_size:
    raise CheckpointError(f"{path}: zip record {name} holds {len(data):,} bytes, its header says {info.file_size:,} "
                          "(truncated file?)")
  return data


def _tracking_tuple(load: Callable[[Any], None]) -> Callable[[Any], None]:
  """Wraps a tuple-building opcode of the unpickler with `_track_tuple`."""
  def load_tuple(self):
    load(self)
    self._track_tuple()  # pylint: disable=protected-access
  return load_tuple


def _hashing(load: Callable[[Any], None], keys: Callable[[Any], Sequence[Any]]) -> Callable[[Any], None]:
  """Wraps an opcode of the unpickler that hashes `keys(self)` (dict keys, set items) with `_charge_hashing`."""
  def load_hashing(self):
    self._charge_hashing(keys(self))  # pylint: disable=protected-access
    load(self)
  return load_hashing


def _refuse_extension(self) -> None:
  path = self._path  # pylint: disable=protected-access
  raise UnsafeCheckpointError(f"{path}: data.pkl uses the pickle extension registry (EXT opcodes), which "
                              "torch never writes and whose cache every load of the process shares")


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Unpickles a torch zip checkpoint's data.pkl: allowlisted globals, bounded sizes, no state shared across loads."""

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, data: bytes | bytearray, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str,
               limits: _Limits):
    super().__init__(io.BytesIO(data))
    self._archive = archive
    self._prefix = prefix
    self._byteorder = byteorder
    self._path = path
    self._limits = limits
    self._storages: dict[str, np.ndarray] = {}
    self._storage_ids: set[int] = set()  # of the arrays in _storages, which they keep alive
    self._unbuilt: dict[int, Any] = {}  # numpy arrays and dtypes made by this load, whose state BUILD may set once
    self._tuples: dict[int, tuple[tuple, int, int]] = {}  # nested or long tuples by id: (tuple, depth, hash steps)
    self._hash_steps = 0
    self._read_bytes = 0  # storage records inflated
    self._built_bytes = 0  # tensors, arrays and containers made by calls

  def find_class(self, module: str, name: str) -> Any:
    # Protocol-2 pickles may use Python 2 names (__builtin__.set); map them as pickle's own find_class does.
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    entry = _SAFE_GLOBALS.get((module, name))
    qualified = f"{module}.{name}"
    if len(qualified) > 200 or not qualified.isprintable():
      qualified = _brief(qualified)
    if entry is None:
      raise UnsafeCheckpointError(
          f"{self._path}: refusing to load the global {qualified}: only tensors, numbers, strings and plain "
          "containers are read from a checkpoint, since unpickling anything else can run code. If you trust the "
          "file, load it with torch and re-save its state_dict (torch.save(model.state_dict(), path))")
    if isinstance(entry, np.dtype):
      return _Global(qualified, self._path, storage_dtype=entry)
    method, low, high = entry
    return _Global(qualified, self._path, getattr(self, method) if method else None, (low, high))

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str and pid[0] == "storage"
            and isinstance(pid[1], _Global) and pid[1].storage_dtype is not None):
      raise CheckpointError(f"{self._path}: unexpected persistent id {_brief(pid)} in data.pkl; torch writes "
                            "('storage', <storage type>, key, location, size) (corrupt file?)")
    _, storage_type, key, _, numel = pid
    if type(key) is not str or not 0 < len(key) <= 100 or type(numel) is not int or numel < 0:
      raise CheckpointError(f"{self._path}: corrupt storage reference {_brief(pid)} in data.pkl (the key must be a "
                            "short string, the size an int >= 0)")
    dtype = storage_type.storage_dtype
    if key in self._storages:
      storage = self._storages[key]
      if storage.dtype != dtype or storage.size != numel:
        raise CheckpointError(f"{self._path}: data.pkl reads storage {key} as {numel:,} elements of {dtype}, and "
                              f"elsewhere as {storage.size:,} elements of {storage.dtype} (corrupt file?)")
      return storage
    if numel > self._limits.max_tensor_elements:
      raise _over_limit(self._path, f"storage {key} has {numel:,} elements", "max_tensor_elements",
                        self._limits.max_tensor_elements)
    record = f"{self._prefix}data/{key}"
    try:
      info = self._archive.getinfo(record)
    except KeyError:
      raise CheckpointError(f"{self._path}: storage record {record} is missing (truncated file?)") from None
    nbytes = numel * dtype.itemsize
    if info.file_size != nbytes:
      raise CheckpointError(f"{self._path}: storage record {record} has {info.file_size:,} bytes, but data.pkl "
                            f"declares {numel:,} elements of {dtype}, {nbytes:,} bytes (truncated or corrupt file?)")
    if self._read_bytes + nbytes > self._limits.max_bytes:
      raise _over_limit(self._path, f"storage record {record} inflates to {nbytes:,} bytes, after "
                        f"{self._read_bytes:,} bytes of other records", "max_bytes", self._limits.max_bytes)
    raw = _read_record(self._archive, info, self._path)
    self._read_bytes += nbytes
    if self._byteorder != sys.byteorder and dtype.itemsize > 1:  # to native order, in place
      np.frombuffer(raw, f"u{dtype.itemsize}").byteswap(inplace=True)
    storage = np.frombuffer(raw, dtype) if numel else np.zeros(0, dtype)
    storage.flags.writeable = False
    self._storages[key] = storage
    self._storage_ids.add(id(storage))
    return storage

  def _charge(self, nbytes: int, what: str) -> None:
    """Counts what a call builds against max_bytes, before it builds it where the size is known."""
    self._built_bytes += nbytes
    if self._built_bytes > self._limits.max_bytes:
      raise _over_limit(self._path, f"the tensors and objects data.pkl builds reach {self._built_bytes:,} bytes "
                        f"(at {what})", "max_bytes", self._limits.max_bytes)

  def _ints(self, value: Any, what: str) -> tuple[int, ...]:
    if (type(value) not in (tuple, list) or len(value) > _MAX_DIMS
        or not all(type(v) is int and 0 <= v < 2**63 for v in value)):
      raise CheckpointError(f"{self._path}: corrupt tensor record: {what} {_brief(value)} is not a list of at most "
                            f"{_MAX_DIMS} ints in [0, 2**63)")
    return tuple(value)

  # --- The stand-ins for the allowlisted globals.

  def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *unused: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 with numpy: a copy of a strided view that lies inside its storage."""
    del unused  # requires_grad, backward_hooks, metadata
    if not (isinstance(storage, np.ndarray) and id(storage) in self._storage_ids):
      raise CheckpointError(f"{self._path}: data.pkl rebuilds a tensor from {_brief(storage)}, not from a storage "
                            "record (corrupt file?)")
    size, stride = self._ints(size, "size"), self._ints(stride, "stride")
    if type(offset) is not int or not 0 <= offset < 2**63 or len(size) != len(stride):
      raise CheckpointError(f"{self._path}: corrupt tensor record: size {size}, stride {stride}, offset "
                            f"{_brief(offset)}")
    numel = math.prod(size)
    if numel > storage.size:
      raise CheckpointError(
          f"{self._path}: corrupt tensor record: size {size} makes {numel:,} elements, more than the "
          f"{storage.size:,} of its storage. Such expanded views (stride 0) are not read: torch.save never writes "
          "them for parameters (save tensor.clone() instead)")
    if numel == 0:
      return np.zeros(size, storage.dtype)
    stride = tuple(s if n > 1 else 0 for n, s in zip(size, stride))  # the stride of a length-1 dimension is moot
    if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
      raise CheckpointError(f"{self._path}: corrupt tensor record: size {size}, stride {stride}, offset {offset} "
                            f"read past the end of a storage of {storage.size:,} elements")
    itemsize = storage.dtype.itemsize
    self._charge(numel * itemsize, f"a tensor of size {size}")
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * itemsize for s in stride),
                                           writeable=False)
    return np.array(view)

  def _rebuild_parameter(self, data: Any, *unused: Any) -> Any:
    """torch._utils._rebuild_parameter: a Parameter is its data."""
    del unused
    return data

  def _torch_size(self, *args: Any) -> tuple[int, ...]:
    return self._ints(args[0], "torch.Size") if args else ()

  def _container(self, args: tuple[Any, ...], name: str, per_item: int) -> Any:
    """The one argument of set(...), OrderedDict(...) & co.: a list, tuple or dict built by the pickle."""
    if not args:
      return ()
    if type(args[0]) not in (list, tuple, dict, set, frozenset):
      raise CheckpointError(f"{self._path}: data.pkl calls {name} on {_brief(args[0])}; a checkpoint passes it a "
                            "list (corrupt file?)")
    self._charge(per_item * len(args[0]), f"a {name} of {len(args[0]):,} items")
    if name != "collections.OrderedDict" or type(args[0]) is dict:
      self._charge_hashing(args[0])
    else:
      self._charge_hashing([pair[0] for pair in args[0] if type(pair) in (tuple, list) and pair])
    return args[0]

  def _ordered_dict(self, *args: Any) -> collections.OrderedDict:
    return collections.OrderedDict(self._container(args, "collections.OrderedDict", 128))

  def _set(self, *args: Any) -> set:
    return set(self._container(args, "set", 64))

  def _frozenset(self, *args: Any) -> frozenset:
    return frozenset(self._container(args, "frozenset", 64))

  def _bytearray(self, *args: Any) -> bytearray:
    if len(args) == 2:
      data = self._encode(*args)
    elif len(args) == 1 and type(args[0]) in (bytes, bytearray):
      data = args[0]
      self._charge(len(data), "a bytearray")
    elif args:
      raise CheckpointError(f"{self._path}: data.pkl calls bytearray with {_brief(args)}; a checkpoint passes it "
                            "bytes (corrupt file?)")
    else:
      data = b""
    return bytearray(data)

  def _encode(self, text: Any, encoding: Any = "utf-8") -> bytes:
    if (type(text) is not str or type(encoding) is not str
        or encoding.lower().replace("_", "-") not in _TEXT_ENCODINGS):
      raise CheckpointError(f"{self._path}: data.pkl calls _codecs.encode with {_brief((text, encoding))}; a "
                            "checkpoint encodes strings as latin1 or utf-8 (corrupt file?)")
    data = text.encode(encoding)
    self._charge(len(data), "bytes")
    return data

  def _numeric_dtype(self, dtype: Any, what: str) -> np.dtype:
    if not (isinstance(dtype, np.dtype) and dtype.kind in _NUMPY_KINDS and dtype.fields is None
            and dtype.subdtype is None):
      raise CheckpointError(f"{self._path}: {what} of dtype {_brief(dtype)} in data.pkl is not read: only bool, "
                            "integer, float and complex numpy arrays and scalars are (no object, string, structured "
                            "or datetime dtypes)")
    return dtype

  def _numpy_dtype(self, spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """numpy.dtype(spec, align, copy), always a new copy: its BUILD cannot reach numpy's shared descriptors."""
    del copy
    if type(spec) is not str or len(spec) > 8 or type(align) is not bool:
      raise CheckpointError(f"{self._path}: data.pkl calls numpy.dtype with {_brief((spec, align))}; a checkpoint "
                            "names a numeric dtype ('f4', 'i8', ...) (corrupt file?)")
    dtype = self._numeric_dtype(np.dtype(spec, align, True), "a numpy array or scalar")
    self._unbuilt[id(dtype)] = dtype
    return dtype

  def _numpy_reconstruct(self, subtype: Any, shape: Any, code: Any) -> np.ndarray:
    """numpy.core.multiarray._reconstruct(ndarray, (0,), b'b'): the empty array whose BUILD sets its contents."""
    del code
    if not (isinstance(subtype, _Global) and subtype.name == "numpy.ndarray" and type(shape) is tuple
            and shape == (0,)):
      raise CheckpointError(f"{self._path}: data.pkl calls numpy's _reconstruct with {_brief((subtype, shape))}; "
                            "numpy writes (numpy.ndarray, (0,), b'b') (corrupt file?)")
    array = np.zeros(0, np.int8)
    self._unbuilt[id(array)] = array
    return array

  def _numpy_scalar(self, dtype: Any, data: Any = None) -> Any:
    dtype = self._numeric_dtype(dtype, "a numpy scalar")
    if type(data) is not bytes or len(data) != dtype.itemsize:
      raise CheckpointError(f"{self._path}: corrupt numpy scalar in data.pkl: {_brief(data)} for a {dtype}")
    return np.frombuffer(data, dtype)[0]

  # --- Opcodes overridden.

  def _build_dtype(self, dtype: np.dtype, state: Any) -> None:
    # numpy writes (3, byte order, None, None, None, -1, -1, 0) for numeric dtypes (and a 9th item, None, in v4).
    if not (type(state) is tuple and len(state) in (8, 9) and type(state[0]) is int and state[0] in (3, 4)
            and type(state[1]) is str and state[1] in ("<", ">", "|", "=")
            and all(v is None for v in state[2:5] + state[8:])
            and all(type(v) is int for v in state[5:8]) and state[5:8] == (-1, -1, 0)):
      raise CheckpointError(f"{self._path}: corrupt or non-numeric numpy dtype state {_brief(state)} in data.pkl")
    dtype.__setstate__((3, state[1], None, None, None, -1, -1, 0))

  def _build_array(self, array: np.ndarray, state: Any) -> None:
    # numpy writes (1, shape, dtype, is_fortran, raw bytes).
    if not (type(state) is tuple and len(state) == 5 and type(state[0]) is int and state[0] == 1
            and type(state[3]) is bool and type(state[4]) in (bytes, bytearray)):
      raise CheckpointError(f"{self._path}: corrupt numpy array state {_brief(state)} in data.pkl")
    _, shape, dtype, fortran, data = state
    shape, dtype = self._ints(shape, "numpy array shape"), self._numeric_dtype(dtype, "a numpy array")
    numel = math.prod(shape)
    if numel > self._limits.max_tensor_elements:
      raise _over_limit(self._path, f"a numpy array of shape {shape} has {numel:,} elements", "max_tensor_elements",
                        self._limits.max_tensor_elements)
    if numel * dtype.itemsize != len(data):
      raise CheckpointError(f"{self._path}: corrupt numpy array in data.pkl: shape {shape} of {dtype} needs "
                            f"{numel * dtype.itemsize:,} bytes, it has {len(data):,}")
    self._charge(len(data), f"a numpy array of shape {shape}")
    array.__setstate__((1, shape, dtype, fortran, bytes(data)))

  def _load_build(self) -> None:
    state = self.stack.pop()
    target = self.stack[-1]
    if self._unbuilt.get(id(target)) is target:
      del self._unbuilt[id(target)]
      if isinstance(target, np.dtype):
        self._build_dtype(target, state)
      else:
        self._build_array(target, state)
    elif (type(target) is collections.OrderedDict and type(state) is dict
          and all(type(k) is str and not k.startswith("__") for k in state)):
      target.__dict__.update(state)  # torch keeps state_dict._metadata as an attribute
    else:
      what = (f"the global {target.name}" if isinstance(target, _Global)
              else f"an object of type {type(target).__name__}")
      raise UnsafeCheckpointError(
          f"{self._path}: refusing to set the state of {what} (pickle BUILD opcode): a checkpoint only sets that of "
          "the OrderedDicts, numpy arrays and dtypes it has just built, and changing anything else could change "
          "what later loads see (corrupt or hostile file)")

  def _tuple_cost(self, value: tuple) -> tuple[int, int]:
    """(nesting depth, steps to hash) of a tuple; untracked tuples are flat and short (see _track_tuple)."""
    known = self._tuples.get(id(value))
    return (known[1], known[2]) if known is not None and known[0] is value else (1, len(value) + 1)

  def _track_tuple(self) -> None:
    """Notes the depth and hashing cost of the tuple an opcode just built, refusing one nested too deep."""
    new = self.stack[-1]
    depth, steps = 1, len(new) + 1
    for item in new:
      if type(item) is tuple:
        item_depth, item_steps = self._tuple_cost(item)
        depth, steps = max(depth, item_depth + 1), steps + item_steps
      elif type(item) is int:
        steps += item.bit_length() // 64
    if depth > _MAX_NESTING:
      raise CheckpointError(f"{self._path}: data.pkl nests tuples more than {_MAX_NESTING} deep (corrupt or hostile "
                            "file: hashing such a tuple crashes Python)")
    if depth > 1 or steps > 64:  # the tuple stays alive in the dict, so its id stays its own
      self._tuples[id(new)] = (new, depth, steps)

  def _charge_hashing(self, keys: Any) -> None:
    for key in keys:
      if type(key) is tuple:
        self._hash_steps += self._tuple_cost(key)[1]
      elif type(key) is int:
        self._hash_steps += key.bit_length() // 64 + 1
      else:
        self._hash_steps += 1  # str, bytes and frozenset cache their hash
    if self._hash_steps > _MAX_HASH_STEPS:
      raise CheckpointError(f"{self._path}: data.pkl hashes large tuples or ints as dict keys or set items over and "
                            f"over, {self._hash_steps:,} steps (corrupt or hostile file)")

  def _load_bytearray8(self) -> None:
    # pickle's own allocates the length the file declares before reading it: 10 bytes could ask for terabytes.
    size, = struct.unpack("<Q", self.read(8))
    data = self.read(size)  # no more than the pickle holds
    if len(data) != size:
      raise CheckpointError(f"{self._path}: data.pkl declares a bytearray of {size:,} bytes and holds "
                            f"{len(data):,} (truncated or corrupt file)")
    self.append(bytearray(data))

  dispatch[pickle.BUILD[0]] = _load_build
  dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
  for _opcode in (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3):
    dispatch[_opcode[0]] = _tracking_tuple(dispatch[_opcode[0]])
  # Before these opcodes run, self.stack holds what they hash: the items since MARK, or the key below the value.
  dispatch[pickle.SETITEM[0]] = _hashing(dispatch[pickle.SETITEM[0]], lambda self: self.stack[-2:-1])
  for _opcode in (pickle.SETITEMS, pickle.DICT):
    dispatch[_opcode[0]] = _hashing(dispatch[_opcode[0]], lambda self: self.stack[0::2])
  for _opcode in (pickle.ADDITEMS, pickle.FROZENSET):
    dispatch[_opcode[0]] = _hashing(dispatch[_opcode[0]], lambda self: self.stack)
  for _opcode in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
    dispatch[_opcode[0]] = _refuse_extension
  del _opcode


def _open_zip(file: io.BufferedReader, path: str) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(file)
  except _ZIP_ERRORS as e:
    file.seek(0)
    head = file.read(4)
    if not head:
      hint = "the file is empty"
    elif head.startswith(b"PK"):
      hint = (f"it starts like a zip, but its directory cannot be read ({type(e).__name__}: {_error_text(e)}); "
              "truncated download? Get a fresh copy")
    elif head.startswith(b"\x80"):
      hint = ("it is a plain pickle: files from torch < 1.6 (legacy format) or other pickles are not read; re-save "
              "it with a current torch (torch.save(torch.load(path), new_path))")
    else:
      hint = "torch.save writes zip files, was this one written by another program?"
    raise CheckpointError(f"{path} is not a torch zip checkpoint: {hint}") from None


def _read_archive(archive: zipfile.ZipFile, path: str, limits: _Limits) -> Any:
  infos = archive.infolist()
  if len(infos) > limits.max_records:
    raise _over_limit(path, f"the zip holds {len(infos):,} records", "max_records", limits.max_records)
  pickles = [info for info in infos if info.filename.endswith("data.pkl") and info.filename.count("/") == 1]
  if len(pickles) != 1:
    found = _brief([info.filename for info in pickles]) if pickles else "none"
    raise CheckpointError(f"{path}: expected one <dir>/data.pkl in the zip, found {found}")
  prefix = pickles[0].filename[:-len("data.pkl")]
  byteorder = "little"
  if f"{prefix}byteorder" in archive.NameToInfo:
    info = archive.getinfo(f"{prefix}byteorder")
    if info.file_size <= 16:
      byteorder = _read_record(archive, info, path).decode("ascii", "replace").strip()
    if info.file_size > 16 or byteorder not in ("little", "big"):
      raise CheckpointError(f"{path}: record {prefix}byteorder does not say 'little' or 'big' (corrupt file?)")
  if pickles[0].file_size > limits.max_pickle_bytes:
    raise _over_limit(path, f"{_brief(pickles[0].filename)} inflates to {pickles[0].file_size:,} bytes",
                      "max_pickle_bytes", limits.max_pickle_bytes)
  data = _read_record(archive, pickles[0], path)
  unpickler = _RestrictedUnpickler(data, archive, prefix, byteorder, path, limits)
  try:
    return unpickler.load()
  except (CheckpointError, MemoryError):
    raise
  except Exception as e:  # pylint: disable=broad-except  # a malformed pickle can fail in many ways; report them as one
    raise CheckpointError(f"{path}: cannot unpickle data.pkl ({type(e).__name__}: {_error_text(e)}); the file is "
                          "corrupt or not a torch checkpoint") from e


def read_checkpoint(path: str, *, max_bytes: int | None = None, max_pickle_bytes: int | None = None,
                    max_records: int | None = None, max_tensor_elements: int | None = None) -> Any:
  """Reads a torch.save zip file into Python objects with numpy arrays in place of tensors.

  Args:
    path: a `.pth`, `.pt` or `.pth.tar` file written by torch >= 1.6.
    max_bytes, max_pickle_bytes, max_records, max_tensor_elements: size caps for this call (see the module
      docstring); None takes the module default (MAX_CHECKPOINT_BYTES, MAX_PICKLE_BYTES, MAX_RECORDS,
      MAX_TENSOR_ELEMENTS).

  Returns:
    The saved object (usually a dict), tensors as numpy arrays (bfloat16 as ml_dtypes.bfloat16).

  Raises:
    FileNotFoundError: no such file.
    UnsafeCheckpointError: the pickle names a global outside the allowlist, or tries to change one; nothing it
      names has run.
    CheckpointLimitError: the file is over a size cap (the message names the keyword that raises it).
    CheckpointError: not a torch zip checkpoint, or a corrupt one.
  """
  path = str(path)
  limits = _Limits.resolve(max_bytes=max_bytes, max_pickle_bytes=max_pickle_bytes, max_records=max_records,
                           max_tensor_elements=max_tensor_elements)
  try:
    file = open(path, "rb")  # pylint: disable=consider-using-with
  except FileNotFoundError:
    raise FileNotFoundError(f"checkpoint {path} does not exist") from None
  with file, _open_zip(file, path) as archive:
    try:
      return _read_archive(archive, path, limits)
    except CheckpointError:
      raise
    except _ZIP_ERRORS as e:
      raise CheckpointError(f"{path}: corrupt zip ({type(e).__name__}: {_error_text(e)}); the file is damaged "
                            "(truncated download?): get a fresh copy") from e


# ---------------------------------------------------------------------------------------------------------------
# Names: Flax module paths of this package -> torch state-dict keys.

# Deep-stem ResNets (PyTorch-Encoding's "deep base", used by CASENet ports) keep the stem in `conv1` as a Sequential
# (conv, bn, relu, conv, bn, relu, conv) followed by `bn1`.
_DEEP_STEM_KEYS = {"stem_conv1": "conv1.0", "stem_bn1": "conv1.1", "stem_conv2": "conv1.3", "stem_bn2": "conv1.4",
                   "stem_conv3": "conv1.6", "stem_bn3": "bn1"}
_ENCODER_RULES = [
    (re.compile(r"^block(\d+)$"), r"\1"),
    (re.compile(r"^downsample_conv$"), "downsample.0"),
    (re.compile(r"^downsample_bn$"), "downsample.1"),
]
# segmentation_models_pytorch's decoder names (Conv2dReLU is a Sequential: 0 conv, 1 bn).
_SMP_RULES = [
    (("decoder", r"block(\d+)", r"(conv\d)", "conv"), r"decoder.blocks.\1.\2.0"),     # U-Net
    (("decoder", r"block(\d+)", r"(conv\d)", "bn"), r"decoder.blocks.\1.\2.1"),
    (("decoder", r"block(\d+)", "reduce", "conv"), r"decoder.blocks.\1.block.0.0"),   # LinkNet
    (("decoder", r"block(\d+)", "reduce", "bn"), r"decoder.blocks.\1.block.0.1"),
    (("decoder", r"block(\d+)", "deconv"), r"decoder.blocks.\1.block.1.0"),
    (("decoder", r"block(\d+)", "deconv_bn"), r"decoder.blocks.\1.block.1.1"),
    (("decoder", r"block(\d+)", "expand", "conv"), r"decoder.blocks.\1.block.2.0"),
    (("decoder", r"block(\d+)", "expand", "bn"), r"decoder.blocks.\1.block.2.1"),
    (("head",), "segmentation_head.0"),
]
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def encoder_module_key(path: Sequence[str]) -> str:
  """torchvision name of a ResNet module path: ('layer1', 'block0', 'downsample_conv') -> 'layer1.0.downsample.0'."""
  if len(path) == 1 and path[0] in _DEEP_STEM_KEYS:
    return _DEEP_STEM_KEYS[path[0]]
  parts = []
  for part in path:
    for pattern, replacement in _ENCODER_RULES:
      if pattern.match(part):
        part = pattern.sub(replacement, part)
        break
    parts.append(part)
  return ".".join(parts)


def smp_module_key(path: Sequence[str]) -> str:
  """segmentation_models_pytorch name of a U-Net / LinkNet module path; other paths are joined with dots.

  ('encoder', 'layer1', 'block0', 'conv1') -> 'encoder.layer1.0.conv1';
  ('decoder', 'block2', 'conv1', 'bn') -> 'decoder.blocks.2.conv1.1'; ('head',) -> 'segmentation_head.0'.
  """
  if path and path[0] == "encoder":
    return "encoder." + encoder_module_key(path[1:])
  for pattern, replacement in _SMP_RULES:
    if len(pattern) == len(path) and all(re.fullmatch(p, part) for p, part in zip(pattern, path)):
      return re.sub(r"^" + r"\.".join(pattern) + "$", replacement, ".".join(path))
  return ".".join(path)


def _is_transposed(module_path: Sequence[str]) -> bool:
  """ConvTranspose2d modules of this package are named 'deconv' or 'up'."""
  return bool(module_path) and module_path[-1] in ("deconv", "up")


def _convert(leaf: str, module_path: Sequence[str], value: np.ndarray, target_shape: tuple[int, ...],
             first_conv: bool) -> tuple[np.ndarray | None, str]:
  """Torch tensor -> Flax leaf of `target_shape`; returns (array or None if the shapes do not fit, note)."""
  note = ""
  if leaf == "kernel" and value.ndim == 4:
    if _is_transposed(module_path):
      in_channels, out_per_group, k1, k2 = value.shape
      groups = in_channels // target_shape[2] if target_shape[2] and in_channels % target_shape[2] == 0 else 1
      value = value.reshape(groups, in_channels // groups, out_per_group, k1, k2)
      value = value.transpose(3, 4, 1, 0, 2).reshape(k1, k2, in_channels // groups, groups * out_per_group)
    else:
      value = value.transpose(2, 3, 1, 0)
      if first_conv and value.shape[:2] + value.shape[3:] == target_shape[:2] + target_shape[3:]:
        have, want = value.shape[2], target_shape[2]
        if have == 3 and want == 1:
          value, note = value.sum(axis=2, keepdims=True), "summed its RGB kernels into one input channel"
        elif have == 1 and want > 1:
          value = np.repeat(value / want, want, axis=2)
          note = f"split its gray kernel over {want} input channels"
  elif leaf == "kernel" and value.ndim == 2:
    value = value.T
  if tuple(value.shape) != tuple(target_shape):
    return None, ""
  return value, note


@dataclasses.dataclass
class LoadInfo:
  """What `load_state_dict` / `load_encoder_weights` did.

  Attributes:
    source: the checkpoint path (or '<state_dict>').
    loaded: Flax paths ('params/encoder/conv1/kernel', ...) that received a tensor.
    missing: Flax paths whose torch key was not in the checkpoint (they keep their initial values).
    unexpected: checkpoint keys that no Flax leaf asked for (and that are not known to be irrelevant).
    mismatched: 'key: checkpoint shape vs model shape' for tensors that did not fit.
    ignored: checkpoint keys dropped on purpose (classifier fc, MoCo key encoder and queue, num_batches_tracked).
    notes: conversions worth knowing, e.g. 'conv1.weight: summed its RGB kernels into one input channel'.
    normalization: the input normalization stored in the checkpoint (CEM500K `norms`), or None.
    metadata: other scalar entries of the checkpoint (e.g. arch, epoch).
  """
  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  mismatched: list[str] = dataclasses.field(default_factory=list)
  ignored: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  normalization: InputNormalization | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


def _listing(names: Sequence[str], limit: int = 12) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_state_dict(variables: Mapping[str, Any], state_dict: Mapping[str, np.ndarray], *,
                    module_key: Callable[[Sequence[str]], str] = smp_module_key,
                    scope: Sequence[str] = (), strict: bool = True, ignored: Sequence[str] = (),
                    source: str = "<state_dict>") -> tuple[dict[str, Any], LoadInfo]:
  """Copies torch tensors into Flax variables, converting layouts.

  Args:
    variables: {'params': ..., 'batch_stats': ...} of a model of this package (arrays or ShapeDtypeStructs).
    state_dict: torch key -> numpy array (e.g. from `read_checkpoint`).
    module_key: maps a Flax module path (relative to `scope`) to its torch name; the default reads
      segmentation_models_pytorch U-Net / LinkNet names.
    scope: load only the subtree at this module path (e.g. ('encoder',)); others keep their values.
    strict: raise when any leaf in scope is missing, any key is unexpected or any shape does not fit.
    ignored: keys already dropped by the caller, reported in the info.
    source: a name for messages.

  Returns:
    (new variables with float32 jax arrays, LoadInfo).

  Raises:
    CheckpointError: with strict=True, naming the missing, unexpected and mismatched keys.
  """
  info = LoadInfo(source=source, ignored=list(ignored))
  state = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  info.ignored += [k for k in state_dict if k.endswith("num_batches_tracked")]
  used = set()
  new_variables = {}
  scope = tuple(scope)
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(dict(variables.get(collection, {})))
    for path, target in flat.items():
      if path[:len(scope)] != scope:
        continue
      module_path, leaf = path[len(scope):-1], path[-1]
      key = f"{module_key(module_path)}.{_LEAF_NAMES.get(leaf, leaf)}"
      name = "/".join((collection,) + path)
      if key not in state:
        info.missing.append(f"{name} (checkpoint key {key})")
        continue
      used.add(key)
      first_conv = key in ("conv1.weight", "conv1.0.weight", "encoder.conv1.weight", "encoder.conv1.0.weight")
      value, note = _convert(leaf, module_path, np.asarray(state[key]), tuple(target.shape), first_conv)
      if value is None:
        info.mismatched.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(target.shape)}")
        continue
      if note:
        info.notes.append(f"{key}: {note}")
      flat[path] = jnp.asarray(value, dtype=target.dtype)
      info.loaded.append(name)
    new_variables[collection] = flax.traverse_util.unflatten_dict(flat)
  for collection, tree in variables.items():
    new_variables.setdefault(collection, tree)
  info.unexpected = sorted(set(state) - used)
  problems = []
  if info.missing:
    problems.append(f"{len(info.missing)} missing: {_listing(info.missing)}")
  if info.unexpected:
    problems.append(f"{len(info.unexpected)} unexpected: {_listing(info.unexpected)}")
  if info.mismatched:
    problems.append(f"{len(info.mismatched)} with another shape: {_listing(info.mismatched)}")
  if strict and problems:
    raise CheckpointError(f"{source} does not fit the model ({'; '.join(problems)}). Check the encoder name, "
                          "width and in_channels, or pass strict=False to load what fits")
  if not info.loaded:
    raise CheckpointError(f"{source}: no tensor of the checkpoint matched the model; is it a ResNet checkpoint?")
  return new_variables, info


def encoder_state_dict(checkpoint: Any, source: str = "<checkpoint>") -> tuple[dict[str, np.ndarray], list[str]]:
  """The torchvision-named ResNet weights inside a checkpoint object, and the keys dropped on purpose.

  Understands a bare state dict, {'state_dict': ...} and {'model': ...} wrappers, the CEM500K MoCoV2 layout
  (`module.encoder_q.` kept, `fc`, `encoder_k`, `queue`, `queue_ptr` dropped), DataParallel's `module.` prefix and
  segmentation_models_pytorch's `encoder.` prefix (its decoder and head are dropped).
  """
  state = checkpoint
  if isinstance(state, Mapping):
    for wrapper in ("state_dict", "model"):
      if wrapper in state and isinstance(state[wrapper], Mapping):
        state = state[wrapper]
        break
  if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
    raise CheckpointError(f"{source}: found no state dict (str -> tensor mapping) in the checkpoint")
  state = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
  ignored = []

  def strip(prefix: str) -> None:
    nonlocal state
    kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    ignored.extend(k for k in state if not k.startswith(prefix))
    state = kept

  if any(k.startswith("module.encoder_q.") for k in state):
    strip("module.encoder_q.")
  elif state and all(k.startswith("module.") for k in state):
    strip("module.")
  if any(k.startswith("encoder.") for k in state):
    strip("encoder.")
  ignored.extend(k for k in state if k.startswith("fc."))
  state = {k: v for k, v in state.items() if not k.startswith("fc.")}
  return state, ignored


def checkpoint_normalization(checkpoint: Any) -> InputNormalization | None:
  """The input normalization a checkpoint stores as `norms` = [mean, std] (CEM500K), or None."""
  if isinstance(checkpoint, Mapping) and "norms" in checkpoint:
    norms = np.asarray(checkpoint["norms"], np.float64).ravel()
    if norms.size == 2 and norms[1] > 0:
      return InputNormalization(mean=float(norms[0]), std=float(norms[1]))
  return None


def load_encoder_weights(variables: Mapping[str, Any], path: str, *, encoder_path: Sequence[str] = ("encoder",),
                         strict: bool = True, **read_limits: int | None) -> tuple[dict[str, Any], LoadInfo]:
  """Loads ResNet weights from a torch checkpoint file into the encoder of a model of this package.

  Args:
    variables: the model's {'params': ..., 'batch_stats': ...} (e.g. from model.init).
    path: torchvision ResNet state dict, CEM500K MoCoV2 `.pth.tar`, or an smp model's state dict.
    encoder_path: module path of the ResNet inside the model.
    strict: raise on any missing, unexpected or mismatched encoder tensor (named in the message).
    **read_limits: max_bytes, max_pickle_bytes, max_records, max_tensor_elements: the size caps of
      `read_checkpoint`, to raise for a trusted checkpoint larger than the defaults.

  Returns:
    (variables with the encoder's params and batch_stats replaced, LoadInfo). `info.normalization` is the
    checkpoint's input normalization when it has one (CEM500K: mean 0.57287, std 0.12741); use it on the inputs.
  """
  checkpoint = read_checkpoint(path, **read_limits)
  state, ignored = encoder_state_dict(checkpoint, str(path))
  variables, info = load_state_dict(variables, state, module_key=encoder_module_key, scope=tuple(encoder_path),
                                    strict=strict, ignored=ignored, source=str(path))
  info.normalization = checkpoint_normalization(checkpoint)
  if isinstance(checkpoint, Mapping):
    info.metadata = {k: v for k, v in checkpoint.items() if isinstance(v, (str, int, float)) and k != "norms"}
  return variables, info
