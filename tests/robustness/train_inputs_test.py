"""Training inputs that used to fail late: refused by the config check (exit 2, one line naming the keys) before
any data is prepared or any step trained, or made to work; and a resume from a damaged newest checkpoint that then
runs to its end."""

import gc
import os
import pathlib
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from configs import tiny
from urisc_jax import checkpoint, config_checks, platforms

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


# ------------------------------------------------------------------------------ resuming from a damaged checkpoint

def _tree(value: float, leaves: int = 8):
  """A state of `leaves` small arrays (a U-Net's state has hundreds)."""
  return {f"layer{i:03d}": jnp.full((16, 32), value + i, jnp.float32) for i in range(leaves)}


def test_the_best_checkpoint_accepts_a_resumed_run_replaying_the_steps_it_holds(tmp_path):
  best = checkpoint.BestCheckpoint(tmp_path / "best")
  assert best.offer(4, _tree(4.0), 0.5)  # the first run validated step 4 ...
  best.close()
  resumed = checkpoint.BestCheckpoint(tmp_path / "best")  # ... the run resumed from step 2 replays it
  assert resumed.best_step == 4 and resumed.best_score == 0.5
  assert not resumed.offer(2, _tree(2.0), 0.4)
  assert resumed.offer(4, _tree(40.0), 0.6)  # raised StepAlreadyExistsError: "Checkpoint for step 4 already exists"
  resumed.close()
  assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["4"]  # the old entry is gone, nothing aside
  reopened = checkpoint.Checkpointer(tmp_path / "best", create=False)
  _, _, meta = reopened.restore(4, _tree(0.0))
  reopened.close()
  assert meta["val_f1"] == 0.6


def test_a_better_score_at_an_earlier_step_replaces_a_later_entry(tmp_path):
  best = checkpoint.BestCheckpoint(tmp_path / "best")
  best.offer(4, _tree(4.0), 0.5)
  assert best.offer(3, _tree(3.0), 0.7)  # orbax alone would prune step 3 and keep step 4
  best.close()
  assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["3"]
  assert checkpoint.BestCheckpoint(tmp_path / "best").best_score == 0.7


def test_probing_a_truncated_step_leaves_no_read_in_flight(tmp_path):
  """orbax read every array (for a restore, and each array's header for its metadata) in an event loop it closed at
  the first failed read; the reads still in flight then failed into the closed loop, each printed as an unraisable
  "RuntimeError: Event loop is closed" traceback."""
  folder = tmp_path / "checkpoints"
  saver = checkpoint.Checkpointer(folder, max_to_keep=3)
  for step in (2, 4):
    saver.save(step, _tree(float(step), leaves=300), data={"next": step}, meta={"step": step})
  saver.close()
  for path in (folder / "4" / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":  # the array data files
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  unraisable = []
  hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
  try:
    for _ in range(3):  # the count varied run to run (0 to a few hundred), so probe a few times
      reader = checkpoint.Checkpointer(folder, max_to_keep=3)
      restored = reader.restore_latest(_tree(0.0, leaves=300))
      reader.close()
      assert restored.step == 2 and list(restored.skipped) == [4]
      assert "cannot be read" in restored.skipped[4]
    time.sleep(1.0)  # late completions of any read left in flight
    gc.collect()
  finally:
    sys.unraisablehook = hook
  assert [str(u.exc_value) for u in unraisable] == []
