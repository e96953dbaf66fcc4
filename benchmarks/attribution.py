"""Integrated-gradients speed: target pixels per second, batched over steps and targets versus a Python loop.

    python -m benchmarks.attribution --quick   # U-Net-ResNet18 at width 1/8, 128 px, 20 steps: ~25 s on 2 CPU cores
    python -m benchmarks.attribution           # U-Net-ResNet50 (width 1), 512 px, 100 steps, 2 targets, chunked and
                                               # loop variants: ~25 min on 2 busy CPU cores
    python -m benchmarks.attribution --steps=12 --variants=loop,chunked   # the same per-step rates in ~6 min

Variants (one JSON object per line on stdout, progress on stderr):
  chunked             `integrated_gradients(..., chunk_size=C)` with all --targets in one call: C interpolation
                      points per forward pass, the backward pass vmapped over the targets (jax.jacrev).
  chunked_per_target  the same, one call per target: what sharing the forward pass across targets saves.
  loop                the textbook version: a Python loop over targets and steps, one jax.grad per (target, step).
Reported per variant: targets_per_s (targets / wall seconds for --steps steps, after a warm-up call that compiles),
seconds, compile_s (the warm-up call), peak_gib (XLA's buffer plan for one compiled call: arguments + outputs +
temporaries) and the largest relative completeness gap. Weights are random (speed does not depend on them); the
input is a random gray image and the baseline zeros, as the paper's.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.json_lines import emit, log
from benchmarks.models import build_model, peak_gib
from urisc_jax import models
from urisc_jax.attribution import integrated_gradients as ig
from urisc_jax.attribution import path_integral

VARIANTS = ("chunked", "chunked_per_target", "loop")


def _targets(size: int, count: int, seed: int = 0) -> np.ndarray:
  """`count` target pixels spread over the central half of the image."""
  rng = np.random.default_rng(seed)
  return rng.integers(size // 4, 3 * size // 4, (count, 2))


def _chunk_peak_gib(logit_fn, variables, x, baseline, targets, chunk: int) -> float:
  """XLA's planned memory of one chunk call (the batched variants' peak)."""
  rows, cols = jnp.asarray(targets[:, 0]), jnp.asarray(targets[:, 1])
  alphas = jnp.ones((chunk,), jnp.float32)
  chunk_fn = path_integral._point_gradients  # pylint: disable=protected-access
  lowered = chunk_fn.lower(logit_fn, variables, x, baseline, rows, cols, alphas, alphas)
  return peak_gib(lowered.compile())


def run_variant(variant: str, logit_fn, variables, x, baseline, targets: np.ndarray, args) -> dict:
  """Times one variant: a warm-up call that compiles, then the timed call with --steps steps."""
  vectorized = variant != "loop"
  groups = [targets[i:i + 1] for i in range(len(targets))] if variant == "chunked_per_target" else [targets]
  warm_steps = 1 if variant == "loop" else min(args.chunk_size, args.steps)

  def call(steps):
    return [ig.integrated_gradients(logit_fn, variables, x, baseline, group, steps=steps, rule=args.method,
                                    nodes_per_interval=steps, chunk_size=args.chunk_size, vectorized=vectorized) for group in groups]

  start = time.perf_counter()
  call(warm_steps)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  results = call(args.steps)
  seconds = time.perf_counter() - start
  gaps = np.concatenate([np.abs(r.completeness_gap_rel) for r in results])
  record = {"variant": variant, "targets_per_s": len(targets) / seconds, "seconds": seconds, "compile_s": compile_s,
            "max_completeness_gap_rel": float(np.nanmax(gaps))}
  if vectorized:
    record["peak_gib"] = _chunk_peak_gib(logit_fn, variables, x, baseline, groups[0],
                                         min(args.chunk_size, args.steps))
  return record


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--model", default="unet_resnet50", help="as benchmarks.models: unet_resnet50, linknet_resnet18")
  parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0: the published model)")
  parser.add_argument("--size", type=int, default=512, help="square input side, a multiple of 32")
  parser.add_argument("--steps", type=int, default=100, help="gradient evaluations per target (the paper's 100)")
  parser.add_argument("--targets", type=int, default=2, help="target pixels")
  parser.add_argument("--chunk-size", type=int, default=4, help="interpolation points per forward pass")
  parser.add_argument("--method", default="riemann_right", choices=ig.RULES, help="quadrature rule")
  parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
  parser.add_argument("--quick", action="store_true",
                      help="U-Net-ResNet18 at width 1/8 on 128 px, 20 steps, 4 targets, chunks of 10")
  args = parser.parse_args(argv)
  if args.quick:
    args.model, args.width, args.size, args.steps, args.targets, args.chunk_size = (
        "unet_resnet18", 0.125, 128, 20, 4, 10)
  variants = [v for v in args.variants.split(",") if v]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")

  model = build_model(args.model, "float32", args.width)
  variables = models.random_variables(models.abstract_variables(model, (1, args.size, args.size, 1)))
  image = np.random.default_rng(0).integers(0, 256, (args.size, args.size), dtype=np.uint8)
  x = ig.input_window(image, mean=models.CEM500K_NORMALIZATION.mean, std=models.CEM500K_NORMALIZATION.std)
  baseline = np.zeros_like(x)
  targets = _targets(args.size, args.targets)
  logit_fn = ig.ModelLogits(model)
  params = {"bench": "attribution", "model": args.model, "width": args.width, "size": args.size,
            "steps": args.steps, "targets": args.targets, "chunk_size": args.chunk_size, "method": args.method,
            "backend": jax.default_backend(), "devices": jax.device_count()}
  for variant in variants:
    log(f"{variant}: {args.targets} targets x {args.steps} steps on {args.model} (width {args.width}), "
        f"{args.size} px ...")
    record = run_variant(variant, logit_fn, variables, x, baseline, targets, args)
    emit({"metric": "targets_per_s", "value": round(record.pop("targets_per_s"), 5), "unit": "target/s", **params,
          **{k: round(v, 5) for k, v in record.items() if isinstance(v, float)}, "variant": variant})


if __name__ == "__main__":
  main()
