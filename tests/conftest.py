"""Shared test fixtures, and the environment every test runs in.

Real data lives in a `shared/` folder beside the checkout (or wherever URISC_SHARED points). Tests that need it ask
for the `shared_dir` fixture and skip, with the reason, when it is absent, so a fresh clone still tests cleanly.

The tests are CPU tests whatever the machine has: JAX runs on the CPU unless JAX_PLATFORMS says otherwise (on a GPU
the "auto" compute dtype would be bfloat16 and the float32 tolerances would not apply), in float32 (a user's
JAX_ENABLE_X64 is dropped), and with the tests' own compilation cache (a user's JAX_COMPILATION_CACHE_DIR would
take precedence over URISC_JAX_CACHE). Every compiled program is cached whatever it took to compile: JAX's default
keeps only programs that took a second or more, which on a fast machine leaves the cache empty and on a loaded one
makes what is cached depend on the load. XLA_FLAGS is kept: that is how the numerics tests are run as an older CPU
(`XLA_FLAGS=--xla_cpu_max_isa=AVX2 python -m pytest -m numerics`). The project's XLA:CPU options are added to them
(`urisc_jax.configure_xla_cpu`), before any test starts JAX's backend, so the tests compute as `python -m
urisc_jax.main` does, and the processes they start inherit them.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _variable in ("JAX_ENABLE_X64", "JAX_COMPILATION_CACHE_DIR"):
  os.environ.pop(_variable, None)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import pytest  # pylint: disable=wrong-import-position

from urisc_jax import xla_flags  # pylint: disable=wrong-import-position

xla_flags.apply()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _shared_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("URISC_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  path = _shared_dir()
  if not (path / "data").is_dir():
    pytest.skip(f"real data folder {path / 'data'} is absent (set URISC_SHARED to the folder that holds data/)")
  return path


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory) -> pathlib.Path:
  """One persistent compilation cache for the runs the tests start (`python -m urisc_jax.main` in subprocesses reads
  URISC_JAX_CACHE), instead of the user's ~/.cache: runs of the same program share their compiled steps."""
  folder = tmp_path_factory.mktemp("compilation_cache")
  previous = os.environ.get("URISC_JAX_CACHE")
  os.environ["URISC_JAX_CACHE"] = str(folder)
  yield folder
  if previous is None:
    os.environ.pop("URISC_JAX_CACHE", None)
  else:
    os.environ["URISC_JAX_CACHE"] = previous
