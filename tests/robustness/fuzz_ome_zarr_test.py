"""Seeded mutation fuzz of OME-Zarr metadata through the volume input reader, `volumes.open_input`.

A small OME-Zarr image (two levels, [2, 40, 50] and [2, 20, 25]) is written as zarr v2 with OME-NGFF 0.4 `.zattrs`
and as zarr v3 with OME-NGFF 0.5 `zarr.json`, beside another image outside the group and a symlink inside it that
leads there. Each mutant rewrites the group's metadata file: byte-level (bits flipped, bytes overwritten, inserted,
deleted or duplicated, the file cut short, deep nesting) or JSON-structural (a value replaced by one of another type
or range, a key or list item removed, added, renamed or duplicated, a container emptied or wrapped). Every mutant
must open as one of the image's own levels (shape, pixels, positive finite pixel sizes) or raise the reader's
documented error (volumes.VolumeError, an imageio.DataError: exit 2 with one line) naming the image, within a time
limit and a memory bound; never another exception, a hang or a read outside the group.

  URISC_FUZZ_OME_INPUTS  mutants per format (zarr v2, zarr v3); default 500, ~10 s on 2 cores.
  URISC_FUZZ_SEED        default 0. Mutant i is reproducible alone: its generator is seeded with (seed, i, format).

The loop runs in a child process (this file run as a script) so that its peak memory can be measured on its own.
"""

import copy
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from tests.robustness.fuzz_images_test import peak_rss_kb  # pylint: disable=wrong-import-position

DEFAULT_INPUTS = 500
SECONDS_PER_OPEN = 10  # an open slower than this counts as a hang
# The reader reads metadata of at most volumes.MAX_METADATA_BYTES and opens arrays lazily; the mutants are a few
# KB. What one open may add to the peak is the TensorStore chunk cache (volumes.INPUT_CACHE_BYTES, 64 MB, of which
# these arrays fill 4 KB) and the parsed metadata; the bound leaves room for allocator noise.
PEAK_RSS_RISE_BOUND_MB = 100
LEVELS = {"0": (2, 40, 50), "1": (2, 20, 25)}
INTERESTING = [None, True, False, 0, -1, 1, 2, 3, 4, 0.5, -0.0, 1e308, 5e-324, float("nan"), float("inf"),
               -float("inf"), 2 ** 63, 10 ** 30, "", "0", "1", "9", ".", "..", "./0", "0/..", "../other.zarr/0",
               "/", "link", "0/.zarray", "nanometer", "angstrom", "\u00b5m", "furlong", "second", "c", "channel", "x",
               "y", "z", "space", "time", "scale", "translation", "identity", [], {}, [1, 1, 1], [1.0, 2.0],
               [40.0, 4.0, 4.0], ["4"], [0, 0, 0], [{}], {"type": "scale"}, {"type": "scale", "scale": [1, 2, 3]},
               {"name": "c", "type": "channel"}, {"path": "1"}, [{"path": "0"}], "\udcff"]
KEY_NAMES = ["multiscales", "datasets", "path", "axes", "coordinateTransformations", "scale", "type", "unit", "name",
             "version", "ome", "attributes", "node_type", "Datasets", "path ", ""]


def _write_seed(root: pathlib.Path, rng: np.random.Generator) -> dict:
  """The two OME-Zarr images and their level data; returns {format: (group, metadata file, original bytes)}."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  data = {name: rng.integers(0, 256, shape, dtype=np.uint8) for name, shape in LEVELS.items()}
  other = root / "other.zarr" / "0"
  seeds = {}
  for fmt, driver in (("v2", "zarr"), ("v3", "zarr3")):
    group = root / f"{fmt}.zarr"
    for name, array in data.items():
      metadata = ({"shape": list(array.shape), "chunks": [1, 16, 16], "dtype": "|u1"} if driver == "zarr" else
                  {"shape": list(array.shape), "data_type": "uint8",
                   "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, 16, 16]}}})
      ts.open({"driver": driver, "kvstore": {"driver": "file", "path": str(group / name)}, "metadata": metadata},
              create=True).result().write(array).result()
    axes = [{"name": "z", "type": "space", "unit": "nanometer"}, {"name": "y", "type": "space", "unit": "nanometer"},
            {"name": "x", "type": "space", "unit": "nanometer"}]
    datasets = [{"path": name, "coordinateTransformations": [{"type": "scale", "scale": [40.0, 4.0 * 2 ** k, 4.0 *
                                                                                            2 ** k]},
                                                             {"type": "translation", "translation": [0, 0, 0]}]}
                for k, name in enumerate(LEVELS)]
    multiscales = [{"version": "0.4", "name": "em", "axes": axes, "datasets": datasets, "type": "mean"}]
    if fmt == "v2":
      (group / ".zgroup").write_text('{"zarr_format": 2}')
      source, attrs = group / ".zattrs", {"multiscales": multiscales}
    else:
      source = group / "zarr.json"
      multiscales[0].pop("version")
      attrs = {"zarr_format": 3, "node_type": "group", "attributes": {"ome": {"version": "0.5",
                                                                              "multiscales": multiscales}}}
    (group / "link").symlink_to(other, target_is_directory=True)
    original = json.dumps(attrs, indent=1).encode()
    source.write_bytes(original)
    seeds[fmt] = (group, source, original)
  if not other.exists():
    ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(other)},
             "metadata": {"shape": [2, 40, 50], "chunks": [1, 16, 16], "dtype": "|u1"}},
            create=True).result().write(np.full((2, 40, 50), 7, np.uint8)).result()
  return seeds, data


def _nodes(value, path=()):
  """(path, value) of every node of a JSON tree, root first."""
  yield path, value
  if isinstance(value, dict):
    for k, v in value.items():
      yield from _nodes(v, (*path, k))
  elif isinstance(value, list):
    for i, v in enumerate(value):
      yield from _nodes(v, (*path, i))


def _pick(rng, items):
  return items[int(rng.integers(0, len(items)))]


def mutate_json(tree, rng: np.random.Generator) -> tuple[object, list[str]]:
  """1-3 structural mutations of a parsed JSON tree; returns the mutant and what was done."""
  tree = copy.deepcopy(tree)
  done = []
  for _ in range(int(rng.integers(1, 4))):
    nodes = list(_nodes(tree))
    path, node = _pick(rng, nodes)
    op = int(rng.integers(0, 7))
    value = copy.deepcopy(_pick(rng, INTERESTING))
    if not path or op == 0:  # replace the node
      if path:
        parent = _parent(tree, path)
        parent[path[-1]] = value
      else:
        tree = value
      done.append(f"set {list(path)} = {value!r}")
      continue
    parent = _parent(tree, path)
    if op == 1:
      del parent[path[-1]]
      done.append(f"delete {list(path)}")
    elif op == 2 and isinstance(node, dict):
      key = _pick(rng, KEY_NAMES)
      node[key] = value
      done.append(f"add {list(path)}[{key!r}] = {value!r}")
    elif op == 2 and isinstance(node, list):
      node.insert(int(rng.integers(0, len(node) + 1)), value)
      done.append(f"insert {value!r} into {list(path)}")
    elif op == 3 and isinstance(parent, dict):
      key = _pick(rng, KEY_NAMES)
      parent[key] = parent.pop(path[-1])
      done.append(f"rename {list(path)} to {key!r}")
    elif op == 4 and isinstance(parent, list):
      parent.insert(path[-1], copy.deepcopy(node))
      done.append(f"duplicate {list(path)}")
    elif op == 5:
      parent[path[-1]] = [node]
      done.append(f"wrap {list(path)} in a list")
    else:
      parent[path[-1]] = type(node)() if isinstance(node, (dict, list)) else value
      done.append(f"empty or set {list(path)}")
  return tree, done


def _parent(tree, path):
  for key in path[:-1]:
    tree = tree[key]
  return tree


def mutate_bytes(data: bytes, rng: np.random.Generator) -> tuple[bytes, list[str]]:
  """1-4 byte-level mutations of a metadata file."""
  data = bytearray(data)
  done = []
  for _ in range(int(rng.integers(1, 5))):
    if not data:
      break
    at = int(rng.integers(0, len(data)))
    op = int(rng.integers(0, 8))
    if op == 0:
      bit = int(rng.integers(0, 8))
      data[at] ^= 1 << bit
      done.append(f"flip bit {bit} at {at}")
    elif op == 1:
      value = _pick(rng, b'{}[]",:0-.e9 \\\x00\xff')
      data[at] = value
      done.append(f"byte {value} at {at}")
    elif op == 2:
      insert = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
      data[at:at] = insert
      done.append(f"insert {len(insert)} bytes at {at}")
    elif op == 3:
      size = int(rng.integers(1, 17))
      del data[at:at + size]
      done.append(f"delete {size} bytes at {at}")
    elif op == 4:
      del data[at:]
      done.append(f"truncate at {at}")
    elif op == 5:
      size = int(rng.integers(1, 65))
      piece = data[at:at + size]
      to = int(rng.integers(0, len(data) + 1))
      data[to:to] = piece
      done.append(f"copy {len(piece)} bytes from {at} to {to}")
    elif op == 6:
      depth = int(rng.integers(1000, 200_000))
      data[at:at] = b"[" * depth + b"]" * depth
      done.append(f"nest {depth} lists at {at}")
    else:
      digits = b"1" + b"0" * int(rng.integers(10, 6000))
      data[at:at] = digits
      done.append(f"insert a {len(digits)}-digit number at {at}")
  return bytes(data), done


class _Hang(BaseException):
  pass


def _on_alarm(signum, frame):
  raise _Hang(f"open took more than {SECONDS_PER_OPEN} s")


def _check_read(volume, data: dict, volumes) -> str | None:
  """None when the volume is one of the image's own levels, read right; else what is wrong."""
  for name, array in data.items():
    if volume.shape == array.shape:
      window = volumes.SectionReader(volume).read(1, slice(0, 9), slice(0, 9))
      if not np.array_equal(window, array[1, :9, :9]):
        return f"pixels of shape {volume.shape} are not those of level {name}"
      break
  else:
    return f"opened shape {volume.shape}, not a level of the image"
  if not all(isinstance(s, float) and np.isfinite(s) and s > 0 for s in volume.scale):
    return f"pixel sizes {volume.scale}"
  if not all(isinstance(u, str) for u in volume.units):
    return f"units {volume.units}"
  return None


def fuzz(inputs: int, seed: int, out_dir: pathlib.Path) -> dict:
  """Runs the fuzz loop in this process; returns counts, failures and peak memory."""
  from urisc_jax import volumes  # pylint: disable=g-import-not-at-top
  from urisc_jax.data import imageio  # pylint: disable=g-import-not-at-top

  seeds, data = _write_seed(out_dir, np.random.default_rng(12345))
  for fmt, (group, _, _) in seeds.items():  # the unmutated images read right
    assert _check_read(volumes.open_input(str(group)), data, volumes) is None, fmt
  baseline_kb = peak_rss_kb()
  counts = {fmt: {"read": 0, "refused": 0, "byte": 0, "json": 0} for fmt in seeds}
  failures, slowest = [], (0.0, "")
  signal.signal(signal.SIGALRM, _on_alarm)
  for fmt, (group, source, original) in seeds.items():
    tree = json.loads(original)
    for i in range(inputs):
      rng = np.random.default_rng([seed, i, fmt == "v3"])
      if rng.random() < 0.5:
        mutant, done = mutate_bytes(original, rng)
        counts[fmt]["byte"] += 1
      else:
        mutated, done = mutate_json(tree, rng)
        mutant = json.dumps(mutated).encode("utf-8", "surrogateescape")
        counts[fmt]["json"] += 1
      source.write_bytes(mutant)
      start = time.perf_counter()
      signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_OPEN)
      problem = None
      try:
        problem = _check_read(volumes.open_input(str(group)), data, volumes)
        counts[fmt]["read"] += problem is None
      except imageio.DataError as e:
        message = str(e)
        if str(group) not in message:
          problem = f"{type(e).__name__} does not name the image {group}: {message[:300]}"
        elif "\n" in message:
          problem = f"a message of several lines: {message[:300]}"
        counts[fmt]["refused"] += problem is None
      except BaseException as e:  # pylint: disable=broad-except
        problem = f"{type(e).__name__}: {str(e)[:300]}"
      finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
      slowest = max(slowest, (time.perf_counter() - start, f"{fmt} {i}"))
      if problem:
        keep = out_dir / f"failure_{fmt}_{i}_{source.name}"
        keep.write_bytes(mutant)
        failures.append({"format": fmt, "input": i, "mutations": done, "problem": problem, "kept": str(keep)})
    source.write_bytes(original)
  return {"inputs_per_format": inputs, "seed": seed, "counts": counts, "failures": failures,
          "baseline_kb": baseline_kb, "peak_kb": peak_rss_kb(), "slowest_open_s": round(slowest[0], 3),
          "slowest_open": slowest[1]}


def test_fuzz_ome_zarr_metadata_reads_or_refuses(tmp_path):
  inputs = int(os.environ.get("URISC_FUZZ_OME_INPUTS", DEFAULT_INPUTS))
  seed = int(os.environ.get("URISC_FUZZ_SEED", 0))
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
  start = time.perf_counter()
  # The time limit covers a hang in C code, which the per-open alarm cannot interrupt.
  child = subprocess.run([sys.executable, __file__, str(inputs), str(seed), str(tmp_path)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120 + 0.2 * inputs, check=False)
  assert child.returncode == 0, child.stderr[-5000:]
  report = json.loads(child.stdout.strip().splitlines()[-1])
  took = time.perf_counter() - start
  for fmt, c in report["counts"].items():
    print(f"fuzz OME-Zarr {fmt}: {inputs} mutants (seed {seed}; {c['byte']} byte-level, {c['json']} structural): "
          f"read {c['read']}, refused {c['refused']}")
  print(f"fuzz OME-Zarr: {took:.1f} s, slowest open {report['slowest_open_s']} s ({report['slowest_open']}), peak "
        f"RSS {report['peak_kb'] / 1024:.0f} MB (after setup {report['baseline_kb'] / 1024:.0f} MB)")
  assert not report["failures"], json.dumps(report["failures"][:10], indent=1)
  for c in report["counts"].values():
    assert c["read"] + c["refused"] == inputs
    assert c["read"] and c["refused"]  # both outcomes happen: the mutants neither all break nor all pass
  assert report["peak_kb"] - report["baseline_kb"] < PEAK_RSS_RISE_BOUND_MB * 1024, report


if __name__ == "__main__":
  result = fuzz(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))
  print(json.dumps(result))
