"""Every config file loads, names its command and cost, and builds its model; ISBI configs run on the real slices."""

import importlib
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from urisc_jax import state, train

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem not in ("__init__", "isbi2012_common", "urisc_common"))


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_config_documents_its_command_and_builds_its_model(name):
  module = importlib.import_module(f"configs.{name}")
  assert f"--config=configs/{name}.py" in module.__doc__
  config = module.get_config()
  model = state.build_model(config.model)
  size = config.data.crop_size
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0],
                       jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32))
  assert out.shape == (1, size, size, 1)


def test_isbi_configs_share_the_papers_split_and_scoring():
  for name in (n for n in RUN_CONFIGS if n.startswith("isbi2012_")):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert (config.data.source, config.data.isbi.train, config.data.isbi.test) == ("isbi", "0-19", "20-29")
    assert config.eval.two_class and config.attribution.pixel_nm == 4.0


def test_urisc_configs_follow_the_paper():
  for name in (n for n in RUN_CONFIGS if n.startswith("urisc_track")):
    config = importlib.import_module(f"configs.{name}").get_config()
    track = "Track1" if name.startswith("urisc_track1") else "Track2"
    assert (config.data.source, config.data.track) == ("urisc", track)
    assert config.data.crop_size == (1024 if track == "Track1" else 512)
    assert config.train.batch_size == 32 and config.optim.name == "adam"
    assert (config.loss.name, config.loss.gamma, config.loss.dice_weight) == ("focal_dice", 2.0, 1.0)
    if track == "Track2":
      assert config.data.label_threshold == 122 and config.data.split.mode == "images"


def test_transfer_config_refuses_to_train_without_its_checkpoint(tmp_path):
  config = importlib.import_module("configs.urisc_track1_unet_transfer").get_config()
  assert (config.model.name, config.model.encoder, config.model.width) == ("unet", "resnet50", 1.0)
  with pytest.raises(ValueError, match="--config.transfer.checkpoint="):
    train.train_and_evaluate(config, tmp_path)


def test_isbi_config_runs_end_to_end_on_real_slices(shared_dir, tmp_path):
  """A narrow stand-in of the ISBI LinkNet config for two steps on two slices, scored on one held-out slice."""
  command = [sys.executable, "-m", "urisc_jax.main", "--config=configs/isbi2012_linknet_r18.py",
             f"--workdir={tmp_path}", f"--config.data.root={shared_dir / 'data' / 'isbi2012'}",
             "--config.model.width=0.125", "--config.train.num_steps=2", "--config.train.batch_size=2",
             "--config.data.crop_size=64", "--config.data.isbi.train=0-1", "--config.data.isbi.test=20"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["num_images"] == {"train": 2, "val": 0, "test": 1} and metrics["threshold"] == 0.5
  for key in ("membrane_f1", "interior_f1", "pixel_error", "v_rand", "v_info"):
    assert 0.0 <= metrics["two_class"][key] <= 1.0, key
  assert "two_class" in json.loads(result.stdout[result.stdout.index("{"):])
