"""Two processes as two hosts on one machine: the tiny config from training to scores, a SIGTERM, predict and
attribute, as a multi-host job runs them.

Each process is `python -m urisc_jax.main ... --coordinator_address=127.0.0.1:PORT --num_processes=2
--process_id=I` with 2 simulated CPU devices; the processes talk through JAX's coordinator and CPU collectives
(gloo), as hosts of a cluster do over the network. The single-process reference has 4 devices: the same global
batch of 8 crops, split 2 per device, so losses agree to float32 reduction order.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

from configs import tiny
from urisc_jax import multihost, predict, sharding, state
from urisc_jax.data import dataset
from urisc_jax.evaluation import f1 as official

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12
# Long enough that a SIGTERM after step 1 lands well before the end; validation at 6 and 12 (best checkpoint and the
# threshold) on 2 images, so that 2 processes validate one each; checkpoints every 2 steps.
FLAGS = [f"--config.train.num_steps={STEPS}", "--config.train.eval_every=6", "--config.train.checkpoint_every=2",
         "--config.data.synthetic.num_val=2"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _environment(devices: int) -> dict:
  # Backend optimization level 0: the same programs, compiled about 3 x faster (as tests/multidevice_test.py).
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")


def _start(workdir, *flags, processes=2, devices=2) -> list[subprocess.Popen]:
  base = [sys.executable, "-m", "urisc_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}", *flags]
  if processes == 1:
    commands = [base]
  else:
    port = _free_port()
    commands = [[*base, f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                 f"--process_id={i}"] for i in range(processes)]
  return [subprocess.Popen(command, cwd=REPO, env=_environment(devices), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for command in commands]


def _finish(processes, expected_code=0) -> list[tuple[str, str]]:
  outputs = [p.communicate(timeout=900) for p in processes]
  for i, (p, (_, err)) in enumerate(zip(processes, outputs)):
    assert p.returncode == expected_code, f"process {i} exited {p.returncode}:\n{err[-4000:]}"
  return outputs


def _run(workdir, *flags, processes=2, devices=2):
  return _finish(_start(workdir, *flags, processes=processes, devices=devices))


def _losses(workdir) -> dict[int, float]:
  """The last logged loss of each step (a resumed run logs the steps it redoes again)."""
  return {record["step"]: record["loss"] for record in map(json.loads, (workdir / "metrics.jsonl").open())}


def _checkpoint_steps(folder) -> list[int]:
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  data = [f"--config.data.root={tmp / 'data'}"]
  started = time.perf_counter()
  single_out = _run(tmp / "single", *FLAGS, *data, processes=1, devices=4)
  single_seconds = time.perf_counter() - started
  started = time.perf_counter()
  double_out = _run(tmp / "double", *FLAGS, *data)
  double_seconds = time.perf_counter() - started

  # SIGTERM to process 1 only, once both are training; both must stop after the same step, with a whole checkpoint.
  processes = _start(tmp / "preempted", *FLAGS, *data)
  log = tmp / "preempted" / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and not (log.exists() and log.read_text().strip()):
    assert all(p.poll() is None for p in processes), "a process ended before training started"
    time.sleep(0.05)
  processes[1].send_signal(signal.SIGTERM)
  preempted_out = _finish(processes, expected_code=multihost.PREEMPTED_EXIT_CODE)
  stopped = {"losses": _losses(tmp / "preempted"),
             "checkpoints": _checkpoint_steps(tmp / "preempted" / "checkpoints"),
             "leftovers": [p.name for p in (tmp / "preempted" / "checkpoints").iterdir() if not p.name.isdigit()]}
  _run(tmp / "preempted", *FLAGS, *data)
  return {"tmp": tmp, "single": tmp / "single", "double": tmp / "double", "preempted": tmp / "preempted",
          "double_out": double_out, "single_out": single_out, "preempted_out": preempted_out, "stopped": stopped,
          "seconds": {"single": single_seconds, "double": double_seconds}}


def test_two_processes_train_like_one_process_on_the_same_global_batch(runs):
  """The global batch is the same crops (in another order), so the runs differ only in float32 reduction order, which
  Adam's normalized steps carry into the weights. Measured with AVX2 on two cores: 0 at steps 1-2, 3e-6 at step 3,
  at most 5.4e-4 relative by step 12; with SSE4_2 on one core (taskset -c 0): 1e-7 at steps 1-2, 1.3e-5 at step 3,
  at most 8.9e-4 by step 12. The bounds, 1e-5 for the first two steps (one update from gradients equal to
  rounding), 1e-4 at step 3 and 5e-3 after, leave 5x or more for other CPUs; a wrong split of the batch or other
  data changes the loss of step 1 itself, by far more."""
  single, double = _losses(runs["single"]), _losses(runs["double"])
  assert sorted(double) == list(range(1, STEPS + 1))  # each step logged once: process 0 alone writes the log
  for step in single:
    assert double[step] == pytest.approx(single[step], rel=1e-5 if step <= 2 else 1e-4 if step == 3 else 5e-3), step
  # Scores are compared where the parameters are the same (test_predict_...): after 12 steps the tiny model's
  # logits sit near the threshold, and the 5e-4 apart weights of the two runs score F1 0.08 and 0.16.
  single_metrics = json.loads((runs["single"] / "metrics.json").read_text())
  double_metrics = json.loads((runs["double"] / "metrics.json").read_text())
  assert 0.0 <= double_metrics["f1"] <= 1.0 and 0.0 <= double_metrics["val_f1"] <= 1.0
  print(f"1 process x 4 devices: {runs['seconds']['single']:.0f} s, 2 processes x 2 devices: "
        f"{runs['seconds']['double']:.0f} s; validations {single_metrics['train']['validation_seconds']} s vs "
        f"{double_metrics['train']['validation_seconds']} s")


def test_validation_shared_by_two_processes_scores_like_one_process(runs):
  """Each of the 2 processes validated one of the 2 images on its own devices; one process here scores both with the
  same final state."""
  config = tiny.get_config()
  config.data.root = str(runs["tmp"] / "data")
  config.data.synthetic.num_val = 2
  model = state.build_model(config.model)
  variables, step, _ = predict.restore_variables(config, runs["double"], model)
  images = dataset.prepared_split(config.data, runs["double"], config.data.val_split, progress=False)
  chosen = predict.choose_threshold(predict.tile_forward(config, model, variables), images, config)
  metrics = json.loads((runs["double"] / "metrics.json").read_text())
  assert step == STEPS and len(images) == 2
  assert chosen["val_f1"] == pytest.approx(metrics["val_f1"], abs=1e-3)
  assert chosen["threshold"] == pytest.approx(metrics["threshold"], abs=0.021)  # at most one candidate apart


def test_process_0_alone_writes_results_and_the_checkpoints_are_whole(runs):
  double = runs["double"]
  (out0, _), (out1, _) = runs["double_out"]
  assert '"f1"' in out0 and "{" not in out1  # the summary is printed once (gloo logs its connections on both)
  assert len((double / "command.txt").read_text().splitlines()) == 1
  metrics = json.loads((double / "metrics.json").read_text())
  [entry] = metrics["per_image"]
  submission = official.read_gray8(double / "predictions" / f"{entry['name']}.tiff")
  assert set(np.unique(submission)) <= {0, 255}
  assert _checkpoint_steps(double / "checkpoints") == [STEPS - 2, STEPS]
  assert _checkpoint_steps(double / "checkpoints_best") == [metrics["train"]["best"]["step"]]
  threshold = json.loads((double / "threshold.json").read_text())
  assert threshold["step"] == STEPS and threshold["threshold"] == metrics["threshold"]


def test_a_sigterm_to_one_process_stops_both_after_the_same_step_and_the_rerun_repeats_the_losses(runs):
  stopped = runs["stopped"]
  last = max(stopped["losses"])
  assert 1 <= last < STEPS
  assert stopped["checkpoints"][-1] == last and not stopped["leftovers"]  # saved whole at the step both stopped
  for out, err in runs["preempted_out"]:
    assert f"saved step {last}" in err
  assert _losses(runs["preempted"]) == _losses(runs["double"])  # resumed: the same losses as without the stop
  print(f"SIGTERM to process 1 once step 1 was logged: both processes exited "
        f"{multihost.PREEMPTED_EXIT_CODE} after step {last}; the rerun repeated the losses exactly")


def test_predict_and_attribute_run_on_two_processes(runs, tmp_path):
  double = runs["double"]
  images = runs["tmp"] / "data" / "imgs" / "Track1" / "test"
  for processes, devices, out in ((2, 2, tmp_path / "two"), (1, 4, tmp_path / "one")):
    _run(double, "--mode=predict", f"--config.predict.input={images}", f"--config.predict.output={out}",
         processes=processes, devices=devices)
  for image in images.glob("*.png"):
    # The same checkpoint predicted by 2 processes (each computing half of every batch of tiles) and by 1.
    two = tifffile.imread(tmp_path / "two" / "probabilities" / f"{image.stem}.tif")
    one = tifffile.imread(tmp_path / "one" / "probabilities" / f"{image.stem}.tif")
    np.testing.assert_allclose(two, one, atol=1e-5)
    assert np.mean(official.read_gray8(tmp_path / "two" / f"{image.stem}.tiff")
                   == official.read_gray8(tmp_path / "one" / f"{image.stem}.tiff")) > 0.999
  _run(double, "--mode=attribute", "--config.attribution.steps=8", "--config.attribution.max_nodes=8",
       "--config.attribution.num_targets=2")
  targets = json.loads((double / "attribution" / "targets.json").read_text())["targets"]
  assert targets and len({(t["image"], t["y"], t["x"]) for t in targets}) == len(targets)
  assert all(np.isfinite(t["completeness_gap"]) for t in targets)
  assert list((double / "attribution").glob("figure8_*.png"))


def test_a_spatial_axis_across_hosts_is_refused_before_any_work(tmp_path):
  processes = _start(tmp_path, '--config.mesh=(("data", 1), ("spatial", 4))')
  for (_, err), process in zip([p.communicate(timeout=300) for p in processes], processes):
    assert process.returncode != 0
    assert "splits a crop's rows over devices of different processes" in err


def test_distributed_without_a_job_says_how_to_start_one(tmp_path):
  command = [sys.executable, "-m", "urisc_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
             "--distributed"]
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR", "TPU_"))}
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "--distributed: JAX found no multi-process job" in result.stderr and "--coordinator_address" in result.stderr


@pytest.mark.parametrize("flags,environ,expected", [
    ({}, {}, None),
    ({"distributed": True}, {}, {}),
    ({}, {"SLURM_STEP_NUM_TASKS": "16"}, {}),
    ({}, {"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "16"}, None),  # a batch script's shell, not a step
    ({}, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, {}),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 1, "local_device_ids": "0,1"}, {},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1, "local_device_ids": [0, 1]}),
])
def test_distributed_options_from_flags_and_environment(flags, environ, expected):
  assert multihost.distributed_options(**flags, environ=environ) == expected


@pytest.mark.parametrize("flags", [{"coordinator_address": "h:1"}, {"num_processes": 2, "process_id": 0},
                                   {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}])
def test_incomplete_explicit_options_name_the_three_flags(flags):
  with pytest.raises(ValueError, match="--coordinator_address=HOST:PORT, --num_processes=N and --process_id=I"):
    multihost.distributed_options(**flags, environ={})


def test_spatial_lines_are_checked_per_host():
  # 2 hosts x 4 devices, mesh (data 4, spatial 2): each spatial pair on one host.
  within = np.array([[0, 0], [0, 0], [1, 1], [1, 1]])
  assert not sharding.spatial_groups_cross_processes(within, 1)
  # Mesh (data 2, spatial 4) over the same devices: still one host per line; (data 1, spatial 8) crosses.
  assert not sharding.spatial_groups_cross_processes(np.array([[0, 0, 0, 0], [1, 1, 1, 1]]), 1)
  assert sharding.spatial_groups_cross_processes(np.array([[0, 0, 0, 0, 1, 1, 1, 1]]), 1)
  # The spatial axis first: mesh (spatial 2, data 4) with each pair on one host, and one whose pairs cross hosts.
  assert not sharding.spatial_groups_cross_processes(np.array([[0, 0, 1, 1], [0, 0, 1, 1]]), 0)
  assert sharding.spatial_groups_cross_processes(np.array([[0, 0, 0, 0], [1, 1, 1, 1]]), 0)
