"""One accelerator, end to end: does the project run there as shipped, and how fast is it against PyTorch.

    python -m benchmarks.accelerator --peer-python=PEER_PYTHON --peer-script=smp_bench.py   # one GPU: ~8 minutes
    python -m benchmarks.accelerator                                                        # without the peer
    python -m benchmarks.accelerator --smoke --parts=train,whole_image                      # small, on any machine

On a CPU the run is a smoke run unless --full is given: small crops and images, narrow models, configs/tiny.py for
the default run, every line labelled "scale": "smoke". It shows that the benchmark works there, not how fast the
CPU is (benchmarks/train.py, models.py and predict.py measure that).

Parts (--parts, comma-separated; all by default, in this order):
  default_run  `python -m urisc_jax.main --config=configs/default.py` (smoke: configs/tiny.py) in a fresh workdir
               with an empty compilation cache and XLA_FLAGS unset: wall seconds, test F1, train-step compile
               seconds; then the same command in a second fresh workdir, the cache now warm.
  compile      the U-Net-ResNet50 train step (--size, --batch, dtype auto) compiled in a fresh process with an empty
               cache (cold), then in another process with that cache (warm).
  train        train-step Mpix/s of each of --models at --size^2, batch --batch, in each of --dtypes, every
               measurement in a fresh process, with XLA's FLOP count of the step and the model FLOPs utilization
               (MFU: FLOPs / step time / the chip's peak for that dtype, --peak-tflops or the table below). With a
               peer, each measurement alternates with `smp_bench.py train --device cuda --channels-last` (--amp bf16
               for bfloat16, and once more with --compile, the strongest PyTorch baseline).
  forward      the same for inference (eval mode) against `smp_bench.py forward`.
  whole_image  the --image-height x --image-width probability map of U-Net-ResNet50 (dtype auto) in halo mode, as
               --mode=predict computes it (uint8 image in host memory -> float32 probabilities in host memory),
               timed after a warm-up on the same tile shape.

One JSON object per line (progress on stderr): {"bench": "accelerator", "part", "metric", "value", "unit", ...};
"vs_peer" lines give ours / peer per model and dtype.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.json_lines import emit, log, run_and_collect

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PARTS = ("default_run", "compile", "train", "forward", "whole_image")
# Our model name -> the peer's --model / --encoder.
PEER_MODELS = {"unet_resnet50": ("unet", "resnet50"), "linknet_resnet18": ("linknet", "resnet18")}
# Dense peak FLOP/s per chip and compute dtype, from the vendors' data sheets, matched against the device kind.
# float32 convolutions on NVIDIA tensor cores run as TF32, XLA's default precision for float32 there.
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float32": 495e12},
    "H100": {"bfloat16": 989e12, "float32": 495e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},
}
# What --smoke changes.
SMOKE = {"size": 64, "batch": 2, "width": 0.125, "repeats": 1, "image": 1024, "tile": 256, "halo": 32,
         "config": "configs/tiny.py"}
FULL = {"size": 1024, "batch": 8, "width": 1.0, "repeats": 5, "image": None, "tile": 1024, "halo": 128,
        "config": "configs/default.py"}


def _environment() -> dict:
  """The environment of every measured process: XLA_FLAGS unset (the project must be fast without them)."""
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def peak_flops(device_kind: str, dtype: str, override_tflops: float | None) -> float | None:
  """The chip's dense peak FLOP/s for `dtype`, or None where unknown (then no MFU is reported)."""
  if override_tflops:
    return override_tflops * 1e12
  for name, peaks in PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def _value(records: list[dict], metric: str) -> float:
  return next(r["value"] for r in records if r["metric"] == metric)


# --------------------------------------------------------------------------------------------------------- workers


def compile_worker(args) -> None:
  """Compiles the train step of --model with the cache at --cache and prints its seconds and the cache's hits."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from benchmarks import models as model_bench  # pylint: disable=g-import-not-at-top
  from urisc_jax import losses, models, platforms, sharding, train  # pylint: disable=g-import-not-at-top
  from urisc_jax.state import TrainState  # pylint: disable=g-import-not-at-top

  events = []
  jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
  platforms.enable_compilation_cache(args.cache)
  model = model_bench.build_model(args.model, "auto", args.width)
  mesh = sharding.mesh_from_config((("data", -1),))
  variables = models.random_variables(models.abstract_variables(model, (1, args.size, args.size, 1)))
  tx = optax.adam(1e-3)
  state = TrainState(step=np.int32(0), params=variables["params"], batch_stats=variables["batch_stats"],
                     opt_state=tx.init(variables["params"]))
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  state = jax.device_put(state, shardings)
  step = train.make_train_step(model, tx, losses.focal_dice, mean=0.5, std=0.25)
  _, seconds = train.compile_train_step(step, state, shardings, mesh, args.batch, args.size, jax.random.key(0))
  emit({"seconds": seconds, "cache_hits": events.count("/jax/compilation_cache/cache_hits"),
        "dtype": str(model.dtype)})


def whole_image_worker(args) -> None:
  """Predicts a random --image-height x --image-width image as --mode=predict does and prints the time."""
  import jax  # pylint: disable=g-import-not-at-top

  from benchmarks import models as model_bench  # pylint: disable=g-import-not-at-top
  from urisc_jax import inference, models, predict  # pylint: disable=g-import-not-at-top

  model = model_bench.build_model(args.model, "auto", args.width)
  variables = models.random_variables(models.abstract_variables(model, (1, 64, 64, 1)))
  shape = (args.image_height, args.image_width)
  tile = inference.halo_tile(shape, args.tile, args.halo)
  forward = inference.make_tile_forward(model, variables, mean=0.5, std=0.25, mesh=predict.prediction_mesh(args.batch))
  started = time.perf_counter()
  jax.block_until_ready(forward(np.zeros((args.batch, tile, tile, 1), np.uint8)))
  compile_s = time.perf_counter() - started
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  started = time.perf_counter()
  logits = inference.predict_logits(forward, image, tile=tile, batch_size=args.batch, halo=args.halo)
  probability = inference.probabilities(logits, out=logits)
  seconds = time.perf_counter() - started
  assert probability.shape == shape and np.isfinite(probability[::97, ::97]).all()
  tiles = inference.tile_grid(shape, tile, halo=args.halo).num_tiles
  emit({"seconds": seconds, "compile_s": compile_s, "tile": tile, "tiles": tiles, "dtype": str(model.dtype)})


# ----------------------------------------------------------------------------------------------------------- driver


class Runner:
  """Runs the parts, labelling every record with the scale, backend and device."""

  def __init__(self, args, scale: dict, backend: str, device_kind: str):
    self.args, self.scale, self.backend, self.device_kind = args, scale, backend, device_kind
    self.common = {"bench": "accelerator", "scale": "smoke" if args.smoke else "full", "backend": backend,
                   "device": device_kind}

  def emit(self, part: str, metric: str, value, unit: str, **params) -> None:
    emit({**self.common, "part": part, "metric": metric, "value": value, "unit": unit, **params})

  def _collect(self, command: list[str], what: str) -> list[dict]:
    return run_and_collect(command, what=what, cwd=REPO_ROOT, env=_environment(), echo=False)

  def default_run(self, tmp: pathlib.Path) -> None:
    config = self.scale["config"]
    for label in ("cold", "warm"):
      workdir = tmp / f"default_run_{label}"
      command = [sys.executable, "-m", "urisc_jax.main", f"--config={config}", f"--workdir={workdir}",
                 f"--config.compilation_cache={tmp / 'default_run_cache'}"]
      log(f"default run ({label} cache): {' '.join(command)}")
      started = time.perf_counter()
      proc = subprocess.run(command, cwd=REPO_ROOT, env=_environment(), capture_output=True, text=True, check=False)
      wall = time.perf_counter() - started
      if proc.returncode:
        log(proc.stderr[-4000:])
        raise RuntimeError(f"the default run failed with exit status {proc.returncode}")
      metrics = json.loads((workdir / "metrics.json").read_text())
      params = {"config": config, "cache": label}
      self.emit("default_run", "wall_s", round(wall, 2), "s", **params)
      self.emit("default_run", "test_f1", metrics["f1"], "F1", **params)
      self.emit("default_run", "train_step_compile_s", round(metrics["train"]["compile_seconds"]["train_step"], 3),
                "s", **params)

  def compile(self, tmp: pathlib.Path) -> None:
    cache = tmp / "compile_cache"
    for label in ("cold", "warm"):
      command = [sys.executable, "-m", "benchmarks.accelerator", "--worker=compile", f"--cache={cache}",
                 "--model=unet_resnet50", *self._scale_flags()]
      log(f"compiling the U-Net-ResNet50 train step, {label} cache")
      [record] = self._collect(command, "the compile worker")
      self.emit("compile", "train_step_compile_s", round(record["seconds"], 3), "s", model="unet_resnet50",
                cache=label, cache_hits=record["cache_hits"], dtype=record["dtype"], size=self.scale["size"],
                batch=self.scale["batch"])

  def _scale_flags(self) -> list[str]:
    return [f"--size={self.scale['size']}", f"--batch={self.scale['batch']}", f"--width={self.scale['width']}"]

  def _ours(self, part: str, model: str, dtype: str) -> dict:
    size, batch, width, repeats = (self.scale[k] for k in ("size", "batch", "width", "repeats"))
    if part == "train":
      command = [sys.executable, "-m", "benchmarks.train", "--worker", f"--models={model}", f"--sizes={size}",
                 f"--batch={batch}", f"--repeats={repeats}", f"--dtype={dtype}", f"--width={width}"]
    else:
      command = [sys.executable, "-m", "benchmarks.models", f"--model={model}", "--bench=forward", f"--size={size}",
                 f"--batch={batch}", f"--repeats={repeats}", f"--dtype={dtype}", f"--width={width}"]
    log(f"measuring {part} of {model} in {dtype}")
    records = self._collect(command, f"the {part} measurement of {model}")
    return {metric: _value(records, metric) for metric in ("mpix_per_s", "median_s", "compile_s", "flops_per_call")}

  def _peer(self, part: str, model: str, dtype: str, compiled: bool) -> float:
    family, encoder = PEER_MODELS[model]
    command = [self.args.peer_python, self.args.peer_script, part, "--model", family, "--encoder", encoder,
               "--size", str(self.scale["size"]), "--batch", str(self.scale["batch"]), "--channels-last",
               "--device", "cuda" if self.backend == "gpu" else "cpu", "--iters", str(self.scale["repeats"])]
    if dtype == "bfloat16":
      command += ["--amp", "bf16"]
    if compiled:
      command.append("--compile")
    log(f"measuring the peer's {part} of {model} in {dtype}{' with torch.compile' if compiled else ''}")
    return _value(run_and_collect(command, what=" ".join(command), env=_environment(), echo=False), "mpix_per_s")

  def speed(self, part: str) -> None:
    with_peer = bool(self.args.peer_python)
    for model in self.args.models.split(","):
      for dtype in self.args.dtypes.split(","):
        ours, peers = [], {}
        for _ in range(self.args.rounds):
          ours.append(self._ours(part, model, dtype))
          if with_peer and model in PEER_MODELS:
            peers.setdefault("eager", []).append(self._peer(part, model, dtype, compiled=False))
            if dtype == "bfloat16" and not self.args.no_peer_compile:
              peers.setdefault("torch.compile", []).append(self._peer(part, model, dtype, compiled=True))
        mpix = statistics.median(r["mpix_per_s"] for r in ours)
        median_s = statistics.median(r["median_s"] for r in ours)
        params = {"model": model, "dtype": dtype, "size": self.scale["size"], "batch": self.scale["batch"],
                  **({"width": self.scale["width"]} if self.scale["width"] != 1.0 else {})}
        self.emit(part, "mpix_per_s", round(mpix, 4), "Mpix/s", **params, runs=[r["mpix_per_s"] for r in ours])
        self.emit(part, "compile_s", round(ours[0]["compile_s"], 3), "s", **params)
        flops = ours[0]["flops_per_call"]
        self.emit(part, "tflops_per_s", round(flops / median_s / 1e12, 4), "TFLOP/s", **params, flops_per_call=flops)
        peak = peak_flops(self.device_kind, dtype, self.args.peak_tflops)
        self.emit(part, "mfu", round(flops / median_s / peak, 4) if peak else None, "fraction of peak", **params,
                  peak_tflops=peak / 1e12 if peak else None)
        for peer_kind, values in peers.items():
          peer_mpix = statistics.median(values)
          self.emit(part, "vs_peer", round(mpix / peer_mpix, 3), "x", **params, peer=f"smp {peer_kind}",
                    ours_mpix_per_s=mpix, peer_mpix_per_s=peer_mpix, peer_runs=values)

  def whole_image(self, tmp: pathlib.Path) -> None:
    del tmp
    height = self.args.image_height or self.scale["image"] or 9958
    width = self.args.image_width or self.scale["image"] or 9959
    command = [sys.executable, "-m", "benchmarks.accelerator", "--worker=whole_image", "--model=unet_resnet50",
               f"--image-height={height}", f"--image-width={width}", f"--tile={self.scale['tile']}",
               f"--halo={self.scale['halo']}", f"--batch={self.scale['batch']}", f"--width={self.scale['width']}"]
    log(f"predicting a {height} x {width} image")
    [record] = self._collect(command, "the whole-image worker")
    params = {"model": "unet_resnet50", "height": height, "width": width, "tile": record["tile"],
              "halo": self.scale["halo"], "tiles": record["tiles"], "batch": self.scale["batch"],
              "dtype": record["dtype"], **({"model_width": self.scale["width"]} if self.scale["width"] != 1.0 else {})}
    self.emit("whole_image", "seconds", round(record["seconds"], 3), "s", **params,
              compile_s=round(record["compile_s"], 3))
    self.emit("whole_image", "mpix_per_s", round(height * width / record["seconds"] / 1e6, 3), "Mpix/s", **params)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
  parser.add_argument("--models", default="unet_resnet50,linknet_resnet18")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--rounds", type=int, default=1, help="alternations of ours and the peer per measurement")
  parser.add_argument("--peer-python", default="", help="python of the PyTorch peer's environment")
  parser.add_argument("--peer-script", default="", help="path of the peer's smp_bench.py")
  parser.add_argument("--no-peer-compile", action="store_true", help="skip the peer's torch.compile runs")
  parser.add_argument("--peak-tflops", type=float, default=None, help="the chip's peak, where the table lacks it")
  parser.add_argument("--smoke", action="store_true", help="small sizes (the default on a CPU)")
  parser.add_argument("--full", action="store_true", help="full sizes even on a CPU")
  parser.add_argument("--image-height", type=int, default=0, help="whole_image: 0 = 9958 (smoke: 1024)")
  parser.add_argument("--image-width", type=int, default=0, help="whole_image: 0 = 9959 (smoke: 1024)")
  # Worker options (one measurement in this process).
  parser.add_argument("--worker", choices=["compile", "whole_image"], help=argparse.SUPPRESS)
  parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
  parser.add_argument("--model", default="unet_resnet50", help=argparse.SUPPRESS)
  parser.add_argument("--size", type=int, default=1024, help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
  parser.add_argument("--width", type=float, default=1.0, help=argparse.SUPPRESS)
  parser.add_argument("--tile", type=int, default=1024, help=argparse.SUPPRESS)
  parser.add_argument("--halo", type=int, default=128, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if bool(args.peer_python) != bool(args.peer_script):
    parser.error("--peer-python and --peer-script go together")
  unknown = set(args.parts.split(",")) - set(PARTS)
  if unknown:
    parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.worker == "compile":
    return compile_worker(args)
  if args.worker == "whole_image":
    return whole_image_worker(args)
  import jax  # pylint: disable=g-import-not-at-top
  backend, device_kind = jax.default_backend(), jax.devices()[0].device_kind
  args.smoke = args.smoke or (backend == "cpu" and not args.full)
  runner = Runner(args, SMOKE if args.smoke else FULL, backend, device_kind)
  with tempfile.TemporaryDirectory(prefix="urisc_accelerator_") as tmp:
    for part in [p for p in PARTS if p in args.parts.split(",")]:
      started = time.perf_counter()
      if part in ("train", "forward"):
        runner.speed(part)
      else:
        getattr(runner, part)(pathlib.Path(tmp))
      log(f"{part}: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
  main()
