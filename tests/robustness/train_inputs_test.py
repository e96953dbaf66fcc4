"""Training inputs that used to fail late: refused by the config check (exit 2, one line naming the keys) before
any data is prepared or any step trained, or made to work; and a resume from a damaged newest checkpoint that then
runs to its end."""

import os
import pathlib
import subprocess
import sys

import pytest

from configs import tiny
from urisc_jax import config_checks, platforms

REPO = pathlib.Path(__file__).resolve().parents[2]


def _volumes_config(**splits):
  """The tiny config training from volumes; `splits` maps a split to (image, label) texts (never opened here)."""
  config = tiny.get_config()
  config.data.source = "tensorstore"
  for split, (image, label) in splits.items():
    config.data.tensorstore[split].image, config.data.tensorstore[split].label = image, label
  return config


def _refusal(config, mode="train") -> str:
  with pytest.raises(config_checks.ConfigError) as raised:
    config_checks.validate(config, mode)
  return str(raised.value)


# ----------------------------------------------------------------------------------------------- no test images

def test_training_from_volumes_without_a_test_volume_is_refused_at_the_config_check(tmp_path):
  message = _refusal(_volumes_config(train=("train.zarr", "train_labels.zarr"), val=("val.zarr", "val_labels.zarr")))
  assert "config.data.tensorstore.test.image is empty" in message and ".label" in message


def test_training_from_volumes_without_test_labels_is_refused(tmp_path):
  message = _refusal(_volumes_config(train=("train.zarr", "train_labels.zarr"), test=("test.zarr", "")))
  assert "config.data.tensorstore.test.label=''" in message and "scored" in message


def test_an_empty_test_split_is_refused_for_every_source():
  config = tiny.get_config()
  config.data.test_split = ""
  assert "the test split names no images (config.data.test_split='')" in _refusal(config)
  config.data.source = "folders"
  config.data.test_split = "test"
  config.data.folders.train_images = "train_images"
  assert "config.data.folders.test_images=''" in _refusal(config)


def test_a_synthetic_release_without_test_images_is_refused_and_one_without_validation_images_passes():
  config = tiny.get_config()
  config.data.synthetic.num_test = 0
  assert "config.data.synthetic.num_test=0: must be an integer >= 1" in _refusal(config)
  config_checks.validate(config, "prepare")  # generating data alone needs no test image
  config.data.synthetic.num_test, config.data.synthetic.num_val = 1, 0
  config_checks.validate(config, "train")  # no validation: threshold 0.5, as documented


def test_the_command_line_refuses_volumes_without_a_test_split_before_writing_anything(tmp_path):
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "urisc_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
             "--config.data.source=tensorstore", f"--config.data.tensorstore.train.image={tmp_path / 'train.zarr'}",
             f"--config.data.tensorstore.train.label={tmp_path / 'labels.zarr'}", "--config.compilation_cache="]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "config.data.tensorstore.test.image is empty" in result.stderr and "Traceback" not in result.stderr
  assert not workdir.exists()


# ------------------------------------------------------------------------------------------ splits and labels

def test_one_volume_named_in_two_splits_is_refused_naming_both_keys(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = _volumes_config(train=("a.zarr", "a_labels.zarr"), val=(f"file://{tmp_path}/a.zarr", "v_labels.zarr"),
                           test=("t.zarr", "t_labels.zarr"))
  message = _refusal(config)
  assert "config.data.tensorstore.train.image='a.zarr'" in message
  assert f"config.data.tensorstore.val.image='file://{tmp_path}/a.zarr'" in message
  assert f"both select the volume {tmp_path / 'a.zarr'}" in message


def test_training_volumes_without_labels_are_refused_naming_the_key():
  message = _refusal(_volumes_config(train=("train.zarr", ""), test=("test.zarr", "test_labels.zarr")))
  assert "config.data.tensorstore.train.label='': must be the label volume of config.data.tensorstore.train.image" \
      in message


def test_a_complete_volume_config_passes_and_criteria_needs_no_labels():
  config = _volumes_config(train=("train.zarr", "train_labels.zarr"), val=("val.zarr", "val_labels.zarr"),
                           test=("test.zarr", "test_labels.zarr"))
  config_checks.validate(config, "train")
  config_checks.validate(_volumes_config(train=("train.zarr", ""), test=("test.zarr", "")), "criteria")


# ------------------------------------------------------------------------------------------- compilation cache

def test_a_cache_folder_below_a_file_is_an_input_error_naming_the_key(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(config_checks.ConfigError, match=r"config.compilation_cache: cannot create .*--config.compilati"
                                                      r"on_cache=/tmp/urisc_jax_cache, or '' to turn the cache off"):
    platforms.enable_compilation_cache(str(blocker / "cache"))
  assert blocker.read_text() == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_existing_read_only_cache_folder_is_an_input_error(tmp_path):
  folder = tmp_path / "cache"
  folder.mkdir()
  folder.chmod(0o500)
  try:
    with pytest.raises(config_checks.ConfigError, match="is not writable"):
      platforms.enable_compilation_cache(str(folder))
  finally:
    folder.chmod(0o700)
