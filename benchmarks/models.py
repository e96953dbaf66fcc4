"""Speed and memory of the segmentation models: inference and one training step, one JSON object per line.

    python -m benchmarks.models --model unet_resnet50 --size 512 --batch 1 --bench forward
    python -m benchmarks.models --model linknet_resnet18 --size 1024 --bench train --repeats 3

Models: <name>_<encoder> for U-Net / LinkNet (unet_resnet50, linknet_resnet18, ...), casenet (U-RISC variant,
ResNet-152), casenet_original, plain_unet. `forward` times eval-mode inference (model.apply, train=False);
`train` times one Adam step on focal + dice loss in train mode (BatchNorm statistics updated), as the PyTorch peer's
`smp_bench.py train` does. Reported per measurement: mpix_per_s (median over --repeats after one warm-up),
median_s, compile_s, and peak_gib: XLA's buffer plan for the compiled function (arguments + outputs + temporaries),
the device-memory peak the step needs. Weights are random (no init compile). On a shared CPU, alternate runs with
the peer and compare medians from one sitting.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from urisc_jax import models, platforms


def build_model(name: str, dtype: str, width: float):
  """'unet_resnet50' -> models.build('unet', encoder='resnet50', ...); 'casenet_original', 'plain_unet' too."""
  overrides = {"dtype": platforms.compute_dtype(dtype), "width": width}
  if name in ("casenet", "plain_unet"):
    return models.build(name, **overrides)
  if name == "casenet_original":
    return models.build("casenet", variant="original", **overrides)
  family, _, encoder = name.partition("_")
  if family not in ("unet", "linknet") or not encoder:
    raise ValueError(f"unknown model {name!r}; use unet_<encoder>, linknet_<encoder>, casenet, casenet_original or "
                     "plain_unet")
  return models.build(family, encoder=encoder, **overrides)


def focal_dice_loss(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Focal (gamma 2) + soft dice on the membrane probability, the paper's loss; [N, H, W, 1] -> scalar."""
  prob = jax.nn.sigmoid(logits)
  bce = optax.sigmoid_binary_cross_entropy(logits, target)
  p_true = jnp.where(target > 0, prob, 1 - prob)
  focal = jnp.mean((1 - p_true) ** 2 * bce)
  dice = 1 - (2 * jnp.sum(prob * target) + 1) / (jnp.sum(prob) + jnp.sum(target) + 1)
  return focal + dice


def peak_gib(compiled) -> float:
  """Bytes XLA plans for arguments, outputs and temporaries of a compiled function, in GiB."""
  stats = compiled.memory_analysis()
  if stats is None:
    return float("nan")
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
           - stats.alias_size_in_bytes)
  return total / 2**30


def flops(compiled) -> float:
  """Floating-point operations of one call of a compiled function, as XLA's cost analysis counts them."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # some jaxlib versions give one dict per computation
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


def timed(fn, repeats: int) -> float:
  """Median wall time of fn() over `repeats` calls after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run(args) -> None:
  model = build_model(args.model, args.dtype, args.width)
  shape = (args.batch, args.size, args.size, 1)
  variables = models.random_variables(models.abstract_variables(model, shape))
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape, dtype=np.float32)
  params = dict(model=args.model, size=args.size, batch=args.batch, dtype=str(model.dtype), framework="urisc_jax",
                backend=jax.default_backend())
  if args.width != 1.0:
    params["width"] = args.width

  def emit(metric, value, unit):
    print(json.dumps({"bench": args.bench, "metric": metric, "value": round(float(value), 5), "unit": unit,
                      **params}), flush=True)

  if args.bench == "forward":
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    call_args = (variables, x)
  else:
    target = (rng.random(shape) < 0.05).astype(np.float32)
    optimizer = optax.adam(1e-3)

    def train_step(state, x, target):
      params_, batch_stats, opt_state = state

      def loss_fn(p):
        logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        return focal_dice_loss(logits, target), updates["batch_stats"]

      (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params_)
      updates, opt_state = optimizer.update(grads, opt_state, params_)
      return (optax.apply_updates(params_, updates), new_stats, opt_state), loss

    fn = jax.jit(train_step, donate_argnums=0)
    state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))
    call_args = (state, x, target)

  start = time.perf_counter()
  compiled = fn.lower(*call_args).compile()
  compile_s = time.perf_counter() - start
  if args.bench == "forward":
    step = lambda: compiled(variables, x)  # pylint: disable=unnecessary-lambda-assignment
  else:
    holder = [call_args[0]]

    def step():
      holder[0], loss = compiled(holder[0], x, target)
      return loss

  seconds = timed(step, args.repeats)
  emit("mpix_per_s", args.batch * args.size**2 / seconds / 1e6, "Mpix/s")
  emit("median_s", seconds, "s")
  emit("compile_s", compile_s, "s")
  emit("peak_gib", peak_gib(compiled), "GiB")
  emit("flops_per_call", flops(compiled), "FLOP")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="unet_resnet50")
  parser.add_argument("--bench", choices=["forward", "train"], default="forward")
  parser.add_argument("--size", type=int, default=512, help="square input side, a multiple of 32")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up")
  parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"], help="compute dtype")
  parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0: the published model)")
  run(parser.parse_args())


if __name__ == "__main__":
  main()
