"""Resume agreed by all processes: 2 processes (1 CPU device each, a 127.0.0.1 coordinator) save steps 1 and 2, then
one of them is made unable to read step 2 (its array reads are replaced by a failure for that step only).

Process 0 chooses the step and every process restores that one: when process 0 cannot read step 2, both restore
step 1 (process 1 alone would have taken step 2); when only process 1 cannot, both stop with one message naming
process 1, rather than resuming from different steps.
"""

import json
import subprocess
import sys

import pytest

from tests.multihost_test import REPO, _environment, _free_port

WORKER = r"""
import json, pathlib, sys
import jax
import numpy as np
port, process, blind, root, out = sys.argv[1:]
process, blind = int(process), int(blind)
jax.distributed.initialize(f"127.0.0.1:{port}", 2, process)
from urisc_jax import checkpoint

sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
                                      jax.sharding.PartitionSpec())

def state(value):
  return {"w": jax.make_array_from_callback((4,), sharding, lambda index: np.full(4, value, np.float32)[index])}

saver = checkpoint.Checkpointer(root, max_to_keep=3)
saver.save(1, state(1.0))
saver.save(2, state(2.0))
saver.close()
if process == blind:  # this process alone cannot read step 2's arrays
  read = checkpoint._read_every_array
  checkpoint._read_every_array = lambda d, **k: "injected: unreadable here" if d.parent.name == "2" else read(d, **k)
loader = checkpoint.Checkpointer(root)
try:
  restored = loader.restore_latest(state(0.0))
  result = {"step": restored.step, "w": float(np.asarray(restored.state["w"].addressable_data(0))[0]),
            "skipped": sorted(restored.skipped)}
except checkpoint.UnreadableCheckpointsError as e:
  result = {"error": str(e)}
loader.close()
pathlib.Path(out).write_text(json.dumps(result))
"""


def _restore_with_one_blind_process(tmp_path, blind: int) -> list[dict]:
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  port, root = _free_port(), tmp_path / "checkpoints"
  processes = [subprocess.Popen([sys.executable, str(script), str(port), str(i), str(blind), str(root),
                                 str(tmp_path / f"out{i}.json")], cwd=REPO, env=dict(_environment(1), PYTHONPATH=str(REPO)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for i, p in enumerate(processes):
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{err[-4000:]}"
  return [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]


@pytest.mark.parametrize("blind", [-1, 0])
def test_every_process_restores_the_step_process_0_chooses(tmp_path, blind):
  results = _restore_with_one_blind_process(tmp_path, blind)
  step = 2 if blind == -1 else 1
  assert results == [{"step": step, "w": float(step), "skipped": [] if blind == -1 else [2]}] * 2


def test_a_step_one_process_cannot_read_stops_every_process(tmp_path):
  results = _restore_with_one_blind_process(tmp_path, 1)
  assert results[0] == results[1]
  message = results[0]["error"]
  assert "the newest step process 0 can read, cannot be read by every process" in message
  assert "process 1: injected: unreadable here" in message and "process 0" not in message.split("(")[1]
