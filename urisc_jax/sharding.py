"""Device mesh from config, shardings for batches and parameters, host-local -> global arrays.

Data parallelism is `jax.jit` over a `Mesh`: the batch is split along the `data` axis, parameters are replicated, and
XLA inserts the gradient all-reduce. An optional `spatial` axis splits the crop height across devices.
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
  devices = list(jax.devices() if devices is None else devices)
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


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"]


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
