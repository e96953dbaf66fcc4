"""Training speed: images/s and Mpix/s of the project's train step per model and crop size, beside the PyTorch peer.

    python -m benchmarks.train                                   # U-Net-R50 + LinkNet-R18 at 512 and 1024, batch 2
    python -m benchmarks.train --models=linknet_resnet18 --sizes=512 --repeats=3
    python -m benchmarks.train --peer-python=PEER_PYTHON --peer-script=smp_bench.py   # alternate with the peer

The step timed is `train.make_train_step`, the one `--mode=train` runs: uint8 batch -> input normalization -> the
model in train mode (BatchNorm statistics updated) -> focal + dice loss (the paper's) -> gradients -> Adam update,
jitted with the state donated. The peer's `smp_bench.py train` (segmentation_models_pytorch) times the same work:
forward in train mode, focal + dice, backward, Adam. Every measurement runs in a fresh process (a 1024^2 U-Net-ResNet50
step needs several GiB) and, with a peer, ours and the peer's alternate --rounds times, because the machine is
shared and its speed drifts: compare the medians of one sitting. Random weights and data: speed does not depend on
them. Default run: about 15 minutes on 2 idle CPU cores with the peer.

One JSON object per line on stdout: {"bench": "train", "metric", "value", "unit", "model", "size", "batch", ...};
with a peer, {"bench": "train_vs_peer", "metric": "speedup", "value": ours / peer} per model and size.
"""

import argparse
import statistics
import sys
import time

import jax
import numpy as np
import optax

from benchmarks import models as model_bench
from benchmarks.json_lines import emit, log, run_and_collect
from urisc_jax import losses, models, train
from urisc_jax.state import TrainState

# Our model name -> the peer's --model / --encoder (models the peer lacks are measured alone).
PEER_MODELS = {"unet_resnet50": ("unet", "resnet50"), "linknet_resnet18": ("linknet", "resnet18"),
               "unet_resnet18": ("unet", "resnet18"), "linknet_resnet50": ("linknet", "resnet50")}


def measure(model_name: str, size: int, batch: int, repeats: int, dtype: str = "float32",
            width: float = 1.0) -> list[dict]:
  """Times `repeats` train steps after one warm-up; returns the JSON records (rates, median, compile, memory, XLA's
  FLOP count of one step)."""
  model = model_bench.build_model(model_name, dtype, width)
  shape = (batch, size, size, 1)
  variables = models.random_variables(models.abstract_variables(model, shape))
  tx = optax.adam(1e-3)
  state = TrainState(step=np.int32(0), params=variables["params"], batch_stats=variables["batch_stats"],
                     opt_state=tx.init(variables["params"]))
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, shape, dtype=np.uint8)
  batch_arrays = {"image": image, "label": (rng.random(shape) < 0.05).astype(np.uint8)}
  step_fn = jax.jit(train.make_train_step(model, tx, losses.focal_dice, mean=0.5, std=0.25), donate_argnums=0)
  key = jax.random.key(0)
  started = time.perf_counter()
  compiled = step_fn.lower(state, batch_arrays, key).compile()
  compile_s = time.perf_counter() - started
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], batch_arrays, key)
    return metrics["loss"]

  seconds = model_bench.timed(step, repeats)
  params = {"bench": "train", "framework": "urisc_jax", "model": model_name, "size": size, "batch": batch,
            "dtype": str(model.dtype), "backend": jax.default_backend(), **({"width": width} if width != 1.0 else {})}
  return [
      {**params, "metric": "images_per_s", "value": batch / seconds, "unit": "images/s"},
      {**params, "metric": "mpix_per_s", "value": batch * size**2 / seconds / 1e6, "unit": "Mpix/s"},
      {**params, "metric": "median_s", "value": seconds, "unit": "s"},
      {**params, "metric": "compile_s", "value": compile_s, "unit": "s"},
      {**params, "metric": "peak_gib", "value": model_bench.peak_gib(compiled), "unit": "GiB"},
      {**params, "metric": "flops_per_call", "value": model_bench.flops(compiled), "unit": "FLOP"},
  ]


def _mpix(records: list[dict]) -> float:
  return next(r["value"] for r in records if r["metric"] == "mpix_per_s")


def ours(args, model_name: str, size: int) -> float:
  command = [sys.executable, "-m", "benchmarks.train", "--worker", f"--models={model_name}", f"--sizes={size}",
             f"--batch={args.batch}", f"--repeats={args.repeats}", f"--dtype={args.dtype}", f"--width={args.width}"]
  return _mpix(run_and_collect(command, what=" ".join(command)))


def peer(args, model_name: str, size: int) -> float:
  family, encoder = PEER_MODELS[model_name]
  command = [args.peer_python, args.peer_script, "train", "--model", family, "--encoder", encoder,
             "--size", str(size), "--batch", str(args.batch), "--warmup", "1", "--iters", str(args.repeats)]
  return _mpix(run_and_collect(command, what=" ".join(command)))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--models", default="unet_resnet50,linknet_resnet18",
                      help="comma-separated: unet_<encoder>, linknet_<encoder>, casenet, casenet_original, plain_unet")
  parser.add_argument("--sizes", default="512,1024", help="comma-separated square crop sides, multiples of 32")
  parser.add_argument("--batch", type=int, default=2, help="crops per step (the paper: 4 per GPU)")
  parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step")
  parser.add_argument("--rounds", type=int, default=1, help="alternations of ours and the peer per measurement")
  parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                      help="compute dtype (auto: bfloat16 on GPUs and TPUs, float32 on the CPU)")
  parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0: the published model)")
  parser.add_argument("--peer-python", default="", help="python of the PyTorch peer's environment")
  parser.add_argument("--peer-script", default="", help="path of the peer's smp_bench.py")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one in-process measurement
  args = parser.parse_args(argv)
  if bool(args.peer_python) != bool(args.peer_script):
    parser.error("--peer-python and --peer-script go together")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  model_names = [m for m in args.models.split(",") if m]
  sizes = [int(s) for s in args.sizes.split(",") if s]
  if args.worker:
    for model_name in model_names:
      for size in sizes:
        for record in measure(model_name, size, args.batch, args.repeats, args.dtype, args.width):
          emit(record)
    return
  for model_name in model_names:
    for size in sizes:
      with_peer = bool(args.peer_python) and model_name in PEER_MODELS
      ours_values, peer_values = [], []
      for _ in range(args.rounds if with_peer else 1):
        log(f"measuring {model_name} at {size}^2, batch {args.batch}")
        ours_values.append(ours(args, model_name, size))
        if with_peer:
          log(f"measuring the peer's {model_name} at {size}^2, batch {args.batch}")
          peer_values.append(peer(args, model_name, size))
      if peer_values:
        emit({"bench": "train_vs_peer", "model": model_name, "size": size, "batch": args.batch,
              "metric": "speedup", "value": statistics.median(ours_values) / statistics.median(peer_values),
              "unit": "x", "ours_mpix_per_s": ours_values, "peer_mpix_per_s": peer_values})


if __name__ == "__main__":
  main()
