"""Shared test fixtures.

Real data lives in a `shared/` folder beside the checkout (or wherever URISC_SHARED points). Tests that need it ask
for the `shared_dir` fixture and skip, with the reason, when it is absent, so a fresh clone still tests cleanly.
"""

import os
import pathlib

import pytest

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
