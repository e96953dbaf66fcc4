"""`--mode=predict` on a chunked volume: blocks are Dask tasks, run by a LocalCluster or any Dask cluster.

    python -m urisc_jax.main --mode=predict --config=... --workdir=RUN \
        --config.predict.input=EM.zarr --config.predict.output=OUT.zarr [--config.predict.dask.address=HOST:8786]

Every (section, block) pair of `blockwise.block_grid` is one task (`run_block`). A worker builds and compiles the
model the first time it meets a run and keeps it for every later block of that run (`_worker_state`); the weights
travel once per worker (scattered, broadcast). Blocks write whole chunks of OUT.zarr (see `volumes`), then a marker
OUT.zarr/.blocks/<z>-<top>-<left>, on the worker's writer thread while its next block computes; the driver waits
for the writers at the end and redoes any block left without a marker. A rerun skips blocks whose marker exists, so
a run stopped at any point finishes by computing only what is missing, and a block cut off between its write and
its marker is simply computed again (same values). A worker lost mid-run loses only the blocks it held: the scheduler hands them to
another worker (`distributed.scheduler.allowed-failures` times), and a block that raises is retried
`config.predict.dask.retries` times. OUT.zarr/.blocks/run.json records what the blocks were computed with (the
input's identity too: its metadata files' size and time, a digest of a few windows); a rerun with other settings,
model step or input data is refused rather than mixed in. Each marker carries the run's digest and a fingerprint of
its block's chunk files: a rerun trusts a marker only when both match (a marker of another run is refused, one
whose chunks are missing or changed is dropped and its block computed again).

Nothing is written before every check that can refuse has passed: the output is apart from the input (real paths
compared), holds no symlink, is new, empty or this prediction's, and the volume's block count is within
config.predict.volume.max_blocks. Blocks are planned lazily and submitted a bounded number at a time, so the
driver's memory does not grow with the section count.

On the CPU each worker runs XLA single-threaded (`worker_env`): N workers on N cores then run side by side
instead of fighting over the same cores.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import pathlib
import re
import resource
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator

import numpy as np
from tqdm import tqdm

from urisc_jax import blockwise, config_checks, inference, multihost, outputs, resolution, volumes
from urisc_jax.volumes import VolumeError

MARKERS = ".blocks"
RUN_FILE = "run.json"
_MARKER_NAME = re.compile(r"^(\d+)-(\d+)-(\d+)$")
# config.predict.volume.max_blocks when a config has none: sections x blocks per section a run may declare. Each
# block is one Dask task and one marker; 10^6 blocks of 4096^2 px are 16 Tpx. A declared shape (a sparse zarr's
# [1e8, 64, 64] costs 8 KB on disk) beyond it is refused before anything is planned.
DEFAULT_MAX_BLOCKS = 1_000_000
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


@dataclasses.dataclass(frozen=True)
class VolumeJob:
  """What a worker needs to compute any block of one run (picklable; the weights travel separately).

  Attributes:
    key: identifies the run's model and settings; workers keep one compiled forward per key.
    volume, out: the input and the OME-Zarr output.
    model: config.model as a dict.
    predict: config.predict's tiling keys (tile, step, blend, halo, batch_size, tta) as a dict.
    mean, std: input normalization.
    threshold: probability threshold of the membrane mask.
    plan: the sections' whole-section tiling (every section has the same shape).
  """
  key: str
  volume: volumes.InputVolume
  out: volumes.OutputVolume
  model: dict
  predict: dict
  mean: float
  std: float
  threshold: float
  plan: blockwise.SectionPlan


def marker_path(out_path, z: int, block: blockwise.Block) -> pathlib.Path:
  return pathlib.Path(out_path) / MARKERS / f"{z}-{block.top}-{block.left}"


# --- on a worker ---------------------------------------------------------------------------------------------------

_STATE: dict = {}
_STATE_LOCK = threading.Lock()


def _worker_device():
  """The device this worker drives: on an accelerator host, worker i takes local device i (mod their count)."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.local_devices()
  if devices[0].platform == "cpu":
    return devices[0]
  try:
    from distributed import get_worker  # pylint: disable=g-import-not-at-top
    name = get_worker().name
    index = name if isinstance(name, int) else int(str(name).rsplit("-", 1)[-1])
  except (ValueError, ImportError):
    index = 0
  return devices[index % len(devices)]


def _worker_state(job: VolumeJob, variables) -> dict:
  """This process's (forward, reader, writer) for `job`, built once: the model compiles at its first block."""
  with _STATE_LOCK:
    if job.key not in _STATE:
      import jax  # pylint: disable=g-import-not-at-top
      import ml_collections  # pylint: disable=g-import-not-at-top

      from urisc_jax import state  # pylint: disable=g-import-not-at-top
      for previous in _STATE.values():  # one run at a time per worker: finish and drop the previous run's model
        with contextlib.suppress(Exception):
          _wait_for_pending_write(previous)
        previous["write_thread"].shutdown()
      _STATE.clear()
      model = state.build_model(ml_collections.ConfigDict(job.model))
      device = _worker_device()
      bound = jax.device_put(variables, device)
      forward = inference.make_tile_forward(model, bound, mean=job.mean, std=job.std, tta=job.predict["tta"])
      _STATE[job.key] = {"forward": lambda tiles: forward(jax.device_put(tiles, device)),
                         "reader": volumes.SectionReader(job.volume), "writer": volumes.OutputWriter(job.out),
                         "write_thread": concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="block-write"),
                         "pending": None, "write_busy_s": 0.0}
    return _STATE[job.key]


def _write_block(state: dict, out: volumes.OutputVolume, key: str, z: int, block: blockwise.Block,
                 stored: np.ndarray, mask: np.ndarray) -> None:
  """Writes a block's chunks (every level), then its marker: the marker exists only once the data is durable."""
  start = time.perf_counter()
  state["writer"].write(z, block.top, block.left, stored, mask)
  files = volumes.block_chunk_files(out, z, block.top, block.bottom, block.left, block.right)
  outputs.write_text(marker_path(out.path, z, block), json.dumps({
      "z": z, **dataclasses.asdict(block), "run": key, "digest": key.rsplit(":", 1)[-1],
      "chunks": volumes.chunk_fingerprint(out.path, files)}) + "\n")
  state["write_busy_s"] += time.perf_counter() - start


def _wait_for_pending_write(state: dict) -> None:
  """Waits for the previous block's write; its error (if any) is raised here, failing this task (Dask retries it),
  and the block it belonged to is left without a marker, which the driver's final check catches."""
  pending, state["pending"] = state["pending"], None
  if pending is not None:
    pending.result()


def flush_writes() -> dict:
  """On a worker: waits for its last block's write. Returns {"errors": [...], "write_busy_s": seconds the writer
  thread spent writing since the last flush}."""
  errors, busy = [], 0.0
  with _STATE_LOCK:
    for state in _STATE.values():
      try:
        _wait_for_pending_write(state)
      except Exception as e:  # pylint: disable=broad-except  # reported to the driver, which redoes the block
        errors.append(repr(e))
      busy += state["write_busy_s"]
      state["write_busy_s"] = 0.0
  return {"errors": errors, "write_busy_s": busy}


def run_block(job: VolumeJob, variables, z: int, block: blockwise.Block) -> dict:
  """Computes one block of section z and hands it to this worker's writer thread (every pyramid level, then the
  marker); returns its timings. `flush_writes` waits for the last write.

  Returns:
    {"z", "top", "left", "pixels", "read_s", "compute_s", "write_s" (time blocked on the previous block's write),
    "worker_pid"}.
  """
  marker = marker_path(job.out.path, z, block)
  if marker.exists():  # finished by an earlier attempt of this task (e.g. on a worker since lost)
    return {"z": z, "top": block.top, "left": block.left, "pixels": 0, "read_s": 0.0, "compute_s": 0.0,
            "write_s": 0.0, "worker_pid": os.getpid()}
  state = _worker_state(job, variables)
  read_s = 0.0

  def read(rows, cols):
    nonlocal read_s
    t = time.perf_counter()
    window = state["reader"].read(z, rows, cols)
    read_s += time.perf_counter() - t
    return window

  start = time.perf_counter()
  logits = blockwise.predict_block_logits(state["forward"], read, job.plan, block)
  probability = inference.probabilities(logits, out=logits)
  mask = (probability >= np.float32(job.threshold)).astype(np.uint8)
  stored = volumes.quantize_probability(probability, job.out.dtype)
  compute_s = time.perf_counter() - start - read_s
  # The write (compression, pyramid, marker) runs on this worker's writer thread while the next block computes;
  # this task waits only for the previous block's write (at most one block in flight: bounded memory).
  t = time.perf_counter()
  _wait_for_pending_write(state)
  state["pending"] = state["write_thread"].submit(_write_block, state, job.out, job.key, z, block, stored, mask)
  write_s = time.perf_counter() - t
  return {"z": z, "top": block.top, "left": block.left, "pixels": int(np.prod(block.shape)), "read_s": read_s,
          "compute_s": compute_s, "write_s": write_s, "worker_pid": os.getpid()}


def cpu_seconds() -> float:
  """CPU time (user + system) this process and its threads have used."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def peak_rss_bytes(reset: bool = False) -> int:
  """This process's peak resident memory (VmHWM) in bytes; with `reset`, the peak is set back to the current RSS
  afterwards (Linux: /proc/self/clear_refs), so the next call measures from now."""
  with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
  if reset:
    with contextlib.suppress(OSError):
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
  return peak


# --- on the driver -------------------------------------------------------------------------------------------------


def worker_env() -> dict:
  """Environment of LocalCluster workers: on the CPU, one XLA thread each (N workers share N cores instead of each
  spawning N threads); on accelerators, no preallocation of the whole device memory by each worker."""
  env = {"OMP_NUM_THREADS": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  flags = os.environ.get("XLA_FLAGS", "")
  env["XLA_FLAGS"] = f"{flags} {SINGLE_THREAD_XLA}".strip() if SINGLE_THREAD_XLA not in flags else flags
  return env


def default_workers() -> int:
  """One worker per local accelerator, or min(2, cores) on the CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.local_devices()
  if devices[0].platform != "cpu":
    return len(devices)
  return max(1, min(2, os.cpu_count() or 1))


# Address schemes of Dask's comms (distributed.comm.registry): "inproc" is this process only, the others talk to a
# scheduler over the network.
DASK_SCHEMES = ("tcp", "tls", "ucx", "ws", "wss", "inproc")
DASK_ADDRESS_FORMS = ("tcp://HOST:PORT (or HOST:PORT), tls://HOST:PORT, ucx://HOST:PORT, ws:// or wss://HOST:PORT, "
                      "inproc://...")
# How long the driver waits for a Dask scheduler to answer (connect, handshake, first request): config
# predict.dask.timeout_s. distributed bounds the connect alone; its handshake read waits forever on a server that
# accepts and stays silent.
DASK_TIMEOUT_S = 30.0


def dask_address_problem(address: str) -> str | None:
  """Why `address` (config.predict.dask.address) is not a Dask scheduler address, or None when it is one ("" is:
  a local cluster). Checked before any work: distributed would raise a traceback, or wait, only once it connects."""
  if not isinstance(address, str):
    return f"must be a string: \"\" for a local cluster, or {DASK_ADDRESS_FORMS}"
  if not address:
    return None
  scheme, sep, rest = address.partition("://")
  if not sep:
    scheme, rest = "tcp", address
  if scheme not in DASK_SCHEMES:
    return f"unknown scheme {scheme!r}; give {DASK_ADDRESS_FORMS}"
  if scheme == "inproc":
    return None if rest else f"names no inproc address; give {DASK_ADDRESS_FORMS}"
  parsed = urllib.parse.urlsplit(f"//{rest}")
  try:
    port = parsed.port
  except ValueError:
    port = None
  if not parsed.hostname or port is None or not 0 < port < 65536 or parsed.path or parsed.query or parsed.username:
    return f"is not HOST:PORT with a port in 1..65535; give {DASK_ADDRESS_FORMS}"
  return None


async def _dask_handshake(address: str, timeout_s: float) -> None:
  from distributed.comm import connect  # pylint: disable=g-import-not-at-top
  from distributed.security import Security  # pylint: disable=g-import-not-at-top
  comm = await connect(address, timeout=timeout_s, **Security().get_connection_args("client"))
  await comm.close()


def check_dask_scheduler(address: str, timeout_s: float = DASK_TIMEOUT_S) -> None:
  """Raises VolumeError (naming config.predict.dask.address) unless a Dask scheduler at `address` completes Dask's
  handshake within `timeout_s` seconds.

  distributed.Client's own timeout covers the TCP connect and the first request, not the handshake between them:
  a server that accepts and never answers held it forever, and a web server (the dashboard's port, say) answered
  "HTTP/1.1 ..." read as a frame length ("Unable to allocate 3.07 EiB"). This handshake runs first, whole, under
  one deadline, in its own event loop.
  """
  import asyncio  # pylint: disable=g-import-not-at-top
  where = f"config.predict.dask.address={address!r}"
  try:
    asyncio.run(asyncio.wait_for(_dask_handshake(address, timeout_s), timeout_s))
  except TimeoutError as e:  # asyncio's too (Python >= 3.11)
    raise VolumeError(f"no Dask scheduler answered at {where} within {timeout_s:g} s "
                      "(config.predict.dask.timeout_s): check the address and that the scheduler runs and is "
                      "reachable from here (launch/dask_slurm.py starts one), or leave the address empty for a local "
                      "cluster.") from e
  except OSError as e:
    raise VolumeError(f"no Dask scheduler answers at {where} ({e}); start one (see launch/dask_slurm.py), check the "
                      "address, or leave it empty for a local cluster.") from e
  except Exception as e:  # pylint: disable=broad-except  # whatever a non-Dask server's bytes decode to
    # (A web server's "HTTP/1.1 ..." read as a frame length asked for 3 EiB: the cause is the server, not memory.)
    raise VolumeError(f"the server at {where} does not speak Dask's protocol (its answer is not a Dask message): "
                      "give the scheduler's port (8786 by default; 8787 is its dashboard, a web server), or leave "
                      "the address empty for a local cluster.") from e


@contextlib.contextmanager
def dask_client(address: str = "", workers: int = 0, timeout_s: float = DASK_TIMEOUT_S):
  """A distributed.Client: of the cluster at `address`, or of a LocalCluster of `workers` processes (0 = auto).

  Every wait for a scheduler at `address` ends within about `timeout_s` seconds with a VolumeError that names it.
  """
  from distributed import Client, LocalCluster  # pylint: disable=g-import-not-at-top
  # The scheduler and nannies log every worker's start and stop at INFO; keep the console to progress and problems.
  logging.getLogger("distributed").setLevel(logging.WARNING)
  if address:
    problem = dask_address_problem(address)
    if problem:
      raise VolumeError(f"config.predict.dask.address={address!r} {problem}.")
    if not address.startswith("inproc://"):
      check_dask_scheduler(address, timeout_s)
    try:
      # `timeout` bounds the connect, the first request (the scheduler's identity) and the stream's start.
      client = Client(address, timeout=f"{timeout_s}s")
    except OSError as e:  # TimeoutError included
      raise VolumeError(f"no Dask scheduler answers at config.predict.dask.address={address!r} within "
                        f"{timeout_s:g} s ({e}); start one (see launch/dask_slurm.py) or leave the address empty for "
                        "a local cluster.") from e
    with client:
      yield client
    return
  import dask  # pylint: disable=g-import-not-at-top
  # Set before each worker process starts (its logging is configured when it imports distributed).
  quiet = {"distributed.nanny.pre-spawn-environ.DASK_LOGGING__DISTRIBUTED": "warning"}
  with dask.config.set(quiet), LocalCluster(n_workers=workers or default_workers(), threads_per_worker=1,
                                            processes=True, env=worker_env(), dashboard_address=None) as cluster, \
      Client(cluster) as client:
    yield client


def _run_record(job: VolumeJob, step: int, settings: dict, identity: dict) -> dict:
  return {"input": job.volume.spec, "shape": list(job.volume.shape), "model": job.model, "step": step,
          "threshold": job.threshold, "mean": job.mean, "std": job.std, "predict": job.predict,
          "input_identity": identity, **settings}


def input_identity(volume: volumes.InputVolume, locations: list[pathlib.Path]) -> dict:
  """What tells this input's data from other data at the same path, cheaply: the size and modification time of its
  metadata files, and a digest of a few windows (first, middle and last section; corner and centre). Part of the
  run record, so a rerun over input that was rewritten or replaced is refused instead of mixing two inputs' blocks
  (the shape, dtype and chunk layout are in the record's input spec)."""
  files = {}
  for location in locations:
    for name in (".zarray", ".zattrs", "zarr.json", "attributes.json", "info"):
      path = location / name
      if path.is_file():
        stat = path.stat()
        files[str(path)] = [stat.st_size, stat.st_mtime_ns]
  reader = volumes.SectionReader(volume)
  sample = hashlib.sha256()
  depth, height, width = volume.shape
  side = 256
  for z in sorted({0, depth // 2, depth - 1}):
    for top, left in sorted({(0, 0), (max(0, height // 2 - side // 2), max(0, width // 2 - side // 2))}):
      sample.update(reader.read(z, slice(top, min(height, top + side)), slice(left, min(width, left + side))).tobytes())
  return {"files": files, "sample": sample.hexdigest()[:16]}


def block_count(shape: tuple[int, int, int], block: int) -> int:
  """Blocks of a volume of `shape` (Z, H, W): sections x blocks per section, without listing them."""
  return shape[0] * -(-shape[1] // block) * -(-shape[2] // block)


def check_work_size(shape: tuple[int, int, int], block: int, max_blocks: int, name: str) -> int:
  """The block count of the volume, or a refusal (naming the shape and the key that raises the cap) when it exceeds
  config.predict.volume.max_blocks: the shape comes from the file, and a declared [1e8, 64, 64] costs nothing on
  disk but 10^8 tasks and markers."""
  count = block_count(shape, block)
  if count > max_blocks:
    raise VolumeError(f"the input volume {name} has shape {list(shape)}: {count} blocks of {block} x {block} px, "
                      f"more than config.predict.volume.max_blocks={max_blocks}. Predict a sub-volume (a TensorStore "
                      "spec with a transform), raise config.predict.volume.block, or raise "
                      "--config.predict.volume.max_blocks if the volume really is that large.")
  return count


def plan_work(sections: int, blocks: list[blockwise.Block]) -> Iterator[tuple[int, blockwise.Block]]:
  """Every (section, block) of the volume, lazily (the driver never holds the list)."""
  for z in range(sections):
    for block in blocks:
      yield z, block


def marker_name(z: int, block: blockwise.Block) -> str:
  return f"{z}-{block.top}-{block.left}"


def marker_names(out_path) -> set[str]:
  """The names of the block markers present, from one listing of the marker folder (not a stat per block)."""
  try:
    with os.scandir(pathlib.Path(out_path) / MARKERS) as entries:
      return {e.name for e in entries if _MARKER_NAME.match(e.name)}
  except FileNotFoundError:
    return set()


def pending_work(work: Iterator[tuple[int, blockwise.Block]], done: set[str]):
  """The (section, block) pairs of `work` without a marker in `done`, lazily."""
  return ((z, b) for z, b in work if marker_name(z, b) not in done)


def _read_marker(path: pathlib.Path) -> dict | None:
  """A marker's record, or None where it cannot be read whole (truncated, garbled): that block is computed again."""
  try:
    marker = json.loads(path.read_text())
  except (OSError, ValueError, UnicodeDecodeError):
    return None
  return marker if isinstance(marker, dict) and isinstance(marker.get("chunks"), dict) else None


def check_markers(out: volumes.OutputVolume, digest: str, blocks: list[blockwise.Block], sections: int,
                  names: set[str]) -> tuple[set[str], list[str]]:
  """(markers to trust, markers to drop) among `names`: a marker is trusted when it is of this run (its digest) and
  every chunk file of its block is as it recorded (`volumes.chunks_intact`); a marker that cannot be read or whose
  chunks are missing or changed is dropped, and its block computed again. A readable marker of another run
  (other settings, model or input) is refused: its chunks are not this prediction's."""
  by_origin = {(b.top, b.left): b for b in blocks}
  good, bad = set(), []
  for name in names:
    z, top, left = (int(v) for v in _MARKER_NAME.match(name).groups())
    block = by_origin.get((top, left))
    if block is None or z >= sections:
      continue  # not a block of this layout (the run record would have differed)
    marker = _read_marker(pathlib.Path(out.path) / MARKERS / name)
    if marker is None:
      bad.append(name)
      continue
    if marker.get("digest") != digest:
      raise VolumeError(f"{out.path} holds blocks of another prediction ({MARKERS}/{name} was computed with other "
                        "settings, another model or other input data than this run's); pass a new "
                        "--config.predict.output to start over, rather than mixing the two.")
    files = volumes.block_chunk_files(out, z, block.top, block.bottom, block.left, block.right)
    if volumes.chunks_intact(out.path, files, marker["chunks"]):
      good.add(name)
    else:
      bad.append(name)
  return good, bad


def existing_output(out_path: pathlib.Path) -> str:
  """What is at the output path, refusing a folder that is not a prediction's output before anything is written:
  "new" (absent, or an empty folder), "record" (holds a run record: `check_run_record` compares it) or "markers"
  (block markers without their record, which was deleted: `check_markers` compares their digests with this run's).
  Anything else (a user's folder, a file) is refused and left as it is."""
  if not out_path.exists():
    return "new"
  if not out_path.is_dir():
    raise VolumeError(f"--config.predict.output={out_path} is a file, not an output folder; pass a new path "
                      "ending in .zarr.")
  if not any(out_path.iterdir()):
    return "new"
  if (out_path / MARKERS / RUN_FILE).exists():
    return "record"
  if marker_names(out_path):
    return "markers"
  raise VolumeError(f"--config.predict.output={out_path} exists and is not the output of a prediction (it holds no "
                    f"{MARKERS}/{RUN_FILE}); it is left as it is. Pass a new --config.predict.output, or an empty "
                    "folder.")


def check_run_record(out_path: pathlib.Path, record: dict) -> None:
  """Refuses, before anything is written, a rerun into an output whose run record differs from this run's (naming
  the keys; the input's identity among them: the data at the input path changed)."""
  path = out_path / MARKERS / RUN_FILE
  try:
    stored = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise VolumeError(f"the run record {path} cannot be read ({e}); pass a new --config.predict.output to start "
                      "over.") from e
  record = json.loads(json.dumps(outputs.json_safe(record)))  # tuples -> lists, as stored
  differ = sorted(k for k in set(stored) | set(record) if stored.get(k) != record.get(k))
  if "input_identity" in differ:
    raise VolumeError(f"the input data changed since {out_path} was started (its metadata files or sampled "
                      f"content differ from those recorded in {path}; differs in: {', '.join(differ)}): pass a new "
                      "--config.predict.output to start over, rather than mixing two inputs' blocks.")
  if differ:
    raise VolumeError(f"{out_path} holds blocks of another prediction (it differs in: {', '.join(differ)}); "
                      "pass another --config.predict.output (or remove that folder) rather than mixing the two.")


def _check_pixel_size(config, volume: volumes.InputVolume) -> None:
  """Refuses a volume recorded at another pixel size than the training data's (more than 5 % apart).

  Image files are resampled to the training pixel size (`resolution.matched_probabilities`); blocks are predicted at
  the volume's own pixels, so a mismatch would silently degrade every block. The volume's size is
  config.predict.input_pixel_nm or its OME-Zarr y scale; unknown sizes (either side) are taken to match.
  """
  if not config.predict.get("match_resolution", True):
    return
  input_nm = config.predict.get("input_pixel_nm") or resolution.to_nm(volume.scale[1], volume.units[1])
  factor = resolution.scale_factor(input_nm, config.data.get("pixel_nm"))
  if abs(factor - 1.0) > 0.05:
    raise VolumeError(
        f"{config.predict.input} has {input_nm:g} nm pixels, the model was trained at config.data.pixel_nm="
        f"{config.data.pixel_nm:g} nm (a factor {factor:.3g}); blockwise prediction does not resample. Resample "
        f"the volume to {config.data.pixel_nm:g} nm first, or predict it as it is with "
        "--config.predict.match_resolution=False.")


def predict_volume(config, workdir, *, client=None, on_block: Callable[[int, dict], None] | None = None) -> dict:
  """Predicts the volume `config.predict.input` into the OME-Zarr `config.predict.output`, blockwise on Dask.

  Every check that can refuse runs before anything is written: the output is apart from the input (symlinks
  resolved), holds no symlink, is absent, empty or this very prediction's (same settings, model and input data),
  and the volume's block count is within config.predict.volume.max_blocks. Markers whose chunks are missing or
  changed are dropped and their blocks computed again.

  Args:
    config: the run config (model, data normalization, predict incl. predict.volume and predict.dask).
    workdir: the trained run (its latest checkpoint and stored threshold).
    client: a distributed.Client to use; default: config.predict.dask.address, or a LocalCluster.
    on_block: called on the driver as on_block(blocks done in this run, that block's timings) after each block.

  Returns:
    A summary: blocks (total, skipped as already done, computed), pixels, seconds, mpix_per_s, read/compute/write
    seconds summed over blocks, io_share (read + write over their sum with compute), worker_peak_rss_gib, output.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from urisc_jax import postprocess, state  # pylint: disable=g-import-not-at-top
  from urisc_jax import predict as predict_lib  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  pc = config.predict
  if postprocess.is_enabled(pc.get("postprocess")):
    raise VolumeError("config.predict.postprocess works on whole images; a volume is predicted blockwise: set "
                      "config.predict.postprocess.* to 0 for a volume.")
  volume = volumes.open_input(pc.input)
  _check_pixel_size(config, volume)
  # Absolute (workers may run in another folder) and resolved (compared with the input's real location).
  out_path = volumes.output_location(pc.output or workdir / "predictions.zarr")
  locations = volumes.input_locations(pc.input, volume)
  volumes.check_output_apart(out_path, locations)
  vc = pc.volume
  if vc.chunk % 2 ** (vc.levels - 1):
    raise VolumeError(f"config.predict.volume.chunk={vc.chunk} must be a multiple of 2^(levels - 1) = "
                      f"{2 ** (vc.levels - 1)} so that every pyramid level keeps whole chunks.")
  total = check_work_size(volume.shape, vc.block, vc.get("max_blocks", DEFAULT_MAX_BLOCKS), pc.input)
  volumes.refuse_symlinks(out_path)
  existing = existing_output(out_path)
  section = volume.shape[1:]
  blocks = blockwise.block_grid(section, vc.block, chunk=vc.chunk)
  model = state.build_model(config.model)
  variables, step, meta = predict_lib.restore_variables(config, workdir, model)
  mean, std = config.data.mean, config.data.std
  if meta.get("normalization"):
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
  threshold = predict_lib.decision_threshold(config, workdir, step)
  if not multihost.is_writer():  # restored together; process 0 alone writes the output (multihost.process_0_drives)
    return {"output": str(out_path), "driver": 0}
  tiling = {k: pc.get(k) for k in ("tile", "step", "blend", "halo", "batch_size", "tta")}
  # A worker drives one device: a per-device batch is its batch (not the job's global one).
  tiling["batch_size"] = config_checks.local_predict_batch(pc, local_device_count=1)
  settings = {"block": vc.block, "chunk": vc.chunk, "levels": vc.levels, "dtype": vc.dtype}
  # The output's arrays as they will be (nothing is created yet): the markers' chunk files are checked against them.
  planned = volumes.output_volume(out_path, volume, chunk=vc.chunk, levels=vc.levels, dtype=vc.dtype)
  job = VolumeJob(key="", volume=volume, out=planned, model=config.model.to_dict(), predict=tiling,
                  mean=float(mean), std=float(std), threshold=float(threshold),
                  plan=blockwise.section_plan(section, pc))
  record = json.loads(json.dumps(outputs.json_safe(_run_record(job, step, settings,
                                                               input_identity(volume, locations)))))
  digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
  if existing == "record":
    check_run_record(out_path, record)
  done, damaged = check_markers(planned, digest, blocks, volume.shape[0], marker_names(out_path))
  # Every check has passed: from here on the output is written.
  out = volumes.create_output(out_path, volume, chunk=vc.chunk, levels=vc.levels, dtype=vc.dtype, record=record)
  if existing == "markers":  # the record was deleted; the markers showed that the blocks are of this run
    outputs.write_json(out_path / MARKERS / RUN_FILE, record)
  for name in damaged:
    (out_path / MARKERS / name).unlink(missing_ok=True)
  if damaged:
    logging.warning("volume %s: %d block markers had missing or changed chunks; those blocks are computed again",
                    out_path, len(damaged))
  job = dataclasses.replace(job, key=f"{out_path}:{digest}", out=out)
  summary = {"output": str(out_path), "shape": list(volume.shape), "blocks": total, "skipped": len(done),
             "computed": 0, "pixels": 0, "seconds": 0.0, "read_s": 0.0, "compute_s": 0.0, "write_s": 0.0,
             "redone": 0, "damaged": len(damaged), "threshold": float(threshold), "step": step}
  todo = pending_work(plan_work(volume.shape[0], blocks), done)
  first = next(todo, None)
  del done
  if first is None:
    return _finish(summary, None)
  todo = itertools.chain([first], todo)
  host_variables = jax.device_get(variables)
  with contextlib.ExitStack() as stack:
    if client is None:
      client = stack.enter_context(dask_client(pc.dask.address, pc.dask.workers,
                                               pc.dask.get("timeout_s", DASK_TIMEOUT_S)))
    start = time.perf_counter()  # from the first block submitted (each worker's compile included)
    summary["workers"] = len(client.scheduler_info(n_workers=-1)["workers"])
    client.run(peak_rss_bytes, reset=True)
    cpu_before = client.run(cpu_seconds)
    weights = client.scatter(host_variables, broadcast=True, hash=False)
    summary["write_busy_s"] = 0.0
    submit = functools.partial(client.submit, run_block, job, weights, retries=pc.dask.retries, pure=False)
    rounds = 0
    with tqdm(total=total, initial=summary["skipped"], desc="volume", unit="block") as bar:
      while True:

        def done_one(timings, first_round=rounds == 0):
          summary["computed"] += first_round
          for key in ("pixels", "read_s", "compute_s", "write_s"):
            summary[key] += timings[key]
          bar.update(first_round)
          if on_block is not None:
            on_block(summary["computed"], timings)

        submitted = _run_round(client, submit, todo, rounds, job.key, _in_flight(summary["workers"]), done_one)
        summary["redone"] += submitted if rounds else 0
        flushed = client.run(flush_writes)
        summary["write_busy_s"] += sum(f["write_busy_s"] for f in flushed.values())
        errors = [e for f in flushed.values() for e in f["errors"]]
        # A block whose write failed, or whose worker was lost with the write in flight, has no marker: redo it.
        todo = pending_work(plan_work(volume.shape[0], blocks), marker_names(out_path))
        first = next(todo, None)
        if first is None:
          break
        rounds += 1
        if rounds > pc.dask.retries:
          left = 1 + sum(1 for _ in todo)
          raise VolumeError(f"{left} blocks of {out_path} were not written after {rounds} rounds (first: "
                            f"section {first[0]}, {first[1]}; writer errors: {errors[:3]}); rerun to finish them.")
        todo = itertools.chain([first], todo)
    summary["seconds"] = time.perf_counter() - start
    summary["worker_peak_rss_gib"] = max(client.run(peak_rss_bytes).values()) / 2**30
    # How much CPU the workers got: N workers on N cores that are free use about N x seconds.
    cpu_after = client.run(cpu_seconds)
    summary["worker_cpu_s"] = sum(cpu_after[w] - cpu_before.get(w, 0.0) for w in cpu_after)
  logging.info("volume %s: %d blocks computed, %d skipped", out_path, summary["computed"], summary["skipped"])
  return _finish(summary, out_path)


def _in_flight(workers: int) -> int:
  """Blocks submitted at a time: enough to keep every worker busy, few enough that the driver and the scheduler
  hold a bounded number of tasks whatever the volume's size."""
  return max(16, 4 * workers)


def _run_round(client, submit, todo, rounds: int, run_key: str, limit: int, done_one) -> int:
  """Submits the blocks of `todo` (lazily, at most `limit` in flight), calling done_one(timings) as each finishes.
  Returns how many were submitted."""
  from distributed import as_completed  # pylint: disable=g-import-not-at-top
  finished = as_completed()
  live = set()
  submitted = 0

  def top_up():
    nonlocal submitted
    for z, b in itertools.islice(todo, max(0, limit - len(live))):
      future = submit(z, b, key=f"block-{z}-{b.top}-{b.left}-{run_key}-{rounds}")
      live.add(future)
      finished.add(future)
      submitted += 1

  try:
    top_up()
    for future in finished:
      live.discard(future)
      done_one(future.result())
      top_up()
  finally:
    # A driver that stops (an error, Ctrl-C) takes its unfinished blocks off a cluster that outlives it; finished
    # ones are released as their futures go, so that a lost worker's results are not computed again behind our back.
    client.cancel(list(live))
  return submitted


def _finish(summary: dict, out_path) -> dict:
  busy = summary["read_s"] + summary["compute_s"] + summary["write_s"]
  summary["io_share"] = (summary["read_s"] + summary["write_s"]) / busy if busy else 0.0
  summary["mpix_per_s"] = summary["pixels"] / 1e6 / summary["seconds"] if summary["seconds"] else 0.0
  return summary
