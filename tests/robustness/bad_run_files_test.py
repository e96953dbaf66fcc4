"""Hostile or broken files around a run: a planted synthetic.json, a busy or stale workdir lock, result files that are
symlinks, data roots that are files. Each case checks the error (class and message) and that no file outside the
run was touched and no partial output was left looking whole."""

import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from urisc_jax import outputs, run_lock, run_log
from urisc_jax.data import imageio, sources, synthetic
from urisc_jax.evaluation import report

REPO = pathlib.Path(__file__).resolve().parents[2]
SMALL = dict(num_train=1, num_val=0, num_test=0, height=64, width=64)


def _release(root: pathlib.Path, seed: int = 1) -> list[pathlib.Path]:
  return synthetic.write_release(root, seed=seed, **SMALL)


# ---------------------------------------------------------------------------------------------- planted manifests

def _plant(root: pathlib.Path, files) -> None:
  """A manifest from "another run" (other parameters), listing `files` for deletion."""
  (root / synthetic.MANIFEST).write_text(json.dumps({"params": {"other": True}, "files": files, "complete": True}))


@pytest.mark.parametrize("listed", ["absolute", "dotdot", "symlinked folder", "not a generated name"])
def test_a_planted_manifest_cannot_delete_files_outside_its_release(tmp_path, listed):
  root, victim = tmp_path / "data", tmp_path / "precious.txt"
  victim.write_text("keep me")
  root.mkdir()
  if listed == "absolute":
    entry = str(victim)
  elif listed == "dotdot":
    entry = "../precious.txt"
  elif listed == "symlinked folder":
    (tmp_path / "elsewhere" / "train").mkdir(parents=True)
    kept = tmp_path / "elsewhere" / "train" / "train_000.png"
    kept.write_text("keep me")
    (root / "imgs").mkdir()
    (root / "imgs" / "Track1").symlink_to(tmp_path / "elsewhere")
    entry, victim = "imgs/Track1/train/train_000.png", kept
  else:
    (root / "notes.txt").write_text("keep me")
    entry, victim = "notes.txt", root / "notes.txt"
  _plant(root, [entry])
  with pytest.raises(imageio.DataError, match="is not a file this generator writes inside .* refusing to delete"):
    _release(root)
  assert victim.read_text() == "keep me"


def test_a_manifest_whose_file_list_is_not_a_list_is_refused(tmp_path):
  root = tmp_path / "data"
  root.mkdir()
  _plant(root, "imgs/Track1/train/train_000.png")
  with pytest.raises(imageio.DataError, match="'files' is not a list"):
    _release(root)


def test_a_genuine_manifest_of_other_parameters_still_replaces_its_own_files(tmp_path):
  root = tmp_path / "data"
  first = _release(root, seed=1)
  second = _release(root, seed=2)
  assert first == second and all(p.is_file() for p in second)
  assert json.loads((root / synthetic.MANIFEST).read_text())["params"]["seed"] == 2


# ---------------------------------------------------------------------------------------------------- workdir lock

def test_a_second_run_in_a_busy_workdir_stops_naming_the_first(tmp_path):
  with run_lock.exclusive(tmp_path):
    with pytest.raises(run_lock.WorkdirBusyError, match=rf"{re.escape(str(tmp_path))} is in use by the run started .* process "
                                                          rf"{os.getpid()}"):
      with run_lock.exclusive(tmp_path):
        pass
  with run_lock.exclusive(tmp_path):  # released when the first run ended
    pass


def test_a_stale_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
  # What a SIGKILLed run leaves: the file with its holder, but no lock (the kernel dropped it with the process).
  (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps({"host": "h", "pid": 999999, "started": "then",
                                                         "command": "old run"}))
  with caplog.at_level(logging.WARNING), run_lock.exclusive(tmp_path):
    holder = json.loads((tmp_path / run_lock.LOCK_FILE).read_text())
  assert holder["pid"] == os.getpid()
  assert "taking over the stale lock" in caplog.text and "999999" in caplog.text


def test_a_lock_file_that_is_a_symlink_is_refused(tmp_path):
  target = tmp_path / "target.txt"
  target.write_text("keep me")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / run_lock.LOCK_FILE).symlink_to(target)
  with pytest.raises(run_lock.WorkdirBusyError, match="remove it if it is a symlink"):
    with run_lock.exclusive(tmp_path / "run"):
      pass
  assert target.read_text() == "keep me"


def test_two_runs_in_one_workdir_through_the_command_line(tmp_path):
  command = [sys.executable, "-m", "urisc_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
             "--mode=prepare"]
  with run_lock.exclusive(tmp_path):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "is in use by the run started" in result.stderr
  assert not (tmp_path / "config.json").exists() and not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------------------- result files, symlinks

def _symlink_to_victim(tmp_path, name):
  victim = tmp_path / "victim.txt"
  victim.write_text("keep me")
  link = tmp_path / "out" / name
  link.parent.mkdir(parents=True, exist_ok=True)
  link.symlink_to(victim)
  return link, victim


@pytest.mark.parametrize("write", [
    lambda path: outputs.write_text(path, "report"),
    lambda path: outputs.write_json(path, {"f1": float("nan")}),
    lambda path: outputs.append_line(path, "python -m urisc_jax.main ..."),
    lambda path: outputs.write_png(path, np.zeros((4, 4), np.uint8)),
], ids=["text", "json", "append", "png"])
def test_a_result_file_that_is_a_symlink_is_replaced_not_written_through(tmp_path, write):
  link, victim = _symlink_to_victim(tmp_path, "result")
  write(link)
  assert victim.read_text() == "keep me"
  assert link.is_file() and not link.is_symlink()
  assert not [p for p in link.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind


def test_the_evaluation_report_does_not_write_through_a_symlinked_markdown(tmp_path):
  preds, gts = tmp_path / "pred", tmp_path / "gt"
  truth = np.full((64, 64), 255, np.uint8)
  truth[::8] = 0
  imageio.write_tiff(gts / "a.tiff", truth)
  imageio.write_tiff(preds / "a.tiff", truth)
  link, victim = _symlink_to_victim(tmp_path, "evaluation.md")
  report.evaluate_folders(preds, gts, link.parent)
  assert victim.read_text() == "keep me" and "F1" in link.read_text()


def test_the_metrics_log_refuses_to_append_through_a_symlink(tmp_path):
  link, victim = _symlink_to_victim(tmp_path, "metrics.jsonl")
  with pytest.raises(OSError, match="is a symlink; refusing to append"):
    run_log.MetricsLogger(link.parent)
  assert victim.read_text() == "keep me"


def test_a_torn_last_log_line_from_a_killed_run_is_skipped(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
  assert run_log.read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]


# ------------------------------------------------------------------------------------------- data roots and folders

@pytest.mark.parametrize("reader,what", [
    (lambda root: sources.urisc_pairs(root, track="Track1", split="train"), "U-RISC folder"),
    (lambda root: sources.isbi_pairs(root), "ISBI 2012 folder"),
    (lambda root: sources.folder_pairs(root), "image folder"),
    (lambda root: synthetic.write_release(root, seed=0, **SMALL), "synthetic release folder"),
])
def test_a_data_root_that_is_a_file_is_named_as_a_file(tmp_path, reader, what):
  root = tmp_path / "data"
  root.write_text("oops")
  with pytest.raises(imageio.DataError, match=f"{what} {re.escape(str(root))} is a file, not a folder"):
    reader(root)
  assert root.read_text() == "oops"


def test_evaluate_with_a_prediction_folder_that_is_a_file_exits_2(tmp_path):
  (tmp_path / "pred").write_text("oops")
  (tmp_path / "gt").mkdir()
  command = [sys.executable, "-m", "urisc_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
             "--mode=evaluate", f"--config.eval.pred_dir={tmp_path / 'pred'}", f"--config.eval.gt_dir={tmp_path / 'gt'}"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "pred is a file, not a folder" in result.stderr
  assert (tmp_path / "pred").read_text() == "oops" and not (tmp_path / "run" / "evaluation").exists()
