"""The persistent compilation cache: a second process that compiles the same train step loads it from the cache
folder instead of compiling it again, and the folder is the user's to move or turn off."""

import json
import pathlib
import subprocess
import sys

import pytest

from urisc_jax import platforms

REPO = pathlib.Path(__file__).resolve().parents[1]

# Compiles the tiny config's train step as --mode=train does, and reports what the cache did.
_COMPILE_TRAIN_STEP = """
import json, sys
import jax
from urisc_jax import losses, models, optim, platforms, sharding, state, train
from configs import tiny

events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
folder = platforms.enable_compilation_cache(sys.argv[1])
config = tiny.get_config()
model = state.build_model(config.model)
tx = optim.optimizer_from_config(config.optim, config.train.num_steps)
mesh = sharding.mesh_from_config(config.mesh)
rng = jax.random.key(0)
train_state, shardings = state.create_state(model, tx, mesh, rng, config.data.crop_size)
step = train.make_train_step(model, tx, losses.from_config(config.loss), mean=0.5, std=0.25)
_, seconds = train.compile_train_step(step, train_state, shardings, mesh, config.train.batch_size,
                                      config.data.crop_size, rng)
print(json.dumps({"folder": str(folder), "seconds": seconds,
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _compile_in_a_new_process(setting: str) -> dict:
  result = subprocess.run([sys.executable, "-c", _COMPILE_TRAIN_STEP, setting], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_train_step_from_the_cache(tmp_path):
  cold = _compile_in_a_new_process(str(tmp_path / "cache"))
  assert cold["folder"] == str(tmp_path / "cache")
  assert cold["hits"] == 0 and cold["misses"] >= 1
  assert any((tmp_path / "cache").iterdir())
  warm = _compile_in_a_new_process(str(tmp_path / "cache"))
  assert warm["hits"] >= 1 and warm["misses"] == 0, (cold, warm)
  print(f"train step compile: cold {cold['seconds']:.2f} s, warm {warm['seconds']:.2f} s")


def test_the_cache_can_be_turned_off():
  code = ("import jax; from urisc_jax import platforms; print(platforms.enable_compilation_cache(''), "
          "jax.config.jax_enable_compilation_cache)")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=True)
  assert result.stdout.split() == ["None", "False"]


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(platforms.CACHE_ENV, str(tmp_path / "moved"))
  assert platforms.default_cache_dir() == tmp_path / "moved"
  monkeypatch.delenv(platforms.CACHE_ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert platforms.default_cache_dir() == tmp_path / "xdg" / "urisc_jax" / "jax"


def test_an_unwritable_cache_folder_names_the_key_and_the_fix(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ValueError, match=r"config.compilation_cache: cannot create the cache folder .*a_file/cache"):
    platforms.enable_compilation_cache(str(blocker / "cache"))


def test_the_default_config_keeps_a_cache():
  from configs import default  # pylint: disable=g-import-not-at-top
  assert default.get_config().compilation_cache == "default"
