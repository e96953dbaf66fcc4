"""Mesh construction from config and its errors (device-count-independent parts)."""

import jax
import pytest

from urisc_jax import sharding


def test_minus_one_takes_every_device():
  mesh = sharding.mesh_from_config((("data", -1),))
  assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
  assert sharding.data_parallel_size(mesh) == jax.device_count()
  assert sharding.batch_spec(mesh) == jax.sharding.PartitionSpec("data", None)


def test_spatial_axis_shards_the_crop_height():
  mesh = sharding.mesh_from_config((("data", -1), ("spatial", 1)))
  assert sharding.batch_spec(mesh) == jax.sharding.PartitionSpec("data", "spatial")


@pytest.mark.parametrize("axes,message", [
    ((("data", -1), ("data", 1)), "repeats"),
    ((("data", -1), ("spatial", -1)), "at most one"),
    ((("data", 1000),), "divide"),
])
def test_bad_meshes_are_explained(axes, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_from_config(axes)
