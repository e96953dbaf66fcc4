"""configs/tiny.py end to end on 8 simulated CPU devices through the command line, then resumed to more steps.

The tiny config's mesh is (("data", -1),): with 8 devices each holds one of the 8 crops of a batch, prediction tiles
are batched 8 at a time, and checkpoints hold the replicated state.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main_on_8_devices(workdir, num_steps):
  # Backend optimization level 0: the same programs, compiled about 3 x faster and run a little slower.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
                       + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  command = [sys.executable, "-m", "urisc_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
             f"--config.train.num_steps={num_steps}"]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads((workdir / "metrics.json").read_text())


def _logged(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same workdir after a 4-step run and after rerunning it with 6 steps; what each left behind."""
  workdir = tmp_path_factory.mktemp("tiny_8_devices")
  first = _main_on_8_devices(workdir, 4)
  first_log, first_checkpoints = _logged(workdir), _checkpoint_steps(workdir)
  resumed = _main_on_8_devices(workdir, 6)
  return {"first": first, "first_log": first_log, "first_checkpoints": first_checkpoints, "resumed": resumed,
          "resumed_log": _logged(workdir), "resumed_checkpoints": _checkpoint_steps(workdir)}


def test_tiny_config_trains_and_scores_on_8_devices(runs):
  metrics = runs["first"]
  assert metrics["step"] == 4 and metrics["train"]["resumed_from"] == 0
  for key in ("f1", "baseline_f1", "threshold"):
    assert 0.0 <= metrics[key] <= 1.0, key
  assert metrics["num_images"] == {"train": 2, "val": 1, "test": 1}


def test_every_step_is_logged_with_a_finite_loss_and_checkpoints_are_kept_every_2_steps(runs):
  log = runs["first_log"]
  assert [line["step"] for line in log] == [1, 2, 3, 4]
  assert all(0.0 < line["loss"] < 10.0 for line in log), log
  assert runs["first_checkpoints"] == [2, 4]  # checkpoint_every 2, keep_checkpoints 2


def test_a_rerun_with_more_steps_resumes_from_the_last_checkpoint(runs):
  metrics, log = runs["resumed"], runs["resumed_log"]
  assert metrics["train"]["resumed_from"] == 4 and metrics["step"] == 6
  assert [line["step"] for line in log] == [1, 2, 3, 4, 5, 6]  # steps 1-4 are not trained again
  assert log[:4] == runs["first_log"]
  assert all(0.0 < line["loss"] < 10.0 for line in log[4:]), log
  assert runs["resumed_checkpoints"] == [4, 6]
