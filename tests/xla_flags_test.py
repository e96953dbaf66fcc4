"""The XLA:CPU flags the entry point (or an explicit call) sets before JAX starts; importing the package sets none."""

import os
import pathlib
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


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_CONVOLUTION = ("import jax, jax.numpy as jnp; "
                "y = jax.lax.conv_general_dilated(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), (1, 1), 'SAME', "
                "dimension_numbers=('NHWC', 'HWIO', 'NHWC')); "
                "print(os.environ.get('XLA_FLAGS')); print(float(y.sum()))")


def _run(code: str, cwd, **env) -> list[str]:
  environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
  environ.update(env)
  return subprocess.run([sys.executable, "-c", code], env=environ, cwd=cwd, capture_output=True, text=True,
                        check=True).stdout.splitlines()


def test_the_main_entry_point_sets_the_flag_that_the_cpu_backend_accepts(tmp_path):
  # `python -m urisc_jax.main` as runpy runs it, stopped by --helpshort before any mode: the flags are in place.
  code = ("import os, runpy, sys; sys.argv = ['urisc_jax.main', '--helpshort']\n"
          "try:\n  runpy.run_module('urisc_jax.main', run_name='__main__')\nexcept SystemExit:\n  pass\n"
          + _CONVOLUTION.replace("; ", "\n"))
  flags, total = _run(code, tmp_path)[-2:]
  assert xla_flags.EIGEN_CONVOLUTIONS in flags
  assert float(total) == 100.0  # 4 corners x 4 + 8 edges x 6 + 4 inner x 9


@pytest.mark.parametrize("before", [None, "--xla_force_host_platform_device_count=2"])
def test_importing_the_package_leaves_xla_flags_as_they_were(tmp_path, before):
  env = {} if before is None else {"XLA_FLAGS": before}
  flags, total = _run("import os, urisc_jax; " + _CONVOLUTION, tmp_path, **env)[-2:]
  assert flags == str(before)
  assert float(total) == 100.0


def test_the_explicit_call_adds_the_flag_and_warns_when_too_late(tmp_path):
  code = ("import os, warnings, urisc_jax; warnings.simplefilter('error'); print(urisc_jax.configure_xla_cpu()); "
          + _CONVOLUTION)
  applied, flags, _ = _run(code, tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=2")[-3:]
  assert applied == flags == "--xla_force_host_platform_device_count=2 " + xla_flags.EIGEN_CONVOLUTIONS
  late = ("import warnings, jax, urisc_jax\njax.devices()\n"
          "with warnings.catch_warnings(record=True) as caught:\n"
          "  warnings.simplefilter('always')\n  urisc_jax.configure_xla_cpu()\n"
          "print(len(caught), caught[0].category.__name__ if caught else '')")
  assert _run(late, tmp_path)[-1] == "1 RuntimeWarning"


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
