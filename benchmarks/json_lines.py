"""The benchmarks' output convention: one JSON object per line on stdout, progress on stderr, and measurements run
in fresh processes whose JSON lines are collected."""

import json
import subprocess
import sys


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def run_and_collect(command: list[str], *, what: str, cwd=None, env=None, echo: bool = True) -> list[dict]:
  """Runs `command`, returns (and with `echo` re-emits) the JSON objects it printed one per line; fails loudly on a
  non-zero exit."""
  proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    log(proc.stderr[-4000:])
    raise RuntimeError(f"{what} failed with exit status {proc.returncode}")
  records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  if echo:
    for record in records:
      emit(record)
  return records
