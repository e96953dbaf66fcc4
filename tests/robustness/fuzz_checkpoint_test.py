"""Seeded random mutations of real checkpoints against torch_import.read_checkpoint.

Every mutated file must either load or raise CheckpointError (or a subclass) naming the file: never another
exception, never a crash or a hang, and never much memory. The inputs mutate the bytes of whole files (the CEM500K
fixture, a generated checkpoint using everything the reader allows, and a one-tensor one), and also the data.pkl
or the records inside an otherwise valid zip (re-zipped, so the CRCs pass and the mutation reaches the unpickler).

The loop runs in a child process (this file run as a script), so that a crash shows as its exit status and its peak
memory is its own. Environment:
  URISC_FUZZ_INPUTS: number of mutated inputs (default 1000: about 7 s on 2 cores, start-up included);
  URISC_FUZZ_SEED: seed (default 0); input i of a seed is the same on every run.
By hand: python tests/robustness/fuzz_checkpoint_test.py --inputs 20000 --seed 1 --out /tmp/fuzz
"""

import argparse
import collections
import io
import json
import os
import pathlib
import pickle
import pickletools
import random
import resource
import signal
import subprocess
import sys
import time
import traceback
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "models" / "cem500k_mocov2_tiny.pth.tar"
# The child's peak RSS is its baseline (python + numpy + jax + flax imported and the seeds built: 175 MB measured on
# the 2-core dev machine) plus what the inputs take: a few re-zipped copies of the 0.5 MB fixture, and arrays no
# larger than a seed's storages, since the caps refuse anything bigger before allocating it. Measured peaks: 194 MB
# for the default 1000 inputs, 202 MB for 20000. Bounded as the rise above the child's baseline (19-27 MB measured),
# since the baseline grows with the machine's cores (BLAS thread buffers) and library builds: 200 MB leaves room for
# other versions while still catching a bomb of a few hundred MB.
PEAK_RSS_RISE_BOUND_MB = 200
SECONDS_PER_INPUT = 10  # an input taking longer counts as a hang
INTERESTING_INTS = [0, 1, 2, 3, 4, 7, 8, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, -1, -2**31]
GLOBALS = [b"torch._utils\n_rebuild_tensor_v2\n", b"torch._utils\n_rebuild_parameter\n", b"torch\nFloatStorage\n",
           b"torch\nLongStorage\n", b"torch\nBFloat16Storage\n", b"torch\nBoolStorage\n", b"torch\nSize\n",
           b"collections\nOrderedDict\n", b"builtins\nset\n", b"builtins\nfrozenset\n", b"builtins\nbytearray\n",
           b"_codecs\nencode\n", b"numpy\ndtype\n", b"numpy\nndarray\n", b"numpy._core.multiarray\n_reconstruct\n",
           b"numpy.core.multiarray\nscalar\n", b"os\nsystem\n", b"builtins\ngetattr\n", b"posix\nsystem\n"]
OPCODES = [bytes([op.code.encode("latin1")[0]]) for op in pickletools.opcodes]


class _Hang(BaseException):
  """Raised by the alarm; a BaseException, so that the reader's `except Exception` cannot turn it into a refusal."""


def _on_alarm(signum, frame):
  raise _Hang()


def _mutate_bytes(data: bytes, rng: random.Random, hot: tuple[int, int] | None = None) -> bytes:
  """1 to 4 of: bit flips, byte and int overwrites, insertions, deletions, duplications, a truncation."""
  data = bytearray(data)
  for _ in range(rng.randint(1, 4)):
    if not data:
      data += rng.randbytes(rng.randint(1, 8))
      continue
    low, high = hot if hot and rng.random() < 0.5 else (0, len(data))
    pos = rng.randrange(low, min(high, len(data))) if min(high, len(data)) > low else rng.randrange(len(data))
    kind = rng.randrange(7)
    if kind == 0:
      data[pos] ^= 1 << rng.randrange(8)
    elif kind == 1:
      data[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif kind == 2:
      value = rng.choice(INTERESTING_INTS) % 2**32
      data[pos:pos + 4] = value.to_bytes(4, "little")
    elif kind == 3:
      data[pos:pos] = rng.randbytes(rng.randint(1, 8))
    elif kind == 4:
      del data[pos:pos + rng.randint(1, 16)]
    elif kind == 5:
      start = rng.randrange(len(data))
      data[pos:pos] = data[start:start + rng.randint(1, 64)]
    else:
      del data[pos:]
  return bytes(data)


def _mutate_pickle(pickled: bytes, ops: list[tuple[str, int, int]], rng: random.Random) -> bytes:
  """Structure-aware: a new value for an int argument, another global, or another opcode."""
  name, start, end = rng.choice(ops)
  kind = rng.randrange(3)
  if kind == 0 and name in ("BININT1", "BININT2", "BININT", "LONG1"):
    width = {"BININT1": 1, "BININT2": 2, "BININT": 4}.get(name)
    value = rng.choice(INTERESTING_INTS + [rng.randrange(-2**40, 2**40)])
    if width is None:
      encoded = pickle.encode_long(value)
      arg = bytes([len(encoded)]) + encoded
    else:
      arg = (value % 2**(8 * width)).to_bytes(width, "little")
    return pickled[:start + 1] + arg + pickled[end:]
  if kind == 1 and name == "GLOBAL":
    return pickled[:start + 1] + rng.choice(GLOBALS) + pickled[end:]
  return pickled[:start] + rng.choice(OPCODES) + pickled[start + 1:]


class _Seed:
  """A checkpoint to mutate: its zip entries, its bytes, and the opcodes of its data.pkl."""

  def __init__(self, name: str, entries: list[tuple[str, bytes]]):
    self.name = name
    self.entries = entries
    self.data = _zip(entries)
    self.pickle_index = next(i for i, (n, _) in enumerate(entries) if n.endswith("/data.pkl"))
    pickled = entries[self.pickle_index][1]
    positions = [(op.name, pos) for op, _, pos in pickletools.genops(pickled)] + [("END", len(pickled))]
    self.ops = [(name, pos, positions[i + 1][1]) for i, (name, pos) in enumerate(positions[:-1])]
    with zipfile.ZipFile(io.BytesIO(self.data)) as archive:
      self.directory = (archive.start_dir, len(self.data))  # where the zip's own structure lies


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
  """The zip of `entries`, the same bytes on every run (a fixed timestamp), so that an input can be replayed."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    for name, data in entries:
      archive.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
  return buffer.getvalue()


def _make_input(seed: _Seed, rng: random.Random) -> tuple[str, bytes]:
  strategy = rng.choices(["file", "pickle_bytes", "pickle_ops", "records"], weights=[25, 30, 30, 15])[0]
  if strategy == "file":
    return strategy, _mutate_bytes(seed.data, rng, hot=seed.directory)
  entries = list(seed.entries)
  name, pickled = entries[seed.pickle_index]
  if strategy == "pickle_bytes":
    entries[seed.pickle_index] = (name, _mutate_bytes(pickled, rng))
  elif strategy == "pickle_ops":
    for _ in range(rng.randint(1, 3)):
      pickled = _mutate_pickle(pickled, seed.ops, rng)
    entries[seed.pickle_index] = (name, pickled)
  else:
    index = rng.randrange(len(entries))
    record, data = entries[index]
    kind = rng.randrange(4)
    if kind == 0:
      del entries[index]
    elif kind == 1:
      entries[index] = (record, data[:rng.randrange(len(data) + 1)] + rng.randbytes(rng.choice([0, 1, 3, 4])))
    elif kind == 2:
      renamed = _mutate_bytes(record.encode(), rng).decode("utf-8", "replace")
      if not zipfile.ZipInfo(renamed).filename:  # zipfile cuts names at NUL and strips "/"; it needs one left
        renamed = "_" + renamed
      entries[index] = (renamed, data)
    else:
      entries[index] = (record, rng.choice([b"big", b"little\n", b"\xff\xfe", _mutate_bytes(data, rng)]))
  return strategy, _zip(entries)


def _peak_rss_mb() -> float:
  """This process's peak resident memory, MB: VmHWM of /proc/self/status on Linux, since ru_maxrss carries the
  maximum of the process it was forked from (a pytest process with JAX loaded starts its children at ~500 MB)."""
  try:
    with open("/proc/self/status", encoding="ascii") as status:
      for line in status:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fuzz(inputs: int, seed: int, out: pathlib.Path) -> dict:
  """The child's loop: the summary, with each failure's input saved under `out`."""
  sys.path.insert(0, str(ROOT))
  import checkpoint_forge as forge  # pylint: disable=import-outside-toplevel
  from urisc_jax.models import torch_import  # pylint: disable=import-outside-toplevel

  with zipfile.ZipFile(FIXTURE) as archive:
    fixture = [(info.filename, archive.read(info)) for info in archive.infolist()]
  genuine = forge.checkpoint_entries(forge.dumps({"w": forge.tensor(forge.storage("FloatStorage", "0", 2), 0, (2,),
                                                                       (1,))}),
                                     {"0": forge.GENUINE_VALUES.astype("<f4").tobytes()})
  seeds = [_Seed("cem500k_fixture", fixture), _Seed("sample_little", forge.sample_checkpoint("little")[0]),
           _Seed("sample_big", forge.sample_checkpoint("big")[0]), _Seed("genuine", genuine)]
  baseline = _peak_rss_mb()
  out.mkdir(parents=True, exist_ok=True)
  path = out / "input.pth"
  outcomes = collections.Counter()
  failures = []
  slowest = 0.0
  signal.signal(signal.SIGALRM, _on_alarm)
  start = time.perf_counter()
  for i in range(inputs):
    rng = random.Random(f"{seed}:{i}")
    chosen = rng.choices(seeds, weights=[30, 25, 15, 30])[0]
    strategy, data = _make_input(chosen, rng)
    path.write_bytes(data)
    (out / "current.txt").write_text(f"{i} {chosen.name} {strategy}\n")  # names the input if the child crashes
    began = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_INPUT)
    problem = None
    try:
      torch_import.read_checkpoint(path)
      outcomes["loaded"] += 1
    except torch_import.CheckpointError as e:
      outcomes[type(e).__name__] += 1
      if str(path) not in str(e):
        problem = f"the message does not name the file: {e}"
    except _Hang:
      problem = f"no answer within {SECONDS_PER_INPUT} s"
    except BaseException:  # pylint: disable=broad-except  # exactly what the fuzz looks for
      problem = traceback.format_exc(limit=-6)
    finally:
      signal.setitimer(signal.ITIMER_REAL, 0)
    slowest = max(slowest, time.perf_counter() - began)
    if problem:
      saved = out / f"failure_{i}.pth"
      saved.write_bytes(data)
      failures.append({"input": i, "seed": chosen.name, "strategy": strategy, "file": str(saved),
                       "problem": problem[-2000:]})
  refused = sum(n for kind, n in outcomes.items() if kind != "loaded")
  return {"tried": inputs, "seed": seed, "loaded": outcomes["loaded"], "refused": refused,
          "outcomes": dict(outcomes), "failures": failures, "seconds": round(time.perf_counter() - start, 1),
          "slowest_input_s": round(slowest, 3), "baseline_rss_mb": round(baseline),
          "peak_rss_mb": round(_peak_rss_mb())}


def test_fuzzed_checkpoints_load_or_are_refused(tmp_path):
  inputs = int(os.environ.get("URISC_FUZZ_INPUTS", "1000"))
  seed = int(os.environ.get("URISC_FUZZ_SEED", "0"))
  command = [sys.executable, __file__, "--inputs", str(inputs), "--seed", str(seed), "--out", str(tmp_path)]
  try:
    child = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120 + inputs, check=False)
  except subprocess.TimeoutExpired:
    pytest.fail(f"the fuzz hung; the input in progress: {(tmp_path / 'current.txt').read_text()}")
  current = (tmp_path / "current.txt").read_text() if (tmp_path / "current.txt").exists() else "?"
  assert child.returncode == 0, (f"the fuzz child died (status {child.returncode}) on input {current} "
                                 f"(file {tmp_path / 'input.pth'}):\n{child.stderr[-3000:]}")
  summary = json.loads(child.stdout.strip().splitlines()[-1])
  print(f"fuzz: {summary['tried']} inputs (seed {seed}): {summary['loaded']} loaded, {summary['refused']} refused "
        f"{summary['outcomes']}; {summary['seconds']} s, slowest {summary['slowest_input_s']} s; peak RSS "
        f"{summary['peak_rss_mb']} MB (baseline {summary['baseline_rss_mb']} MB)")
  assert not summary["failures"], json.dumps(summary["failures"][:5], indent=1)
  assert summary["tried"] == inputs and summary["loaded"] + summary["refused"] == inputs
  assert summary["loaded"] and summary["refused"], "the mutations should both keep some files valid and break some"
  assert summary["peak_rss_mb"] - summary["baseline_rss_mb"] < PEAK_RSS_RISE_BOUND_MB, summary


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--inputs", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args()
  print(json.dumps(fuzz(args.inputs, args.seed, args.out)))
else:
  import pytest  # only the test needs pytest; the child does not import it
