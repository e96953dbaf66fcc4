"""Flax variables -> a PyTorch state dict, the inverse of `models.torch_import.load_state_dict`, saved as safetensors.

U-Net and LinkNet over ResNet encoders get segmentation_models_pytorch's names (`encoder.layer1.0.conv1.weight`,
`decoder.blocks.2.conv1.0.weight`, `segmentation_head.0.bias`, ...), so that
`smp.Unet("resnet50", encoder_weights=None, in_channels=1, classes=1).load_state_dict(tensors, strict=True)` takes
them. CASENet and the plain U-Net have no smp counterpart; they keep this project's own layout, the names
`torch_import.smp_module_key` gives (the encoder in torchvision's ResNet names, `encoder.layer4.2.conv3.weight`, the
rest as the Flax module path joined with dots: `sides.side1_conv.weight`, `decoder.block0.up.weight`), which
`torch_import.load_state_dict` reads back.

Conversions (the inverse of the import's): kernel HWIO -> weight OIHW; transposed-convolution kernel
[k, k, Cin/groups, Cout] -> [Cin, Cout/groups, k, k]; BatchNorm scale, bias -> weight, bias and mean, var ->
running_mean, running_var, plus the `num_batches_tracked` counter torch keeps (0). All float32 but the counters
(int64 scalars). Writing needs numpy and safetensors only, no torch.

`save_pth` writes the same tensors in torch.save's zip format (what `torch.load(path, weights_only=True)` and
bioimage.io's PyTorch runner read), also without torch: a stored zip of `<name>/data.pkl` (a protocol-2 pickle of an
OrderedDict whose tensors are `torch._utils._rebuild_tensor_v2` calls on persistent storages), one raw
little-endian record per tensor under `<name>/data/<key>`, and `<name>/version`, `<name>/byteorder`. The pickle names
only the globals torch's weights_only rule allows, and `torch_import.read_checkpoint` reads it back.
"""

import collections
import io
import pathlib
import pickle
import re
import zipfile
from typing import Any, Callable, Mapping, Sequence

import flax.traverse_util
import numpy as np

from urisc_jax import outputs
from urisc_jax.models import torch_import

# Models whose state dict is segmentation_models_pytorch's; the others keep the project's layout.
SMP_MODELS = {"unet": "Unet", "linknet": "Linknet"}
# CASENet's side deconvolutions are grouped per class (torch: groups = out_channels).
_PER_CLASS_GROUPS = (r"sides", r"side\d+", r"deconv")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def layout(model_name: str) -> str:
  """'segmentation_models_pytorch' for U-Net and LinkNet, 'urisc_jax' (the project's own names) otherwise."""
  return "segmentation_models_pytorch" if model_name in SMP_MODELS else "urisc_jax"


def _transposed_groups(module_path: Sequence[str], kernel_shape: tuple[int, ...]) -> int:
  if len(module_path) == len(_PER_CLASS_GROUPS) and all(
      re.fullmatch(p, part) for p, part in zip(_PER_CLASS_GROUPS, module_path)):
    return kernel_shape[-1]
  return 1


def _to_torch(leaf: str, module_path: Sequence[str], value: np.ndarray) -> np.ndarray:
  """One Flax leaf -> the torch tensor `torch_import._convert` turns back into it."""
  if leaf == "kernel" and value.ndim == 4:
    k1, k2, cin_per_group, cout = value.shape
    if module_path and module_path[-1] in ("deconv", "up"):  # ConvTranspose2d
      groups = _transposed_groups(module_path, value.shape)
      grouped = value.reshape(k1, k2, cin_per_group, groups, cout // groups)
      return grouped.transpose(3, 2, 4, 0, 1).reshape(groups * cin_per_group, cout // groups, k1, k2)
    return value.transpose(3, 2, 0, 1)
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def state_dict(variables: Mapping[str, Any], *,
               module_key: Callable[[Sequence[str]], str] = torch_import.smp_module_key) -> dict[str, np.ndarray]:
  """torch key -> contiguous numpy array for every leaf of {'params', 'batch_stats'}.

  Args:
    variables: a model's variables (jax or numpy arrays).
    module_key: Flax module path -> torch module name; the default is the import's (smp names for U-Net and
      LinkNet, the project's for the others).

  Returns:
    An ordered dict in the Flax tree's order, with one `<bn>.num_batches_tracked` int64 scalar per BatchNorm.
  """
  tensors = {}
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(dict(variables.get(collection, {})))
    for path, value in flat.items():
      module_path, leaf = path[:-1], path[-1]
      key = f"{module_key(module_path)}.{_LEAF_NAMES.get(leaf, leaf)}"
      if key in tensors:
        raise ValueError(f"two leaves map to the torch key {key!r} ({'/'.join(path)}); the key mapping is ambiguous")
      tensors[key] = np.asarray(_to_torch(leaf, module_path, np.asarray(value, np.float32)), order="C")
      if collection == "batch_stats" and leaf == "mean":
        tensors[f"{module_key(module_path)}.num_batches_tracked"] = np.zeros((), np.int64)
  return tensors


def save(tensors: Mapping[str, np.ndarray], path: str | pathlib.Path, *, metadata: Mapping[str, str] = ()) -> int:
  """Writes a state dict as .safetensors (atomically); returns its size in bytes.

  Load it with `safetensors.torch.load_file(path)` and `model.load_state_dict(tensors, strict=True)`.
  """
  from safetensors.numpy import save as save_bytes  # pylint: disable=g-import-not-at-top
  data = save_bytes(dict(tensors), metadata=dict(metadata) or None)
  outputs.write_bytes(path, data)
  return len(data)


def load(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """A .safetensors state dict as numpy arrays (for `torch_import.load_state_dict`); no torch needed."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(str(path))


_STORAGE_TYPES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class _Global:
  """A global the pickle names by module and name without importing it (torch need not be installed)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle requires a callable for REDUCE; never called here
    raise TypeError(f"{self.module}.{self.name} is a placeholder for pickling")


class _Storage:

  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, array


class _Tensor:
  """Pickles as torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())."""

  def __init__(self, storage: _Storage):
    self.storage = storage

  def __reduce__(self):
    shape = self.storage.array.shape
    strides = tuple(s // self.storage.array.itemsize for s in self.storage.array.strides)
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, 0, shape, strides, False, collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """The pure-Python pickler, with `_Global` written as a GLOBAL opcode and storages as persistent ids."""
  dispatch = pickle._Pickler.dispatch.copy()  # pylint: disable=protected-access

  def save_torch_global(self, obj: _Global) -> None:
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))

  dispatch[_Global] = save_torch_global

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      kind = _STORAGE_TYPES[obj.array.dtype]
      return ("storage", _Global("torch", kind), obj.key, "cpu", obj.array.size)
    return None


def save_pth(tensors: Mapping[str, np.ndarray], path: str | pathlib.Path, *, archive_name: str = "weights") -> int:
  """Writes a state dict of float32 / int64 arrays in torch.save's zip format, atomically; returns its size.

  `torch.load(path, weights_only=True)` gives an OrderedDict of tensors equal to `tensors`.
  """
  storages = collections.OrderedDict()
  state = collections.OrderedDict()
  for i, (name, array) in enumerate(tensors.items()):
    array = np.asarray(array, order="C")
    if array.dtype not in _STORAGE_TYPES:
      raise ValueError(f"save_pth: {name} has dtype {array.dtype}; only float32 and int64 are written")
    storages[str(i)] = _Storage(str(i), array.astype(array.dtype.newbyteorder("<"), copy=False))
    state[name] = _Tensor(storages[str(i)])
  buffer = io.BytesIO()
  _TorchPickler(buffer, protocol=2).dump(state)
  data = io.BytesIO()
  with zipfile.ZipFile(data, "w", compression=zipfile.ZIP_STORED) as archive:
    archive.writestr(f"{archive_name}/data.pkl", buffer.getvalue())
    archive.writestr(f"{archive_name}/byteorder", "little")
    for key, storage in storages.items():
      archive.writestr(f"{archive_name}/data/{key}", storage.array.tobytes())
    archive.writestr(f"{archive_name}/version", "3\n")
  outputs.write_bytes(path, data.getvalue())
  return len(data.getvalue())
