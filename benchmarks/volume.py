"""Blockwise volume prediction: throughput, I/O share and per-worker peak memory with 1 and 2 Dask workers, and the
same volume through the in-memory whole-image prediction.

  nice python -m benchmarks.volume                # 4 x 9958 x 9959 (Track 1 sections): many minutes on 2 CPU cores
  python -m benchmarks.volume --quick             # 2 x 2048 x 2048: about a minute

The input is a zarr volume written chunk by chunk from a cheap generator (never whole in memory) into a temporary
folder (--tmp). The model is LinkNet-ResNet18 at --model-width (narrow by default: the benchmark measures the
blockwise machinery and its scaling, not the network) with random weights saved as a checkpoint. Records, one JSON
object per line on stdout:

  {"bench": "volume", "metric": "mpix_per_s", "workers": N, ...}   blockwise, LocalCluster of N worker processes,
      each single-threaded XLA; timed from the first block submitted to the last done (each worker's compile
      included); with io_share (time blocks spent blocked on reading their input and on the previous block's
      write, over read + compute + write, summed over blocks: writes run on each worker's writer thread while the
      next block computes), worker_peak_rss_gib (the largest worker's VmHWM), worker_cores_used (worker CPU
      seconds over wall seconds) and the machine's load average before and after (N workers only scale on N idle
      cores)
  {"bench": "volume", "metric": "mpix_per_s", "mode": "in_memory", ...}   `predict.probabilities` section by
      section in this process (XLA's default threads), each section read whole into memory first; peak RSS of
      this process
  {"bench": "volume", "metric": "speedup", ...}   2 workers over 1 worker
"""

import argparse
import os
import pathlib
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks.json_lines import emit, log


def write_volume(path: pathlib.Path, shape: tuple[int, int, int], chunk: int = 1024) -> None:
  """A uint8 zarr volume of blob-and-noise texture, generated and written one chunk at a time."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
                   "metadata": {"shape": list(shape), "chunks": [1, chunk, chunk], "dtype": "|u1",
                                "compressor": {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 2}}},
                  create=True, delete_existing=True).result()
  for z in range(shape[0]):
    for r in range(0, shape[1], chunk):
      for c in range(0, shape[2], chunk):
        h, w = min(chunk, shape[1] - r), min(chunk, shape[2] - c)
        rng = np.random.default_rng((z, r, c))
        coarse = rng.integers(60, 200, (h // 32 + 2, w // 32 + 2)).astype(np.uint8)
        block = np.repeat(np.repeat(coarse, 32, 0), 32, 1)[:h, :w]
        block = block + rng.integers(0, 40, (h, w), dtype=np.uint8)
        store[z, r:r + h, c:c + w].write(block).result()


def make_run(workdir: pathlib.Path, width: float):
  """A config and a workdir holding a checkpoint of LinkNet-ResNet18 at `width` with random weights."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from configs import default  # pylint: disable=g-import-not-at-top
  from urisc_jax import checkpoint, models, optim, state  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.name, config.model.encoder, config.model.width, config.model.dtype = "linknet", "resnet18", width, \
      "float32"
  config.predict.threshold = 0.5
  model = state.build_model(config.model)
  tx = optim.optimizer_from_config(config.optim, config.train.num_steps)
  initial = models.init_variables(model, (1, 64, 64, 1))
  params = dict(initial["params"], head=dict(initial["params"]["head"], bias=jnp.full((1,), -0.3)))
  saver = checkpoint.Checkpointer(workdir / "checkpoints")
  saver.save(0, state.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=initial["batch_stats"],
                                 opt_state=tx.init(params)))
  saver.close()
  return config


def in_memory(config, workdir: pathlib.Path, volume_path: pathlib.Path) -> dict:
  """Today's whole-image path: each section read into memory, `predict.probabilities`, thresholded."""
  from urisc_jax import predict as predict_lib  # pylint: disable=g-import-not-at-top
  from urisc_jax import state, volumes  # pylint: disable=g-import-not-at-top
  volume = volumes.open_input(str(volume_path))
  reader = volumes.SectionReader(volume)
  model = state.build_model(config.model)
  variables, _, _ = predict_lib.restore_variables(config, workdir, model)
  forward = predict_lib.tile_forward(config, model, variables)
  z, h, w = volume.shape
  read_s = 0.0
  start = time.perf_counter()
  for section in range(z):
    t = time.perf_counter()
    image = reader.read(section, slice(0, h), slice(0, w))
    read_s += time.perf_counter() - t
    probability = predict_lib.probabilities(forward, image, config.predict)
    (probability >= 0.5).mean()
    del probability, image
  seconds = time.perf_counter() - start
  return {"seconds": seconds, "mpix_per_s": z * h * w / 1e6 / seconds, "read_share": read_s / seconds,
          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="4x9958x9959", help="Z x H x W of the volume")
  parser.add_argument("--quick", action="store_true", help="2 x 2048 x 2048")
  parser.add_argument("--workers", default="1,2")
  parser.add_argument("--model-width", type=float, default=1 / 16)
  parser.add_argument("--block", type=int, default=4096)
  parser.add_argument("--chunk", type=int, default=512)
  parser.add_argument("--tile", type=int, default=512)
  parser.add_argument("--halo", type=int, default=64)
  parser.add_argument("--no-in-memory", action="store_true")
  parser.add_argument("--tmp", default=None, help="folder for the volume and outputs (default: a temporary one)")
  args = parser.parse_args()
  shape = (2, 2048, 2048) if args.quick else tuple(int(n) for n in args.shape.split("x"))
  root = pathlib.Path(tempfile.mkdtemp(prefix="volume_bench_", dir=args.tmp))
  from urisc_jax import volume_predict  # pylint: disable=g-import-not-at-top
  try:
    t = time.perf_counter()
    write_volume(root / "in.zarr", shape)
    log(f"wrote {shape} in {time.perf_counter() - t:.1f} s")
    config = make_run(root / "run", args.model_width)
    config.predict.input = str(root / "in.zarr")
    config.predict.tile, config.predict.halo = args.tile, args.halo
    config.predict.volume.block, config.predict.volume.chunk = args.block, args.chunk
    params = {"shape": list(shape), "model": f"linknet_resnet18_w{args.model_width:g}", "tile": args.tile,
              "halo": args.halo, "block": args.block, "chunk": args.chunk, "cpu_count": os.cpu_count()}
    rates = {}
    for workers in (int(n) for n in args.workers.split(",")):
      config.predict.output = str(root / f"out{workers}.zarr")
      with volume_predict.dask_client(workers=workers) as client:
        load_before = os.getloadavg()[0]
        summary = volume_predict.predict_volume(config, root / "run", client=client)
      rates[workers] = summary["mpix_per_s"]
      emit({"bench": "volume", "metric": "mpix_per_s", "value": summary["mpix_per_s"], "unit": "Mpix/s",
            "workers": workers, "seconds": summary["seconds"], "io_share": summary["io_share"],
            "read_s": summary["read_s"], "compute_s": summary["compute_s"], "write_s": summary["write_s"],
            "worker_peak_rss_gib": summary["worker_peak_rss_gib"], "blocks": summary["blocks"],
            # CPU cores the workers really had, on average: worker CPU seconds over wall seconds.
            "worker_cores_used": summary["worker_cpu_s"] / summary["seconds"],
            # The machine's 1-minute load before and after: on shared cores, N workers get fewer than N cores.
            "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0], **params})
      shutil.rmtree(root / f"out{workers}.zarr")
    if 1 in rates and 2 in rates:
      emit({"bench": "volume", "metric": "speedup", "value": rates[2] / rates[1], "unit": "x", "workers": "2/1",
            **params})
    if not args.no_in_memory:
      load_before = os.getloadavg()[0]
      result = in_memory(config, root / "run", root / "in.zarr")
      emit({"bench": "volume", "metric": "mpix_per_s", "value": result["mpix_per_s"], "unit": "Mpix/s",
            "mode": "in_memory", "seconds": result["seconds"], "read_share": result["read_share"],
            "peak_rss_gib": result["peak_rss_gib"], "load_avg_before": load_before,
            "load_avg_after": os.getloadavg()[0], **params})
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
