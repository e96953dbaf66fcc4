"""The public API: every exported name resolves and is documented; importing the package is cheap and changes nothing."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import urisc_jax

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Libraries that `import urisc_jax` must not load: JAX itself and the data, logging, checkpoint and volume stacks.
HEAVY = ("jax", "flax", "optax", "grain", "tensorboardX", "cv2", "tensorstore", "dask", "distributed", "orbax", "torch")


def _python(code: str, cwd, env=None) -> str:
  environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
  environ["PYTHONPATH"] = str(REPO_ROOT)
  environ.update(env or {})
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environ, capture_output=True, text=True,
                        check=True).stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("name", urisc_jax.__all__)
def test_every_exported_name_resolves(name):
  value = getattr(urisc_jax, name)
  assert value is not None
  if name != "__version__":
    assert value.__doc__, f"urisc_jax.{name} has no docstring"


def test_exports_are_listed_in_dir_and_unknown_names_raise():
  assert set(urisc_jax.__all__) <= set(dir(urisc_jax))
  with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
    urisc_jax.nonexistent  # pylint: disable=pointless-statement


def test_the_api_page_lists_every_exported_name_once():
  page = (REPO_ROOT / "docs" / "api.md").read_text()
  listed = re.findall(r"^\| `([A-Za-z_0-9]+)`", page, flags=re.MULTILINE)
  assert sorted(listed) == sorted(urisc_jax.__all__)


def test_the_names_reach_the_package_functions():
  from urisc_jax import losses, models, train  # pylint: disable=g-import-not-at-top
  assert urisc_jax.build_model is models.build and urisc_jax.register_model is models.register
  assert urisc_jax.focal_dice is losses.focal_dice and urisc_jax.loss_from_config is losses.from_config
  assert urisc_jax.make_train_step is train.make_train_step


@pytest.mark.parametrize("xla_flags", [None, "--xla_force_host_platform_device_count=2"])
def test_importing_the_package_from_elsewhere_loads_nothing_heavy_and_keeps_xla_flags(tmp_path, xla_flags):
  code = ("import json, os, sys, urisc_jax; "
          f"print(json.dumps([os.environ.get('XLA_FLAGS'), sorted({{m.split('.')[0] for m in sys.modules}} & "
          f"set({HEAVY!r})), urisc_jax.__file__]))")
  flags, loaded, location = json.loads(_python(code, tmp_path, {} if xla_flags is None else {"XLA_FLAGS": xla_flags}))
  assert flags == xla_flags
  assert loaded == []
  assert pathlib.Path(location).parent == REPO_ROOT / "urisc_jax"


def test_the_functional_names_load_no_data_or_logging_stack(tmp_path):
  code = ("import json, sys, urisc_jax; "
          "[getattr(urisc_jax, n) for n in ('build_model', 'init_variables', 'focal_dice', 'TrainState', "
          "'optimizer_from_config', 'official_f1', 'integrated_gradients', 'predict_logits')]; "
          "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
          "{'grain', 'tensorboardX', 'cv2', 'tensorstore', 'dask', 'distributed', 'orbax', 'torch'})))")
  assert json.loads(_python(code, tmp_path)) == []
