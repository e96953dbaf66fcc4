"""The XLA:CPU flags the package sets before JAX starts."""

import os
import subprocess
import sys

import pytest

from urisc_jax import xla_flags


def test_eigen_convolutions_added_to_the_users_flags():
  flags = xla_flags.with_eigen_convolutions("--xla_force_host_platform_device_count=8", "0.10.2")
  assert flags == "--xla_force_host_platform_device_count=8 " + xla_flags.EIGEN_CONVOLUTIONS
  assert xla_flags.with_eigen_convolutions("", "0.10.2") == xla_flags.EIGEN_CONVOLUTIONS


def test_a_users_own_choice_and_unknown_jaxlib_series_are_left_alone():
  chosen = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
  assert xla_flags.with_eigen_convolutions(chosen, "0.10.2") == chosen
  # Another jaxlib series may not know the flag, and XLA stops on flags it does not know.
  assert xla_flags.with_eigen_convolutions("", "0.11.0") == ""


def test_importing_the_package_sets_the_flag_that_the_cpu_backend_accepts():
  code = ("import os, urisc_jax, jax, jax.numpy as jnp; "
          "y = jax.lax.conv_general_dilated(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), (1, 1), 'SAME', "
          "dimension_numbers=('NHWC', 'HWIO', 'NHWC')); "
          "print(os.environ['XLA_FLAGS']); print(float(y.sum()))")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
  flags, total = out.splitlines()
  assert xla_flags.EIGEN_CONVOLUTIONS in flags
  assert float(total) == 100.0  # 4 corners x 4 + 8 edges x 6 + 4 inner x 9


@pytest.mark.parametrize("flags,expected", [
    ("", False),
    (xla_flags.EIGEN_CONVOLUTIONS, True),
    (f"--xla_force_host_platform_device_count=8 {xla_flags.EIGEN_CONVOLUTIONS}", True),
    (f"{xla_flags.YNN_FLAG}=-dot,-individual_convolution", True),
    (f"{xla_flags.YNN_FLAG}=+individual_convolution", False),
    (f"{xla_flags.EIGEN_CONVOLUTIONS} {xla_flags.YNN_FLAG}=+individual_convolution", False),  # the last one counts
])
def test_eigen_convolutions_reads_the_flag(flags, expected):
  assert xla_flags.eigen_convolutions(flags) is expected
