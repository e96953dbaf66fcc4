"""Validation on 1 and on N hosts: how much of an image each host computes when a multi-host run validates.

    python -m benchmarks.multihost                       # the default config's model and validation images, 1 vs 2
    python -m benchmarks.multihost --processes=1,2 --config=configs/tiny.py

Hosts are emulated on this machine: each process of an N-process run (`--coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=I`, CPU collectives) is pinned to its own CPU cores with `taskset` (--cores-per-host
each), and the 1-process run gets the cores of one host, so that "N hosts" means N times the hardware, as on a
cluster. Each run trains --steps steps and validates after every one (`config.train.eval_every=1`); the records are
the median time of one validation after the first (the first compiles the tile forward), as train() measured it
(`metrics.json`: train.validation_seconds). On a machine with fewer than N x --cores-per-host cores the hosts share
cores and the figure says nothing.

One JSON object per line: {"bench": "multihost_validation", "processes", "metric": "seconds", "value", ...} and
{"metric": "speedup", "value": seconds(1) / seconds(N)}.
"""

import argparse
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile

from benchmarks.json_lines import emit, log

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run(processes: int, args, tmp: pathlib.Path) -> list[float]:
  """Runs the config as `processes` pinned processes; returns the validation times of process 0's metrics.json."""
  workdir = tmp / f"run_{processes}"
  flags = [f"--config={args.config}", f"--workdir={workdir}", f"--config.train.num_steps={args.steps}",
           "--config.train.eval_every=1", f"--config.data.root={tmp / 'data'}",
           f"--config.compilation_cache={tmp / 'cache'}", *args.flags]
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  commands = []
  for i in range(processes):
    cores = ",".join(str(c) for c in range(i * args.cores_per_host, (i + 1) * args.cores_per_host))
    distributed = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
                   if processes > 1 else [])
    commands.append(["taskset", "-c", cores, sys.executable, "-m", "urisc_jax.main", *flags, *distributed])
  log(f"{processes} process(es): {' '.join(commands[0])}")
  running = [subprocess.Popen(c, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in commands]
  for process in running:
    _, err = process.communicate()
    if process.returncode:
      log(err[-4000:])
      raise RuntimeError(f"a process of the {processes}-process run failed with exit status {process.returncode}")
  return json.loads((workdir / "metrics.json").read_text())["train"]["validation_seconds"]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--processes", default="1,2", help="comma-separated process counts; the first is the base")
  parser.add_argument("--cores-per-host", type=int, default=1)
  parser.add_argument("--steps", type=int, default=4, help="train steps, each followed by a validation")
  parser.add_argument("flags", nargs="*", help="more flags for urisc_jax.main, e.g. --config.predict.batch_size=4")
  args = parser.parse_args(argv)
  if not shutil.which("taskset"):
    parser.error("taskset (util-linux) is needed to give each emulated host its own cores")
  counts = [int(n) for n in args.processes.split(",")]
  if max(counts) * args.cores_per_host > os.cpu_count():
    log(f"warning: {max(counts)} hosts x {args.cores_per_host} cores need more than this machine's "
        f"{os.cpu_count()} cores: the hosts share cores")
  medians = {}
  with tempfile.TemporaryDirectory(prefix="urisc_multihost_") as tmp:
    for processes in counts:
      seconds = run(processes, args, pathlib.Path(tmp))
      medians[processes] = statistics.median(seconds[1:] or seconds)
      emit({"bench": "multihost_validation", "config": args.config, "processes": processes,
            "cores_per_host": args.cores_per_host, "metric": "seconds", "value": round(medians[processes], 3),
            "unit": "s", "validations": [round(s, 3) for s in seconds]})
  base = counts[0]
  for processes in counts[1:]:
    emit({"bench": "multihost_validation", "config": args.config, "processes": processes, "metric": "speedup",
          "value": round(medians[base] / medians[processes], 3), "unit": "x", "over_processes": base})


if __name__ == "__main__":
  main()
