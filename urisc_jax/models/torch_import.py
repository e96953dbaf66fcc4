"""Reads PyTorch checkpoints without torch and without running pickled code, and maps them onto the Flax models.

A `.pth` / `.pth.tar` file written by `torch.save` (torch >= 1.6) is a zip: `<dir>/data.pkl` pickles the object
and every tensor's storage is a raw little-endian record `<dir>/data/<key>`. Unpickling an untrusted file can run
any Python function it names, so `read_checkpoint` uses an Unpickler whose `find_class` knows only what rebuilds
tensors (torch._utils._rebuild_tensor_v2, the torch storage types, collections.OrderedDict, a few builtins and
numpy array/scalar reconstruction); any other global is refused with `UnsafeCheckpointError` naming it, before
anything is called. This is torch's own `weights_only=True` rule, re-implemented with numpy.

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
import pickle
import re
import zipfile
from typing import Any, Callable, Mapping, Sequence

import flax.traverse_util
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from urisc_jax.models import InputNormalization


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
  """A checkpoint whose pickle names a global outside the tensor-rebuilding allowlist."""


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


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands for `torch.FloatStorage` & co. inside the pickle: only its dtype matters."""
  dtype: Any


def _rebuild_tensor(storage: np.ndarray, offset: int, size: Sequence[int], stride: Sequence[int],
                    *unused) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2 with numpy: a (copied) strided view of the flat storage."""
  del unused  # requires_grad, backward_hooks, metadata
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
    raise CheckpointError(f"corrupt tensor record: size {size}, stride {stride}, offset {offset}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise CheckpointError(f"corrupt tensor record: size {size}, stride {stride}, offset {offset} read past the "
                          f"end of a storage of {storage.size} elements")
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * itemsize for s in stride),
                                         writeable=False)
  return np.array(view)


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
  """torch._utils._rebuild_parameter: a Parameter is its data."""
  del unused
  return data


def _as_tuple(*args):
  return tuple(*args)


# (module, name) -> the object the pickle gets instead. Nothing here runs code chosen by the file.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): _as_tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    # Protocol-2 pickles (torch's default) spell bytes as _codecs.encode(text, 'latin1').
    ("_codecs", "encode"): lambda text, encoding="utf-8": text.encode(encoding),
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
}
for _numpy_core in ("numpy.core.multiarray", "numpy._core.multiarray"):
  _SAFE_GLOBALS[(_numpy_core, "_reconstruct")] = np._core.multiarray._reconstruct  # pylint: disable=protected-access
  _SAFE_GLOBALS[(_numpy_core, "scalar")] = np._core.multiarray.scalar  # pylint: disable=protected-access
for _storage_name, _dtype in _STORAGE_DTYPES.items():
  _SAFE_GLOBALS[("torch", _storage_name)] = _StorageType(np.dtype(_dtype))
  _SAFE_GLOBALS[("torch.storage", _storage_name)] = _StorageType(np.dtype(_dtype))


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a torch zip checkpoint's data.pkl, resolving only allowlisted globals and storage records."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._byteorder = byteorder
    self._path = path
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    # Protocol-2 pickles may use Python 2 names (__builtin__.set); map them as pickle's own find_class does.
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    try:
      return _SAFE_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
          f"{self._path}: refusing to load the global {module}.{name}: only tensors, numbers, strings and plain "
          "containers are read from a checkpoint, since unpickling anything else can run code. If you trust the "
          "file, load it with torch and re-save its state_dict (torch.save(model.state_dict(), path))") from None

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise CheckpointError(f"{self._path}: unexpected persistent id {pid!r} in data.pkl (corrupt file?)")
    _, storage_type, key, _, numel = pid
    key = str(key)
    if key not in self._storages:
      record = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(record)
      except KeyError:
        raise CheckpointError(f"{self._path}: storage record {record} is missing (truncated file?)") from None
      dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
      if len(raw) % dtype.itemsize:
        raise CheckpointError(f"{self._path}: storage record {record} has {len(raw)} bytes, not a multiple of "
                              f"{dtype.itemsize} ({storage_type.dtype})")
      array = np.frombuffer(raw, dtype)
      if storage_type.dtype != np.uint8 and array.size < int(numel):
        raise CheckpointError(f"{self._path}: storage record {record} holds {array.size} elements, the pickle "
                              f"expects {numel} (truncated file?)")
      self._storages[key] = array.astype(storage_type.dtype, copy=False)
    return self._storages[key]


def read_checkpoint(path: str) -> Any:
  """Reads a torch.save zip file into Python objects with numpy arrays in place of tensors.

  Args:
    path: a `.pth`, `.pt` or `.pth.tar` file written by torch >= 1.6.

  Returns:
    The saved object (usually a dict), tensors as numpy arrays (bfloat16 as ml_dtypes.bfloat16).

  Raises:
    FileNotFoundError: no such file.
    UnsafeCheckpointError: the pickle names a global outside the allowlist; nothing it names has run.
    CheckpointError: not a torch zip checkpoint, or a corrupt one.
  """
  path = str(path)
  try:
    archive = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"checkpoint {path} does not exist") from None
  except zipfile.BadZipFile:
    raise CheckpointError(
        f"{path} is not a torch zip checkpoint: files from torch < 1.6 (legacy format) or other pickles are not "
        "read; re-save it with a current torch (torch.save(torch.load(path), new_path))") from None
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise CheckpointError(f"{path}: expected one <dir>/data.pkl in the zip, found {pickles or 'none'}")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
      byteorder = archive.read(f"{prefix}byteorder").decode().strip()
    unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix, byteorder, path)
    try:
      return unpickler.load()
    except CheckpointError:
      raise
    except Exception as e:  # a malformed pickle can fail in many ways; report them as one
      raise CheckpointError(f"{path}: cannot unpickle data.pkl ({type(e).__name__}: {e})") from e


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
                         strict: bool = True) -> tuple[dict[str, Any], LoadInfo]:
  """Loads ResNet weights from a torch checkpoint file into the encoder of a model of this package.

  Args:
    variables: the model's {'params': ..., 'batch_stats': ...} (e.g. from model.init).
    path: torchvision ResNet state dict, CEM500K MoCoV2 `.pth.tar`, or an smp model's state dict.
    encoder_path: module path of the ResNet inside the model.
    strict: raise on any missing, unexpected or mismatched encoder tensor (named in the message).

  Returns:
    (variables with the encoder's params and batch_stats replaced, LoadInfo). `info.normalization` is the
    checkpoint's input normalization when it has one (CEM500K: mean 0.57287, std 0.12741); use it on the inputs.
  """
  checkpoint = read_checkpoint(path)
  state, ignored = encoder_state_dict(checkpoint, str(path))
  variables, info = load_state_dict(variables, state, module_key=encoder_module_key, scope=tuple(encoder_path),
                                    strict=strict, ignored=ignored, source=str(path))
  info.normalization = checkpoint_normalization(checkpoint)
  if isinstance(checkpoint, Mapping):
    info.metadata = {k: v for k, v in checkpoint.items() if isinstance(v, (str, int, float)) and k != "norms"}
  return variables, info
