"""Writes torch.save-layout checkpoints byte by byte, without torch: genuine ones and hostile ones.

The robustness tests of `urisc_jax.models.torch_import` spell every pickle out opcode by opcode (GLOBAL, REDUCE,
BUILD, BINPERSID, ...), so that each attack is exactly the bytes a hostile file would hold, and nothing depends on
torch or on how Python's own pickler would write an object.
"""

import collections
import dataclasses
import pathlib
import pickle
import struct
import zipfile
from typing import Any, Iterable

import ml_dtypes
import numpy as np

PREFIX = "archive"
GENUINE_VALUES = np.array([1.5, -2.0], np.float32)
STORAGE_TYPES = {np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage",
                 np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
                 np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
                 np.dtype(np.int16): "ShortStorage", np.dtype(np.int8): "CharStorage",
                 np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage"}


@dataclasses.dataclass(frozen=True)
class Global:
  """GLOBAL 'module name': the pickle names a Python object."""
  module: str
  name: str


@dataclasses.dataclass(frozen=True)
class Call:
  """func(*args) by REDUCE."""
  func: Any
  args: tuple = ()


@dataclasses.dataclass(frozen=True)
class Build:
  """BUILD: sets the state of `target` (what pickle does with __setstate__ / __dict__ / slot state)."""
  target: Any
  state: Any


@dataclasses.dataclass(frozen=True)
class Items:
  """`target` (a dict-like, e.g. Call(OrderedDict)) filled by SETITEMS."""
  target: Any
  items: dict


@dataclasses.dataclass(frozen=True)
class PersistentId:
  """BINPERSID: what torch writes for a storage, ('storage', <storage type>, key, location, size)."""
  pid: Any


@dataclasses.dataclass(frozen=True)
class Raw:
  """Opcodes spliced in verbatim; they must leave exactly one object on the stack."""
  data: bytes


ORDERED_DICT = Global("collections", "OrderedDict")
REBUILD_TENSOR = Global("torch._utils", "_rebuild_tensor_v2")


def storage(type_name: str, key: str, numel: int) -> PersistentId:
  return PersistentId(("storage", Global("torch", type_name), key, "cpu", numel))


def tensor(stored: Any, offset: int, size: Iterable[int], stride: Iterable[int]) -> Call:
  """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks), as torch.save writes."""
  return Call(REBUILD_TENSOR, (stored, offset, tuple(size), tuple(stride), False, Call(ORDERED_DICT)))


def numpy_dtype(dtype: np.dtype) -> Build:
  """numpy.dtype('f8', False, True) + BUILD (3, '<', ...), as numpy pickles a dtype."""
  dtype = np.dtype(dtype)
  order = dtype.str[0] if dtype.itemsize > 1 else "|"
  return Build(Call(Global("numpy", "dtype"), (dtype.str[1:], False, True)), (3, order, None, None, None, -1, -1, 0))


def numpy_array(array: np.ndarray) -> Build:
  """_reconstruct(ndarray, (0,), b'b') + BUILD (1, shape, dtype, fortran, bytes), as numpy pickles an array."""
  reconstruct = Call(Global("numpy._core.multiarray", "_reconstruct"), (Global("numpy", "ndarray"), (0,), b"b"))
  return Build(reconstruct, (1, tuple(array.shape), numpy_dtype(array.dtype), False, array.tobytes()))


def numpy_scalar(value: np.generic) -> Call:
  return Call(Global("numpy._core.multiarray", "scalar"), (numpy_dtype(value.dtype), value.tobytes()))


def dumps(obj: Any) -> bytes:
  """A protocol-2 pickle of `obj` (built from the classes above and plain Python values), without memo."""
  out = bytearray(pickle.PROTO + b"\x02")
  _emit(obj, out)
  return bytes(out + pickle.STOP)


def _emit(obj: Any, out: bytearray) -> None:
  if obj is None:
    out += pickle.NONE
  elif obj is True or obj is False:
    out += pickle.NEWTRUE if obj else pickle.NEWFALSE
  elif type(obj) is int:
    if -2**31 <= obj < 2**31:
      out += pickle.BININT + struct.pack("<i", obj)
    else:
      encoded = pickle.encode_long(obj)
      out += pickle.LONG1 + bytes([len(encoded)]) + encoded
  elif type(obj) is float:
    out += pickle.BINFLOAT + struct.pack(">d", obj)
  elif type(obj) is str:
    encoded = obj.encode("utf-8", "surrogatepass")
    out += pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded
  elif type(obj) is bytes:  # protocol 2 has no bytes opcode: _codecs.encode(latin1 text, 'latin1')
    _emit(Call(Global("_codecs", "encode"), (obj.decode("latin1"), "latin1")), out)
  elif type(obj) is tuple:
    out += pickle.MARK
    for item in obj:
      _emit(item, out)
    out += pickle.TUPLE
  elif type(obj) is list:
    out += pickle.EMPTY_LIST
    if obj:
      out += pickle.MARK
      for item in obj:
        _emit(item, out)
      out += pickle.APPENDS
  elif type(obj) is dict:
    _emit(Items(Raw(pickle.EMPTY_DICT), obj), out)
  elif isinstance(obj, Items):
    _emit(obj.target, out)
    if obj.items:
      out += pickle.MARK
      for key, value in obj.items.items():
        _emit(key, out)
        _emit(value, out)
      out += pickle.SETITEMS
  elif isinstance(obj, Global):
    out += pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode()
  elif isinstance(obj, Call):
    _emit(obj.func, out)
    _emit(tuple(obj.args), out)
    out += pickle.REDUCE
  elif isinstance(obj, Build):
    _emit(obj.target, out)
    _emit(obj.state, out)
    out += pickle.BUILD
  elif isinstance(obj, PersistentId):
    _emit(obj.pid, out)
    out += pickle.BINPERSID
  elif isinstance(obj, Raw):
    out += obj.data
  else:
    raise TypeError(f"checkpoint_forge cannot pickle {type(obj).__name__}")


def write_zip(path: pathlib.Path, entries: Iterable[tuple[str, bytes]],
              compression: int = zipfile.ZIP_STORED) -> pathlib.Path:
  with zipfile.ZipFile(path, "w", compression) as archive:
    for name, data in entries:
      archive.writestr(name, data)
  return path


def checkpoint_entries(obj: Any, records: dict[str, bytes], *, byteorder: str = "little",
                       prefix: str = PREFIX) -> list[tuple[str, bytes]]:
  """The zip entries torch.save writes: <prefix>/data.pkl, byteorder, data/<key> per storage, version."""
  pickled = obj if isinstance(obj, bytes) else dumps(obj)
  entries = [(f"{prefix}/data.pkl", pickled), (f"{prefix}/byteorder", byteorder.encode())]
  entries += [(f"{prefix}/data/{key}", data) for key, data in records.items()]
  return entries + [(f"{prefix}/version", b"3\n")]


def write_checkpoint(path: pathlib.Path, obj: Any, records: dict[str, bytes] | None = None, *,
                     byteorder: str = "little", compression: int = zipfile.ZIP_STORED) -> pathlib.Path:
  return write_zip(path, checkpoint_entries(obj, records or {}, byteorder=byteorder), compression)


def write_genuine(path: pathlib.Path) -> pathlib.Path:
  """A checkpoint {'w': float32 tensor [1.5, -2.0]}, as torch.save writes it."""
  stored = storage("FloatStorage", "0", GENUINE_VALUES.size)
  return write_checkpoint(path, {"w": tensor(stored, 0, GENUINE_VALUES.shape, (1,))},
                          {"0": GENUINE_VALUES.astype("<f4").tobytes()})


def sample_checkpoint(byteorder: str = "little") -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
  """Zip entries of a small checkpoint using everything the reader allows, and what reading it must give."""
  rng = np.random.default_rng(7)
  arrays = {"0": rng.standard_normal(12).astype(np.float32), "1": np.arange(-2, 3, dtype=np.int64),
            "2": rng.standard_normal(4).astype(np.float16), "3": np.array([1.5, -3, 0.25], ml_dtypes.bfloat16),
            "4": np.array([True, False, False, True]), "5": np.zeros(0, np.float32)}
  order = "<" if byteorder == "little" else ">"
  records = {}
  for key, array in arrays.items():
    data = array.view(f"u{array.itemsize}") if array.itemsize > 1 else array
    records[key] = data.astype(data.dtype.newbyteorder(order)).tobytes()
  stored = {key: storage(STORAGE_TYPES[array.dtype], key, array.size) for key, array in arrays.items()}
  metadata = Items(Call(ORDERED_DICT), {"": {"version": 1}, "layer": {"version": 2}})
  state_dict = Build(Items(Call(ORDERED_DICT), {
      "w": tensor(stored["0"], 0, (3, 4), (4, 1)),
      "w_t": tensor(stored["0"], 0, (4, 3), (1, 4)),  # a transposed view of the same storage
      "tail": tensor(stored["0"], 10, (2,), (1,)),
      "b": tensor(stored["1"], 0, (5,), (1,)),
      "h": tensor(stored["2"], 0, (2, 2), (2, 1)),
      "bf": tensor(stored["3"], 0, (3,), (1,)),
      "m": tensor(stored["4"], 0, (1, 4), (99, 1)),  # a length-1 dimension may have any stride
      "p": Call(Global("torch._utils", "_rebuild_parameter"),
                (tensor(stored["0"], 4, (2, 2), (2, 1)), True, Call(ORDERED_DICT))),
      "empty": tensor(stored["5"], 0, (0, 3), (3, 1)),
  }), {"_metadata": metadata})
  array = np.arange(6, dtype=">f8").reshape(2, 3)
  obj = {"state_dict": state_dict, "epoch": 3, "arch": "resnet50", "norms": [0.5, 0.25],
         "size": Call(Global("torch", "Size"), ([2, 3],)), "np": numpy_array(array),
         "np_i": numpy_array(np.array([[1, 2]], np.int32)), "best": numpy_scalar(np.float64(0.75)),
         "bytes": b"\x00\xffabc", "ba": Call(Global("builtins", "bytearray"), (b"xyz",)),
         "set": Call(Global("builtins", "set"), ([1, 2, 3],)),
         "fs": Call(Global("__builtin__", "frozenset"), ([("a", 1)],)),
         "nested": [1, 2.5, "s", None, True, (1, (2, 3)), {"k": [b"", -7, 2**70]}]}
  w = arrays["0"]
  expected_state = collections.OrderedDict(
      w=w.reshape(3, 4), w_t=w.reshape(3, 4).T, tail=w[10:], b=arrays["1"], h=arrays["2"].reshape(2, 2),
      bf=arrays["3"], m=arrays["4"].reshape(1, 4), p=w[4:8].reshape(2, 2), empty=np.zeros((0, 3), np.float32))
  expected = {"state_dict": expected_state, "epoch": 3, "arch": "resnet50", "norms": [0.5, 0.25], "size": (2, 3),
              "np": array.astype(np.float64),  # numpy, too, unpickles arrays in native byte order
              "np_i": np.array([[1, 2]], np.int32), "best": np.float64(0.75), "bytes": b"\x00\xffabc",
              "ba": bytearray(b"xyz"), "set": {1, 2, 3}, "fs": frozenset({("a", 1)}),
              "nested": [1, 2.5, "s", None, True, (1, (2, 3)), {"k": [b"", -7, 2**70]}]}
  return checkpoint_entries(obj, records, byteorder=byteorder), expected


def assert_same(got: Any, want: Any, where: str = "checkpoint") -> None:
  """Equal values and types, arrays compared by dtype, shape and bits."""
  if isinstance(want, np.ndarray):
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape, (where, got, want)
    np.testing.assert_array_equal(np.ascontiguousarray(got).view(np.uint8), np.ascontiguousarray(want).view(np.uint8),
                                  err_msg=where)
  elif isinstance(want, dict):
    assert type(got) is type(want) and list(got) == list(want), (where, got, want)
    for key in want:
      assert_same(got[key], want[key], f"{where}[{key!r}]")
  elif isinstance(want, (list, tuple)):
    assert type(got) is type(want) and len(got) == len(want), (where, got, want)
    for i, (g, w) in enumerate(zip(got, want)):
      assert_same(g, w, f"{where}[{i}]")
  else:
    assert type(got) is type(want) and got == want, (where, got, want)


def patch_declared_size(path: pathlib.Path, name: str, size: int) -> None:
  """Rewrites the uncompressed size that the local and central headers of record `name` declare (a lying zip)."""
  data = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo(name)
    central = archive.start_dir
  struct.pack_into("<I", data, info.header_offset + 22, size)
  while data[central:central + 4] == b"PK\x01\x02":
    name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, central + 28)
    if data[central + 46:central + 46 + name_length].decode() == name:
      struct.pack_into("<I", data, central + 24, size)
    central += 46 + name_length + extra_length + comment_length
  path.write_bytes(bytes(data))
