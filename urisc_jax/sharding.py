"""Device mesh from config, shardings for batches and parameters, host-local -> global arrays.

Data parallelism is `jax.jit` over a `Mesh`: the batch is split along the `data` axis, parameters are replicated, and
XLA inserts the gradient all-reduce. An optional `spatial` axis splits the crop height across devices, so that one
crop too large for a device's memory trains as one (XLA exchanges the rows each convolution needs from its
neighbours). Not every split is computed correctly: see `check_spatial_split`.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def mesh_from_config(mesh_axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh from `(("data", -1), ("spatial", 2))`-style axes; one -1 takes the remaining devices.

  Args:
    mesh_axes: (name, size) pairs; names must be unique, sizes positive or one -1.
    devices: devices to use; defaults to all devices (all hosts).

  Returns:
    A `jax.sharding.Mesh` whose axis sizes multiply to the number of devices.
  """
  # Grouped by process, so that each host's devices hold a contiguous block of the batch.
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id)) if devices is None else list(devices)
  names = tuple(name for name, _ in mesh_axes)
  sizes = [int(size) for _, size in mesh_axes]
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh repeats an axis name: {names}.")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh may use -1 for at most one axis, got {tuple(mesh_axes)}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if known <= 0 or len(devices) % known:
    raise ValueError(
        f"config.mesh {tuple(mesh_axes)} does not divide the {len(devices)} available devices: choose axis sizes "
        "whose product divides the device count (use -1 for one axis to take the rest).")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"config.mesh {tuple(mesh_axes)} uses {int(np.prod(sizes))} of {len(devices)} devices; "
                     "the axis sizes must multiply to the device count.")
  return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_spec(mesh: Mesh) -> P:
  """PartitionSpec of an image batch [N, H, W, C]: N over `data`, H over `spatial` when the mesh has it."""
  return P("data", "spatial" if "spatial" in mesh.axis_names else None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def spans_processes(mesh: Mesh) -> bool:
  """Whether the mesh holds devices of other processes (a multi-host mesh)."""
  return any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def replicate(tree, mesh: Mesh):
  """`tree` (arrays or numpy) placed whole on every device of `mesh`.

  Arrays replicated on another mesh (the training mesh, when validation runs on a prediction mesh) are copied from
  this process's own replica, device to device: `jax.device_put` refuses to move data between hosts, and a
  replicated array needs none moved.
  """
  target = replicated(mesh)
  if not spans_processes(mesh):
    return jax.device_put(local_replica(tree), target)
  local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]

  def put(x):
    local = x.addressable_data(0) if isinstance(x, jax.Array) else np.asarray(x)
    return jax.make_array_from_single_device_arrays(local.shape, target,
                                                     [jax.device_put(local, d) for d in local_devices])

  return jax.tree.map(put, tree)


def local_replica(tree):
  """A pytree of replicated arrays as arrays on this process's first device holding them, for work a process does
  alone (its share of the validation images or attribution targets). Other leaves are left as they are."""

  def local(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x.addressable_data(0)
    return x

  return jax.tree.map(local, tree)


def process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
  """The rows [start, stop) of a global array of `shape` that this process's devices hold under `sharding` (the
  leading axis sharded over devices grouped by process, as `batch_sharding` does)."""
  index_map = sharding.addressable_devices_indices_map(tuple(shape))
  rows = [index[0].indices(shape[0])[:2] for index in index_map.values()]
  return slice(min(start for start, _ in rows), max(stop for _, stop in rows))


def check_spatial_axis_within_hosts(mesh: Mesh) -> None:
  """Raises a ValueError when a crop's rows would be split over devices of different processes.

  Each process loads whole crops for its share of the batch; a `spatial` axis that crossed hosts would need each
  process to load only some rows of crops that other processes load too.
  """
  if "spatial" not in mesh.axis_names:
    return
  processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
  if spatial_groups_cross_processes(processes, mesh.axis_names.index("spatial")):
    raise ValueError(
        f"config.mesh {dict(mesh.shape)} splits a crop's rows over devices of different processes (hosts): the "
        f"'spatial' axis of {spatial_size(mesh)} devices must fit in one host's {jax.local_device_count()} devices. "
        "Use a smaller spatial axis, or none, e.g. --config.mesh='((\"data\", -1),)'.")


def spatial_groups_cross_processes(process_grid: np.ndarray, spatial_axis: int) -> bool:
  """Whether any line of `process_grid` (each device's process index, laid out as the mesh) along `spatial_axis`
  holds more than one process."""
  lines = np.moveaxis(process_grid, spatial_axis, -1).reshape(-1, process_grid.shape[spatial_axis])
  return bool((lines != lines[:, :1]).any())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"]


def spatial_size(mesh: Mesh) -> int:
  """Devices that share one crop's rows: the `spatial` axis's size, 1 without one."""
  return mesh.shape["spatial"] if "spatial" in mesh.axis_names else 1


def check_spatial_split(mesh: Mesh, crop_size: int, stride: int = 32, window: int = 3) -> None:
  """Raises a ValueError unless the crop's height splits over the `spatial` axis into a step that is computed right.

  JAX's partitioner (Shardy, jax 0.10) miscompiles a convolution whose height is split over devices when that height
  is smaller than the convolution's window: it splits the kernel's rows instead and then sums the partial results
  over the `data` devices as well. Measured in float64 on 8 devices (U-Net-ResNet18, batch 8), the gradients of a
  64 x 64 crop (deepest map 2 x 2, under the 3 x 3 window) are 36 % off on mesh (data 4, spatial 2) and 24 % off on
  (2, 4); a 128 x 128 crop on (1, 8) (4 rows over 8 devices) is 26 % off. Splits that keep the deepest map at least
  `window` rows tall, in equal whole shares per device (128 on (4, 2) and (2, 4), 192 on (4, 2), 256 on (1, 8) and
  (2, 4)), match the single-device step to rounding. Only such splits pass; unequal shares are refused too (96 on
  (4, 2) was right, 128 on (1, 8) was not, and padded rows waste the devices' memory anyway).

  Args:
    mesh: the training mesh (a `Mesh` or `AbstractMesh`).
    crop_size: the training crop's height (config.data.crop_size).
    stride: the model's total downsampling: its deepest feature map is crop_size / stride rows tall (32 for the
      ResNet U-Net and LinkNet).
    window: the tallest convolution window applied at that depth (3 for 3 x 3 convolutions).
  """
  spatial = spatial_size(mesh)
  deepest_rows = crop_size // stride
  if spatial == 1 or (crop_size % (stride * spatial) == 0 and deepest_rows >= window):
    return
  smallest_crop = stride * spatial * -(-window // spatial)
  if deepest_rows < window:
    other_mesh = "no spatial axis (or ('spatial', 1)): a crop this small cannot be split"
  else:
    fitting = [str(s) for s in range(2, mesh.size + 1) if mesh.size % s == 0 and deepest_rows % s == 0]
    other_mesh = (f"a spatial axis of {' or '.join(fitting)} devices, or none" if fitting
                  else "no spatial axis (or ('spatial', 1))")
  raise ValueError(
      f"config.data.crop_size={crop_size} cannot be split over the {spatial} devices of config.mesh's spatial axis "
      f"(mesh {dict(mesh.shape)}): the model's deepest feature map, crop_size / {stride} = {crop_size / stride:g} "
      f"rows, needs at least {window} rows and a multiple of {spatial}, or XLA's partitioner may compute wrong "
      f"gradients. Use a config.data.crop_size that is a multiple of {stride * spatial} and at least "
      f"{stride * window} (e.g. {smallest_crop}), or set config.mesh to {other_mesh}.")


def global_batch_from_local(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each host's slice of the global batch into global arrays sharded by `batch_sharding`.

  Args:
    mesh: the training mesh.
    local_batch: arrays [N / process_count, H, W, C] loaded by this host.

  Returns:
    Global jax.Arrays of leading size N.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
