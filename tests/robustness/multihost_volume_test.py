"""A volume predicted by a 2-process job is predicted once, by process 0 and its Dask workers, into the same output
as a 1-process run; the other process restores the checkpoint with it, then waits for its outcome.

The job is 2 processes of `python -m urisc_jax.main` on 127.0.0.1 (as tests/multihost_test.py starts them), on a
2-section volume of 8 blocks and a checkpoint of random weights; each driver runs one Dask worker.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from configs import tiny
from urisc_jax import checkpoint, models, optim, state

REPO = pathlib.Path(__file__).resolve().parents[2]
SHAPE = (2, 96, 96)  # 2 sections of 2 x 2 blocks of 64 px (the last row and column cut to 32)
FLAGS = ["--mode=predict", "--config.predict.threshold=0.5", "--config.predict.volume.block=64",
         "--config.predict.volume.chunk=64", "--config.predict.volume.levels=1", "--config.predict.dask.workers=1"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, *flags, processes: int) -> list[subprocess.Popen]:
  base = [sys.executable, "-m", "urisc_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}", *flags]
  port = _free_port()
  commands = [base] if processes == 1 else [
      [*base, f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}",
       "--initialization_timeout_s=120"] for i in range(processes)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for command in commands]


def _finish(processes) -> list[tuple[int, str, str]]:
  results = []
  for p in processes:
    try:
      out, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in processes:
        q.kill()
      pytest.fail("a process of the job did not finish in 600 s")
    results.append((p.returncode, out, err))
  return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir holding a checkpoint of the tiny model (random weights), and an input volume."""
  tmp = tmp_path_factory.mktemp("multihost_volume")
  config = tiny.get_config()
  model = state.build_model(config.model)
  tx = optim.optimizer_from_config(config.optim, config.train.num_steps)
  initial = models.init_variables(model, (1, 64, 64, 1))
  train_state = state.TrainState(step=jnp.zeros((), jnp.int32), params=initial["params"],
                                 batch_stats=initial["batch_stats"], opt_state=tx.init(initial["params"]))
  saver = checkpoint.Checkpointer(tmp / "run" / "checkpoints")
  saver.save(0, train_state)
  saver.close()
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, SHAPE, dtype=np.uint8)
  store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp / "in.zarr")},
                   "metadata": {"shape": list(SHAPE), "chunks": [1, 64, 64], "dtype": "|u1"}}, create=True).result()
  store.write(image).result()
  return tmp


def _read(path: pathlib.Path) -> np.ndarray:
  return ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}).result().read().result()


def test_two_processes_predict_a_volume_once_into_what_one_process_writes(trained):
  tmp = trained
  data = [f"--config.predict.input={tmp / 'in.zarr'}"]
  # The 1-process reference runs beside the job, in a copy of the workdir (a workdir holds one run at a time).
  shutil.copytree(tmp / "run", tmp / "run_single")
  single = _start(tmp / "run_single", *FLAGS, *data, f"--config.predict.output={tmp / 'one.zarr'}", processes=1)
  job = _start(tmp / "run", *FLAGS, *data, f"--config.predict.output={tmp / 'two.zarr'}", processes=2)
  [(code, single_out, single_err)], results = _finish(single), _finish(job)
  assert code == 0, single_err[-3000:]
  for i, (code, _, err) in enumerate(results):
    assert code == 0, f"process {i} exited {code}:\n{err[-3000:]}"
  (_, out0, err0), (_, out1, err1) = results
  summary = json.loads(out0[out0.index("{"):])  # after gloo's connection line
  # Process 0 computed every block, none found done by another driver; process 1 computed nothing and said so.
  assert summary["blocks"] == summary["computed"] == 8 and summary["skipped"] == 0, summary
  assert "{" not in out1 and "volume:" not in err1, err1[-3000:]
  assert "process 0 does volume prediction for the job" in err1
  assert json.loads(single_out)["computed"] == 8
  for array in ("0", "labels/membrane/0"):
    np.testing.assert_array_equal(_read(tmp / "two.zarr" / array), _read(tmp / "one.zarr" / array))
  markers = sorted(p.name for p in (tmp / "two.zarr" / ".blocks").iterdir() if p.name != "run.json")
  assert len(markers) == 8


def test_a_bad_volume_input_stops_both_processes_with_status_2(trained):
  tmp = trained
  results = _finish(_start(tmp / "run", *FLAGS, f"--config.predict.input={tmp / 'missing.zarr'}",
                           f"--config.predict.output={tmp / 'never.zarr'}", processes=2))
  for i, (code, _, err) in enumerate(results):
    assert code == 2, f"process {i} exited {code}:\n{err[-3000:]}"
    assert "missing.zarr does not exist" in err and "Traceback" not in err, err[-3000:]
  assert not (tmp / "never.zarr").exists()
