"""Hostile and broken checkpoints against torch_import.read_checkpoint: each is refused with a documented error.

Every case writes its file by hand (checkpoint_forge spells the pickles opcode by opcode), so that an attack here is
exactly the bytes a hostile file would hold. A refusal must raise the error class of the catalogue, and its message
must name the file and say what went wrong.
"""

import bz2
import pathlib
import pickle
import time
import zipfile

import checkpoint_forge as forge
import numpy as np
import pytest

from urisc_jax.models import torch_import

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "models" / "cem500k_mocov2_tiny.pth.tar"
F32 = forge.GENUINE_VALUES.astype("<f4").tobytes()  # the 8 bytes of a FloatStorage of 2 elements
ORDERED_DICT, REBUILD = forge.ORDERED_DICT, forge.REBUILD_TENSOR
CheckpointError = torch_import.CheckpointError
Unsafe = torch_import.UnsafeCheckpointError
Limit = torch_import.CheckpointLimitError


def _float_tensor(key="0", numel=2, offset=0, size=(2,), stride=(1,)):
  return {"w": forge.tensor(forge.storage("FloatStorage", key, numel), offset, size, stride)}


def _checkpoint(obj, records=None, **kwargs):
  """A builder: tmp_path -> the checkpoint file holding `obj`."""
  return lambda tmp_path: forge.write_checkpoint(tmp_path / "case.pth", obj, records, **kwargs)


def _file(data):
  def build(tmp_path):
    path = tmp_path / "case.pth"
    path.write_bytes(data)
    return path
  return build


def _truncated_genuine(tmp_path):
  path = forge.write_genuine(tmp_path / "case.pth")
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  return path


def _zip_bomb(tmp_path, name="archive/data/0", mib=64):
  """A FloatStorage record of `mib` MiB of zeros, deflated to a file of about `mib` KiB, written in chunks."""
  path = tmp_path / "case.pth"
  numel = mib * 2**20 // 4
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
    if name != "archive/data.pkl":
      archive.writestr("archive/data.pkl", forge.dumps(_float_tensor(numel=numel, size=(numel,))))
    with archive.open(name, "w", force_zip64=True) as record:
      for _ in range(mib):
        record.write(bytes(2**20))
  assert path.stat().st_size < mib * 2**11  # the bomb itself stays small
  return path


def _lying_size(tmp_path):
  """A deflated record of 1 MiB of zeros whose headers declare the 8 bytes the pickle expects."""
  path = tmp_path / "case.pth"
  entries = forge.checkpoint_entries(_float_tensor(), {"0": bytes(2**20)})
  forge.write_zip(path, entries, zipfile.ZIP_DEFLATED)
  forge.patch_declared_size(path, "archive/data/0", len(F32))
  return path


def _bzip2_record(tmp_path):
  return forge.write_zip(tmp_path / "case.pth", forge.checkpoint_entries(_float_tensor(), {"0": F32}),
                         zipfile.ZIP_BZIP2)


def _many_records(tmp_path):
  entries = forge.checkpoint_entries(_float_tensor(), {"0": F32})
  return forge.write_zip(tmp_path / "case.pth", entries + [(f"archive/extra/{i}", b"") for i in range(30)])


def _no_data_pkl(tmp_path):
  return forge.write_zip(tmp_path / "case.pth", [("archive/data/0", F32), ("archive/version", b"3\n")])


def _storage_type(type_name="FloatStorage"):
  return forge.Global("torch", type_name)


def _numpy_object_array():
  """The state that crashes numpy's own ndarray.__setstate__ (a segfault in numpy 2.4): object dtype, short list."""
  reconstruct = forge.Call(forge.Global("numpy.core.multiarray", "_reconstruct"),
                           (forge.Global("numpy", "ndarray"), (0,), b"b"))
  dtype = forge.Call(forge.Global("numpy", "dtype"), ("O8", False, True))
  return forge.Build(reconstruct, (1, (10**8,), dtype, False, [1]))


def _reused_tuple_key(items, repeats):
  """{t: None} set `repeats` times for one memoized tuple t of `items` ints: each set hashes all of t again."""
  big = pickle.MARK + (pickle.BININT1 + b"\x07") * items + pickle.TUPLE + pickle.BINPUT + b"\x01" + pickle.POP
  sets = pickle.MARK + (pickle.BINGET + b"\x01" + pickle.NONE) * repeats + pickle.SETITEMS
  return forge.Raw(big + pickle.EMPTY_DICT + sets)


def _nested_memo_tuple_key():
  """t3 = ((t1,) * 1000,) * 1000 with t1 = (7,) * 1000 from a 6 KB pickle: hashing it once takes 10**9 steps."""
  out = pickle.MARK + (pickle.BININT1 + b"\x07") * 1000 + pickle.TUPLE
  for memo in (1, 2):
    out += pickle.BINPUT + bytes([memo]) + pickle.POP + pickle.MARK + (pickle.BINGET + bytes([memo])) * 1000
    out += pickle.TUPLE
  return forge.Raw(pickle.EMPTY_DICT + out + pickle.NONE + pickle.SETITEM)


def _shared_views(count):
  """`count` tensors viewing one 1 KiB storage: each copy counts against max_bytes."""
  stored = forge.storage("FloatStorage", "0", 256)
  return {f"w{i}": forge.tensor(stored, i, (254,), (1,)) for i in range(count)}


# (id, builder, read_checkpoint keywords, error class, message fragment)
CATALOGUE = [
    # (a) A file that changes an allowlisted object for the rest of the process (BUILD bypasses frozen dataclasses).
    ("build_storage_type_dict_state",
     _checkpoint(forge.Build(_storage_type(), {"dtype": forge.Call(forge.Global("numpy", "dtype"), ("i1",))})), {},
     Unsafe, "refusing to set the state of the global torch.FloatStorage"),
    ("build_storage_type_slot_state",
     _checkpoint(forge.Build(_storage_type(), (None, {"dtype": forge.Call(forge.Global("numpy", "dtype"), ("i1",))}))),
     {}, Unsafe, "refusing to set the state of the global torch.FloatStorage"),
    ("build_function_defaults", _checkpoint(forge.Build(REBUILD, (None, {"__defaults__": (0, 0)}))), {},
     Unsafe, "refusing to set the state of the global torch._utils._rebuild_tensor_v2"),
    ("build_ordered_dict_dunder",
     _checkpoint(forge.Build(forge.Call(ORDERED_DICT), {"__class__": forge.Call(ORDERED_DICT)})), {},
     Unsafe, "refusing to set the state of an object of type OrderedDict"),
    # (b) Sizes: tensors over their storage, zip bombs, lying headers, too many records.
    ("stride_0_expansion", _checkpoint(_float_tensor(numel=1, size=(10**8,), stride=(0,)), {"0": F32[:4]}), {},
     CheckpointError, "makes 100,000,000 elements, more than the 1 of its storage"),
    ("huge_size_over_tiny_storage",
     _checkpoint(_float_tensor(size=(100_000, 100_000), stride=(100_000, 1)), {"0": F32}), {},
     CheckpointError, "more than the 2 of its storage"),
    ("read_past_storage_end", _checkpoint(_float_tensor(offset=1), {"0": F32}), {},
     CheckpointError, "read past the end of a storage of 2 elements"),
    ("negative_offset", _checkpoint(_float_tensor(offset=-1), {"0": F32}), {}, CheckpointError, "offset -1"),
    ("negative_stride", _checkpoint(_float_tensor(stride=(-1,)), {"0": F32}), {},
     CheckpointError, "corrupt tensor record: stride (-1,)"),
    ("storage_record_missing", _checkpoint(_float_tensor(key="7"), {"0": F32}), {},
     CheckpointError, "storage record archive/data/7 is missing"),
    ("record_not_multiple_of_itemsize", _checkpoint(_float_tensor(), {"0": F32[:7]}), {},
     CheckpointError, "has 7 bytes, but data.pkl declares 2 elements of float32, 8 bytes"),
    ("record_shorter_than_numel", _checkpoint(_float_tensor(numel=4, size=(4,)), {"0": F32}), {},
     CheckpointError, "has 8 bytes, but data.pkl declares 4 elements of float32, 16 bytes"),
    ("zip_bomb_storage", _zip_bomb, {"max_bytes": 16 * 2**20},
     Limit, "inflates to 67,108,864 bytes, after 0 bytes of other records, over max_bytes=16,777,216"),
    ("zip_bomb_data_pkl_default_cap", lambda tmp_path: _zip_bomb(tmp_path, "archive/data.pkl", 32), {},
     Limit, "inflates to 33,554,432 bytes, over max_pickle_bytes=16,777,216"),
    ("lying_declared_size", _lying_size, {}, CheckpointError, "cannot read zip record 'archive/data/0'"),
    ("bzip2_record", _bzip2_record, {}, CheckpointError, "compressed with method 12"),
    ("too_many_records", _many_records, {"max_records": 20}, Limit, "the zip holds 34 records, over max_records=20"),
    ("storage_over_max_tensor_elements", _checkpoint(_float_tensor(), {"0": F32}), {"max_tensor_elements": 1},
     Limit, "storage 0 has 2 elements, over max_tensor_elements=1"),
    ("tensor_copies_over_max_bytes", _checkpoint(_shared_views(3), {"0": bytes(1024)}), {"max_bytes": 2500},
     Limit, "the tensors and objects data.pkl builds reach 3,048 bytes"),
    # Globals outside the allowlist, and allowlisted ones misused.
    ("global_os_system", _checkpoint(forge.Call(forge.Global("os", "system"), ("true",))), {},
     Unsafe, "refusing to load the global os.system"),
    ("global_builtins_eval", _checkpoint(forge.Call(forge.Global("builtins", "eval"), ("1",))), {},
     Unsafe, "refusing to load the global builtins.eval"),
    ("global_name_unprintable", _checkpoint(forge.Global("os\x00", "system\x1b[2J")), {},
     Unsafe, r"refusing to load the global 'os\x00.system\x1b[2J'"),
    ("global_getattr_py2_name", _checkpoint(forge.Global("__builtin__", "getattr")), {},
     Unsafe, "refusing to load the global builtins.getattr"),
    ("reduce_wrong_arity", _checkpoint(forge.Call(REBUILD, (1, 2))), {},
     CheckpointError, "calls torch._utils._rebuild_tensor_v2 with 2 arguments; it takes 4 to 7"),
    ("tensor_from_a_list", _checkpoint(forge.tensor([1.0, 2.0], 0, (2,), (1,))), {},
     CheckpointError, "rebuilds a tensor from [1.0, 2.0], not from a storage record"),
    ("call_storage_type", _checkpoint(forge.Call(_storage_type(), (10**9,))), {},
     Unsafe, "refusing to call torch.FloatStorage"),
    ("call_numpy_ndarray", _checkpoint(forge.Call(forge.Global("numpy", "ndarray"), ((10**9,),))), {},
     Unsafe, "refusing to call numpy.ndarray"),
    ("bytearray_of_an_int", _checkpoint(forge.Call(forge.Global("builtins", "bytearray"), (10**10,))), {},
     CheckpointError, "calls bytearray with (10000000000,)"),
    ("codec_not_text", _checkpoint(forge.Call(forge.Global("_codecs", "encode"), ("x", "punycode"))), {},
     CheckpointError, "calls _codecs.encode with ('x', 'punycode')"),
    ("numpy_object_array", _checkpoint(_numpy_object_array()), {}, CheckpointError, "of dtype dtype('O') in"),
    ("pickle_extension_registry", _checkpoint(forge.Raw(pickle.EXT1 + b"\x01")), {},
     Unsafe, "extension registry (EXT opcodes)"),
    ("bytearray8_declares_a_terabyte", _checkpoint(forge.Raw(pickle.BYTEARRAY8 + (2**40).to_bytes(8, "little"))),
     {}, CheckpointError, "declares a bytearray of 1,099,511,627,776 bytes and holds 1"),
    ("reused_tuple_key", _checkpoint(_reused_tuple_key(100_000, 1100)), {},
     CheckpointError, "hashes large tuples or ints as dict keys or set items over and over"),
    ("nested_memo_tuple_key", _checkpoint(_nested_memo_tuple_key()), {},
     CheckpointError, "hashes large tuples or ints as dict keys or set items over and over, 1,002,00"),
    ("tuples_nested_too_deep", _checkpoint({forge.Raw(pickle.EMPTY_TUPLE + pickle.TUPLE1 * 1000): 1}), {},
     CheckpointError, "nests tuples more than 100 deep"),
    # Persistent ids that are not torch storages.
    ("persistent_id_string", _checkpoint(forge.PersistentId("hello")), {},
     CheckpointError, "unexpected persistent id 'hello' in data.pkl"),
    ("persistent_id_not_a_storage_type",
     _checkpoint(forge.PersistentId(("storage", ORDERED_DICT, "0", "cpu", 2))), {"max_records": 10},
     CheckpointError, "unexpected persistent id ('storage', <checkpoint global collections.OrderedDict>"),
    ("storage_read_as_two_dtypes",
     _checkpoint([forge.storage("FloatStorage", "0", 2), forge.storage("IntStorage", "0", 2)], {"0": F32}), {},
     CheckpointError, "reads storage 0 as 2 elements of int32, and elsewhere as 2 elements of float32"),
    # Not a checkpoint at all, or a damaged one.
    ("truncated_zip", _truncated_genuine, {}, CheckpointError, "not a torch zip checkpoint: it starts like a zip"),
    ("not_a_zip", _file(b"hello, this is text\n" * 10), {}, CheckpointError, "was this one written by another"),
    ("empty_file", _file(b""), {}, CheckpointError, "not a torch zip checkpoint: the file is empty"),
    ("no_data_pkl", _no_data_pkl, {}, CheckpointError, "expected one <dir>/data.pkl in the zip, found none"),
    ("bad_byteorder", _checkpoint(_float_tensor(), {"0": F32}, byteorder="middle"), {},
     CheckpointError, "byteorder does not say 'little' or 'big'"),
    ("truncated_pickle", _checkpoint(forge.Raw(pickle.MARK)), {}, CheckpointError, "cannot unpickle data.pkl"),
]


@pytest.mark.parametrize("build,limits,error,fragment", [case[1:] for case in CATALOGUE],
                         ids=[case[0] for case in CATALOGUE])
def test_bad_checkpoint_is_refused(tmp_path, build, limits, error, fragment):
  path = build(tmp_path)
  start = time.perf_counter()
  with pytest.raises(error) as raised:
    torch_import.read_checkpoint(path, **limits)
  assert fragment in str(raised.value)
  assert str(path) in str(raised.value), "the message must name the file"
  # Refused before any bomb is inflated: inflating one takes minutes or exhausts memory, so a bound of 30 s holds on a
  # loaded or emulated machine and still tells the two apart.
  assert time.perf_counter() - start < 30


def _allowlist_snapshot():
  """The shared allowlist, by identity and by value (a dtype compared with its byte order and size)."""
  return {key: (id(value), value.str if isinstance(value, np.dtype) else value)
          for key, value in torch_import._SAFE_GLOBALS.items()}  # pylint: disable=protected-access


NUMPY_DTYPE = forge.Global("numpy", "dtype")
INT8 = forge.Call(NUMPY_DTYPE, ("i1",))
BUILD_ATTACKS = {
    "storage_type_dtype": forge.Build(_storage_type(), {"dtype": INT8}),
    "storage_type_slot_dtype": forge.Build(_storage_type(), (None, {"dtype": INT8})),
    "storage_type_class": forge.Build(_storage_type(), (None, {"__class__": ORDERED_DICT})),
    "rebuild_tensor_defaults": forge.Build(REBUILD, (None, {"__defaults__": (0, 0, 0)})),
    "codecs_encode_defaults": forge.Build(forge.Global("_codecs", "encode"), (None, {"__defaults__": ("utf-16",)})),
    "ordered_dict_class_dict": forge.Build(ORDERED_DICT, {"fromkeys": INT8}),
    # A numpy.dtype the file BUILDs is a copy of its own, even where numpy would hand out its shared float32.
    "numpy_float32_byteorder": forge.Build(forge.Call(NUMPY_DTYPE, ("f4",)), (3, ">", None, None, None, -1, -1, 0)),
    # The same object twice in one file: the first BUILD is allowed (a fresh array), the second is refused.
    "numpy_array_twice": forge.Build(forge.numpy_array(np.zeros(2, np.float32)), (1, (2,), INT8, False, b"ab")),
}


@pytest.mark.parametrize("attack", list(BUILD_ATTACKS.values()), ids=list(BUILD_ATTACKS))
def test_build_attack_does_not_change_later_loads(tmp_path, attack):
  before = _allowlist_snapshot()
  evil = forge.write_checkpoint(tmp_path / "evil.pth", {"x": attack, "w": _float_tensor()["w"]}, {"0": F32})
  try:
    torch_import.read_checkpoint(evil)
  except torch_import.CheckpointError as e:
    assert str(evil) in str(e)
  genuine = torch_import.read_checkpoint(forge.write_genuine(tmp_path / "genuine.pth"))
  assert genuine["w"].dtype == np.float32
  np.testing.assert_array_equal(genuine["w"], forge.GENUINE_VALUES)
  assert _allowlist_snapshot() == before
  assert np.dtype(np.float32).str == "<f4" and np.dtype(np.int8).str == "|i1"


def test_each_load_gets_its_own_stand_ins(tmp_path):
  # The file returns the object find_class gave it: another load must not get the same one.
  path = forge.write_checkpoint(tmp_path / "global.pth", [_storage_type(), REBUILD, _storage_type()])
  first, second = torch_import.read_checkpoint(path), torch_import.read_checkpoint(path)
  assert all(a is not b for a, b in zip(first, second))
  assert first[0] is not first[2]


def test_hostile_pickles_that_load_stay_small(tmp_path):
  # A memo index of 2**31 - 1 made the C unpickler allocate 16 GB; the pure-Python one keeps a dict.
  memo_bomb = forge.Raw(pickle.NONE + pickle.LONG_BINPUT + (2**31 - 1).to_bytes(4, "little"))
  path = forge.write_checkpoint(tmp_path / "memo.pth", memo_bomb)
  start = time.perf_counter()
  assert torch_import.read_checkpoint(path) is None
  assert time.perf_counter() - start < 10  # a 2^31-entry memo would take minutes and gigabytes


def test_genuine_features_load(tmp_path):
  for byteorder in ("little", "big"):
    entries, expected = forge.sample_checkpoint(byteorder)
    forge.assert_same(torch_import.read_checkpoint(forge.write_zip(tmp_path / f"{byteorder}.pth", entries)),
                      expected)


def test_limits_can_be_raised_for_a_trusted_large_checkpoint(tmp_path, monkeypatch):
  values = np.arange(2**18, dtype=np.float32)  # 1 MiB
  path = forge.write_checkpoint(tmp_path / "large.pth", _float_tensor(numel=values.size, size=values.shape),
                                {"0": values.tobytes()})
  for limits, message in [({"max_bytes": 2**19}, "pass a larger max_bytes= to read_checkpoint"),
                          ({"max_tensor_elements": 2**17}, "over max_tensor_elements=131,072"),
                          ({"max_pickle_bytes": 100}, "over max_pickle_bytes=100"),
                          ({"max_records": 3}, "over max_records=3")]:
    with pytest.raises(Limit, match=message):
      torch_import.read_checkpoint(path, **limits)
  raised = {"max_bytes": 2**21, "max_tensor_elements": 2**18, "max_pickle_bytes": 2**10, "max_records": 4}
  np.testing.assert_array_equal(torch_import.read_checkpoint(path, **raised)["w"], values)
  # The module defaults are read at each call; a keyword overrides them.
  monkeypatch.setattr(torch_import, "MAX_CHECKPOINT_BYTES", 2**19)
  with pytest.raises(Limit, match=r"default torch_import.MAX_CHECKPOINT_BYTES"):
    torch_import.read_checkpoint(path)
  np.testing.assert_array_equal(torch_import.read_checkpoint(path, max_bytes=2**20)["w"], values)
  with pytest.raises(ValueError, match="max_bytes must be an int >= 0"):
    torch_import.read_checkpoint(path, max_bytes=-1)


def test_load_encoder_weights_passes_the_limits_on():
  with pytest.raises(Limit, match="the zip holds 652 records, over max_records=10"):
    torch_import.load_encoder_weights({}, FIXTURE, max_records=10)
  with pytest.raises(TypeError):
    torch_import.load_encoder_weights({}, FIXTURE, max_megabytes=10)
