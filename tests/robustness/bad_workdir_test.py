"""Damaged checkpoints and bad prediction inputs: restore falls back to the newest readable step and names what it
skipped; folder prediction stops at a bad image (naming it) or skips it into a report; an unwritable output folder
is found before the first image."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from urisc_jax import checkpoint, predict
from urisc_jax.data import imageio

REPO = pathlib.Path(__file__).resolve().parents[2]


def _state(seed):
  rng = np.random.default_rng(seed)
  params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 1, 64)), jnp.float32)}}
  return {"step": jnp.asarray(seed, jnp.int32), "params": params, "opt_state": optax.adam(1e-3).init(params)}


def _saved(folder, steps=(2, 4)) -> checkpoint.Checkpointer:
  ckpt = checkpoint.Checkpointer(folder, max_to_keep=5)
  for step in steps:
    ckpt.save(step, _state(step), data={"next": step}, meta={"step": step})
  ckpt.close()
  return checkpoint.Checkpointer(folder, max_to_keep=5)


def _truncate_arrays(step_dir: pathlib.Path) -> None:
  for path in (step_dir / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 1000:
      with open(path, "r+b") as f:
        f.truncate(100)


DAMAGES = {
    "arrays truncated": _truncate_arrays,
    "state folder deleted": lambda step_dir: shutil.rmtree(step_dir / "state"),
    "meta garbled": lambda step_dir: (step_dir / "meta" / "metadata").write_text("{not json"),
    "_METADATA deleted": lambda step_dir: (step_dir / "state" / "_METADATA").unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_restore_falls_back_to_the_newest_readable_step_and_names_the_skipped_one(tmp_path, damage, caplog):
  ckpt = _saved(tmp_path / "checkpoints")
  DAMAGES[damage](tmp_path / "checkpoints" / "4")
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore_latest(_state(0))
  assert restored.step == 2 and restored.meta == {"step": 2} and list(restored.skipped) == [4]
  np.testing.assert_array_equal(restored.state["params"]["conv"]["kernel"], _state(2)["params"]["conv"]["kernel"])
  assert "checkpoints/4 cannot be read" in caplog.text and "trying the step before it" in caplog.text
  # Set aside (kept for inspection), the step can be written again.
  [moved] = ckpt.set_aside(restored.skipped)
  assert moved.name.startswith("4.unreadable-") and moved.is_dir()
  ckpt.save(4, _state(40))
  ckpt.close()
  assert checkpoint.Checkpointer(tmp_path / "checkpoints").restore_latest(_state(0)).step == 4


def test_when_every_step_is_damaged_each_is_named_and_no_good_data_is_to_be_deleted(tmp_path):
  ckpt = _saved(tmp_path / "checkpoints")
  for step in (2, 4):
    _truncate_arrays(tmp_path / "checkpoints" / str(step))
  with pytest.raises(checkpoint.UnreadableCheckpointsError) as raised:
    ckpt.restore_latest(_state(0))
  message = str(raised.value)
  assert "checkpoints/4 cannot be read" in message and "checkpoints/2 cannot be read" in message
  assert "restore them from a backup, or move the folders named here aside" in message
  assert "See full TensorStore" not in message  # the reason, not a dump


def test_another_model_stops_the_search_instead_of_falling_back(tmp_path):
  ckpt = _saved(tmp_path / "checkpoints")
  wider = _state(0)
  wider["params"]["conv"]["kernel"] = jnp.zeros((3, 3, 1, 32))
  wider["opt_state"] = optax.adam(1e-3).init(wider["params"])
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"checkpoints/4 does not fit .*config\.json"):
    ckpt.restore_latest(wider)
  assert (tmp_path / "checkpoints" / "2").is_dir() and (tmp_path / "checkpoints" / "4").is_dir()


def test_a_damaged_best_checkpoint_is_set_aside_and_replaced(tmp_path, caplog):
  best = checkpoint.BestCheckpoint(tmp_path / "best")
  best.offer(2, _state(2), 0.5)
  best.close()
  (tmp_path / "best" / "2" / "meta" / "metadata").write_text("{not json")
  with caplog.at_level(logging.WARNING):
    reopened = checkpoint.BestCheckpoint(tmp_path / "best")
  assert reopened.best_step is None and "cannot be read" in caplog.text
  assert reopened.offer(4, _state(4), 0.1)
  reopened.close()
  assert [p.name for p in (tmp_path / "best").iterdir() if p.name.isdigit()] == ["4"]


# ------------------------------------------------------------------------------------------- through the program

def _main(workdir, *flags, expect=0):
  command = [sys.executable, "-m", "urisc_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}", *flags]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == expect, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run of 4 steps: checkpoints 2 and 4."""
  workdir = tmp_path_factory.mktemp("trained")
  _main(workdir, "--config.train.num_steps=4", "--config.train.eval_every=0")
  return workdir


def test_training_resumes_from_the_last_readable_step(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  _truncate_arrays(workdir / "checkpoints" / "4")
  result = _main(workdir, "--config.train.num_steps=6", "--config.train.eval_every=0")
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["train"]["resumed_from"] == 2 and metrics["step"] == 6
  assert "checkpoints/4 cannot be read" in result.stderr
  assert [p.name for p in (workdir / "checkpoints").iterdir() if p.name.startswith("4.unreadable-")]
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6]


def _images(folder: pathlib.Path) -> pathlib.Path:
  rng = np.random.default_rng(0)
  for name in ("a", "c"):
    imageio.write_png(folder / f"{name}.png", rng.integers(0, 256, (64, 64), dtype=np.uint8))
  (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt
  (folder / "._a.png").write_bytes(b"AppleDouble")  # hidden metadata file
  return folder


def _predict_config(images, out, on_error):
  config = tiny.get_config()
  config.predict.input, config.predict.output, config.predict.on_error = str(images), str(out), on_error
  return config


def test_folder_prediction_stops_at_a_bad_image_naming_it_and_what_was_written(trained, tmp_path, caplog):
  images = _images(tmp_path / "images")
  with caplog.at_level(logging.WARNING), pytest.raises(imageio.DataError) as raised:
    predict.predict_files(_predict_config(images, tmp_path / "out", "stop"), trained)
  assert str(images / "b.png") in str(raised.value) and "1 of 3 images were predicted" in str(raised.value)
  assert "--config.predict.on_error=skip" in str(raised.value)
  assert "hidden files" in caplog.text and "._a.png" in caplog.text
  assert sorted(p.name for p in (tmp_path / "out").glob("*.tiff")) == ["a.tiff"]  # whole files only
  assert not list((tmp_path / "out").rglob("*.tmp"))


def test_folder_prediction_can_skip_bad_images_and_report_them(trained, tmp_path):
  images = _images(tmp_path / "images")
  written = predict.predict_files(_predict_config(images, tmp_path / "out", "skip"), trained)
  assert [p.name for p in written] == ["a.tiff", "c.tiff"]
  report = json.loads((tmp_path / "out" / predict.ERROR_REPORT).read_text())
  assert report["predicted"] == 2 and [row["file"] for row in report["skipped"]] == [str(images / "b.png")]


@pytest.mark.parametrize("problem", ["a file", "read-only"])
def test_an_unwritable_output_folder_is_found_before_the_first_image(trained, tmp_path, problem):
  images = _images(tmp_path / "images")
  out = tmp_path / "out"
  if problem == "a file":
    out.write_text("not a folder")
    expected, fragment = NotADirectoryError, "is a file"
  else:
    out.mkdir()
    out.chmod(0o500)
    expected, fragment = PermissionError, "cannot write predictions"
  if problem == "read-only" and os.geteuid() == 0:
    pytest.skip("root can write to a read-only folder")
  try:
    with pytest.raises(expected, match=fragment):
      predict.predict_files(_predict_config(images, out, "stop"), trained)
    assert not list(out.glob("*.tiff")) if out.is_dir() else out.read_text() == "not a folder"
  finally:
    if out.is_dir():
      out.chmod(0o700)


def test_predict_without_a_checkpoint_exits_2_and_creates_nothing(tmp_path):
  images = _images(tmp_path / "images")
  result = _main(tmp_path / "empty", "--mode=predict", f"--config.predict.input={images}", expect=2)
  assert "No checkpoint in" in result.stderr and "train first" in result.stderr
  assert not (tmp_path / "empty" / "checkpoints").exists()
