"""Batch sizes at every documented scale: the launchers' commands pass the config check on 1, 8, 32 and 64 processes.

The global train and predict batches must split evenly over the processes. A fixed global batch (train 8, predict 2
in configs/default.py) does not at 32 processes; the per-device settings the multi-host launchers pass do at any
count. Process and device counts are faked here (jax.process_count, jax.devices, ...); the launchers' flags are
taken from their own dry runs, so that what is checked is what they would run.
"""

import ast
import dataclasses
import os
import shlex
import subprocess

import jax
import pytest

from configs import default
from urisc_jax import config_checks

from tests.launch_test import CONFIG, LAUNCH, _env


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """Enough of a jax.Device for a Mesh and the config checks."""
  id: int
  process_index: int
  platform: str = "gpu"
  device_kind: str = "fake"


def _fake_job(monkeypatch, processes: int, devices_per_process: int) -> None:
  devices = [FakeDevice(p * devices_per_process + i, p) for p in range(processes) for i in range(devices_per_process)]
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(jax, "device_count", lambda: len(devices))
  monkeypatch.setattr(jax, "local_device_count", lambda: devices_per_process)
  monkeypatch.setattr(jax, "devices", lambda *a: devices)
  monkeypatch.setattr(jax, "local_devices", lambda *a: devices[:devices_per_process])


def _launcher_flags(script: str, *flags: str) -> list[str]:
  """The program flags after --workdir in the command the launcher's dry run prints."""
  args = ["my-tpu", "zone"] if script == "tpu_pod.sh" else []
  out = subprocess.run(["bash", str(LAUNCH / script), *args, CONFIG, "/shared/runs/x", *flags],
                       env=_env(DRY_RUN="1", LC_ALL="C", TMPDIR=os.environ.get("TMPDIR", "/tmp")),
                       capture_output=True, text=True, check=True, timeout=30)
  line = out.stdout.splitlines()[-1]
  words = shlex.split(line)
  if script == "tpu_pod.sh":  # the program runs inside the worker's --command=...
    command = next(w for w in words if w.startswith("--command=")).removeprefix("--command=")
    words = shlex.split(command.split(" && exec ", 1)[1])
  return words[next(i for i, w in enumerate(words) if w.startswith("--workdir=")) + 1:]


def _apply(config, flags: list[str]) -> None:
  """What ml_collections' config flags do with --config.a.b=value (the forms the launchers print)."""
  for flag in flags:
    key, value = flag.removeprefix("--config.").split("=", 1)
    *path, last = key.split(".")
    node = config
    for part in path:
      node = node[part]
    node[last] = ast.literal_eval(value)


# (command as documented, launcher, processes, devices per process)
LAYOUTS = [
    ("bash launch/single_host_gpu.sh (8 GPUs)", "single_host_gpu.sh", 1, 8),
    ("sbatch --nodes=1 launch/slurm_multinode.sbatch", "slurm_multinode.sbatch", 8, 1),
    ("sbatch --nodes=4 launch/slurm_multinode.sbatch", "slurm_multinode.sbatch", 32, 1),
    ("sbatch --nodes=8 launch/slurm_multinode.sbatch", "slurm_multinode.sbatch", 64, 1),
    ("bash launch/tpu_pod.sh (4 hosts x 4 chips)", "tpu_pod.sh", 4, 4),
    ("bash launch/tpu_pod.sh (64 hosts x 4 chips)", "tpu_pod.sh", 64, 4),
]


@pytest.mark.parametrize("what, script, processes, per_process", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
@pytest.mark.parametrize("extra", [[], ["--config.train.batch_size=128"]], ids=["as documented", "batch 128"])
def test_documented_launches_pass_the_config_check(monkeypatch, what, script, processes, per_process, extra):
  del what
  if extra and 128 % (processes * per_process):
    pytest.skip("a global batch must split over the mesh's devices")
  flags = _launcher_flags(script, *extra)
  _fake_job(monkeypatch, processes, per_process)
  config = default.get_config()
  _apply(config, flags)
  config_checks.resolve_batch_sizes(config)
  for mode in ("train", "predict"):
    config_checks.validate(config, mode)
  devices = processes * per_process
  if script == "single_host_gpu.sh":  # one process: the flags as given, the config's own batches
    assert flags == extra and (config.train.batch_size, config.predict.batch_size) == (128 if extra else 8, 2)
  else:
    assert config.train.batch_size == (128 if extra else devices)
    assert config.predict.batch_size == devices
  assert config.train.batch_size % processes == 0 and config.predict.batch_size % processes == 0


@pytest.mark.parametrize("processes", [8, 32, 64])
def test_a_global_batch_that_does_not_split_names_the_per_device_setting(monkeypatch, processes):
  _fake_job(monkeypatch, processes, 1)
  config = default.get_config()
  assert config_checks.resolve_batch_sizes(config) == []  # 0 = unset: the global batches as they are
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.validate(config, "train")
  message = str(e.value)
  if processes > 8:
    assert f"config.train.batch_size=8: must be a multiple of the {processes} processes" in message
    assert "config.train.batch_size_per_device=N" in message
  assert f"config.predict.batch_size=2: must be a multiple of the {processes} processes" in message
  assert "config.predict.batch_size_per_device=N" in message


def test_per_device_batches_scale_with_the_devices():
  config = default.get_config()
  config.train.batch_size_per_device, config.predict.batch_size_per_device = 4, 3
  lines = config_checks.resolve_batch_sizes(config, device_count=16)
  assert (config.train.batch_size, config.predict.batch_size) == (64, 48)
  assert lines == ["config.train.batch_size=64 (4 crops per device x 16 devices)",
                   "config.predict.batch_size=48 (3 tiles per device x 16 devices)"]
  # A process predicting alone (multi-host validation) or a Dask worker: its own devices only.
  assert config_checks.local_predict_batch(config.predict, local_device_count=4) == 12
  assert config_checks.local_predict_batch(config.predict, local_device_count=1) == 3
  config.predict.batch_size_per_device = 0
  assert config_checks.local_predict_batch(config.predict, local_device_count=4) == 48


def test_a_bad_per_device_batch_is_named():
  config = default.get_config()
  config.train.batch_size_per_device = -1
  assert config_checks.resolve_batch_sizes(config, device_count=4) == []
  with pytest.raises(config_checks.ConfigError, match=r"config.train.batch_size_per_device=-1: must be an integer"):
    config_checks.validate(config, "train")
