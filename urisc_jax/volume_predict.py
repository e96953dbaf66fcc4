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
`config.predict.dask.retries` times. OUT.zarr/.blocks/run.json records what the blocks were computed with; a rerun
with other settings, model step or input is refused rather than mixed in.

On the CPU each worker runs XLA single-threaded (`worker_env`): N workers on N cores then run side by side
instead of fighting over the same cores.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import resource
import threading
import time
import urllib.parse
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from urisc_jax import blockwise, inference, multihost, outputs, resolution, volumes
from urisc_jax.volumes import VolumeError

MARKERS = ".blocks"
RUN_FILE = "run.json"
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
  outputs.write_text(marker_path(out.path, z, block), json.dumps({"z": z, **dataclasses.asdict(block),
                                                                  "run": key}) + "\n")
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


def _run_record(job: VolumeJob, step: int, settings: dict) -> dict:
  return {"input": job.volume.spec, "shape": list(job.volume.shape), "model": job.model, "step": step,
          "threshold": job.threshold, "mean": job.mean, "std": job.std, "predict": job.predict, **settings}


def _check_run_record(out_path: pathlib.Path, record: dict) -> None:
  """Writes OUT.zarr/.blocks/run.json, or refuses a rerun into it with different settings (names the keys)."""
  path = out_path / MARKERS / RUN_FILE
  record = json.loads(json.dumps(record))  # tuples -> lists, as stored
  if path.exists():
    stored = json.loads(path.read_text())
    differ = sorted(k for k in set(stored) | set(record) if stored.get(k) != record.get(k))
    if differ:
      raise VolumeError(f"{out_path} holds blocks of another prediction (it differs in: {', '.join(differ)}); "
                        "remove it, or pass another --config.predict.output, rather than mixing the two.")
    return
  outputs.write_json(path, record)


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
  out_path = pathlib.Path(pc.output or workdir / "predictions.zarr")
  vc = pc.volume
  if vc.chunk % 2 ** (vc.levels - 1):
    raise VolumeError(f"config.predict.volume.chunk={vc.chunk} must be a multiple of 2^(levels - 1) = "
                      f"{2 ** (vc.levels - 1)} so that every pyramid level keeps whole chunks.")
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
  out = volumes.create_output(out_path, volume, chunk=vc.chunk, levels=vc.levels, dtype=vc.dtype)
  tiling = {k: pc.get(k) for k in ("tile", "step", "blend", "halo", "batch_size", "tta")}
  settings = {"block": vc.block, "chunk": vc.chunk, "levels": vc.levels, "dtype": vc.dtype}
  job = VolumeJob(key="", volume=volume, out=out, model=config.model.to_dict(), predict=tiling, mean=float(mean),
                  std=float(std), threshold=float(threshold), plan=blockwise.section_plan(section, pc))
  record = _run_record(job, step, settings)
  digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
  job = dataclasses.replace(job, key=f"{out_path.resolve()}:{digest}")
  _check_run_record(out_path, record)
  work = [(z, b) for z in range(volume.shape[0]) for b in blocks]
  todo = [(z, b) for z, b in work if not marker_path(out_path, z, b).exists()]
  summary = {"output": str(out_path), "shape": list(volume.shape), "blocks": len(work),
             "skipped": len(work) - len(todo), "computed": 0, "pixels": 0, "seconds": 0.0, "read_s": 0.0,
             "compute_s": 0.0, "write_s": 0.0, "redone": 0, "threshold": float(threshold), "step": step}
  if not todo:
    return _finish(summary, None)
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
    from distributed import as_completed  # pylint: disable=g-import-not-at-top
    summary["write_busy_s"] = 0.0
    submit = functools.partial(client.submit, run_block, job, weights, retries=pc.dask.retries, pure=False)
    rounds = 0
    with tqdm(total=len(work), initial=summary["skipped"], desc="volume", unit="block") as bar:
      while todo:
        futures = [submit(z, b, key=f"block-{z}-{b.top}-{b.left}-{job.key}-{rounds}") for z, b in todo]
        try:
          for future in as_completed(futures):
            timings = future.result()
            summary["computed"] += rounds == 0
            for key in ("pixels", "read_s", "compute_s", "write_s"):
              summary[key] += timings[key]
            bar.update(rounds == 0)
            if on_block is not None:
              on_block(summary["computed"], timings)
        finally:
          # A driver that stops (an error, Ctrl-C) takes its unfinished blocks off a cluster that outlives it; the
          # finished ones are released too, so that a lost worker's results are not computed again behind our back.
          client.cancel(futures)
        flushed = client.run(flush_writes)
        summary["write_busy_s"] += sum(f["write_busy_s"] for f in flushed.values())
        errors = [e for f in flushed.values() for e in f["errors"]]
        # A block whose write failed, or whose worker was lost with the write in flight, has no marker: redo it.
        todo = [(z, b) for z, b in todo if not marker_path(out_path, z, b).exists()]
        rounds += 1
        if todo and rounds > pc.dask.retries:
          raise VolumeError(f"{len(todo)} blocks of {out_path} were not written after {rounds} rounds (first: "
                            f"section {todo[0][0]}, {todo[0][1]}; writer errors: {errors[:3]}); rerun to finish them.")
        summary["redone"] += len(todo)
    summary["seconds"] = time.perf_counter() - start
    summary["worker_peak_rss_gib"] = max(client.run(peak_rss_bytes).values()) / 2**30
    # How much CPU the workers got: N workers on N cores that are free use about N x seconds.
    cpu_after = client.run(cpu_seconds)
    summary["worker_cpu_s"] = sum(cpu_after[w] - cpu_before.get(w, 0.0) for w in cpu_after)
  logging.info("volume %s: %d blocks computed, %d skipped", out_path, summary["computed"], summary["skipped"])
  return _finish(summary, out_path)


def _finish(summary: dict, out_path) -> dict:
  busy = summary["read_s"] + summary["compute_s"] + summary["write_s"]
  summary["io_share"] = (summary["read_s"] + summary["write_s"]) / busy if busy else 0.0
  summary["mpix_per_s"] = summary["pixels"] / 1e6 / summary["seconds"] if summary["seconds"] else 0.0
  return summary
