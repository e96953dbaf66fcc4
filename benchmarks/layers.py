"""Layer by layer: how the models' convolutions run on XLA:CPU, and the forms chosen for speed.

    python -m benchmarks.layers                        # both parts, shapes of a 1024^2 crop at batch 2
    python -m benchmarks.layers --parts=transposed --batch=1
    python -m benchmarks.layers --parts=weight_gradients,upsampling --size=512

`--parts=convolutions`: forward, input gradient and weight gradient of every 3x3 / 7x7 convolution of
U-Net-ResNet50 at a 1024^2 crop, once with the project's XLA flags (`urisc_jax.xla_flags`: Eigen convolutions) and
once with the jaxlib's default YNNPACK convolutions, each in a fresh process (XLA reads its flags once).
`--parts=transposed`: LinkNet's and the plain U-Net's x2 upsamplings as `layers.conv_transpose2d_cpu` computes them
(one convolution over the output phases) against the textbook dilated-input convolution, forward and
forward + backward, checking that both agree.

`--parts=weight_gradients`: the weight gradient of every stride-1 3x3 convolution of U-Net-ResNet50, XLA's own
against `cpu_convolution.swapped_weight_gradient` (both with the project's flags), checking that they agree.
`--parts=upsampling`: the U-Net decoder's "x2 nearest upsampling, then 3x3 conv" as written against
`layers.upsample2_conv3x3_cpu`, forward + backward. `--size` scales the shapes to another crop side. These are the
CPU forms (`urisc_jax.platforms`); GPUs and TPUs run the plain convolutions.

One JSON object per line: {"bench": "layers", "part", "layer" or "total", ..., milliseconds} and
{"metric": "speedup", ...} per comparison.
"""

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.json_lines import emit, log, run_and_collect
from benchmarks.models import timed
from urisc_jax.models import cpu_convolution, layers

# (layer, count in the model, input H = W at a 1024^2 crop, Cin, Cout, kernel, stride)
UNET_R50_CONVOLUTIONS = [
    ("encoder/conv1", 1, 1024, 1, 64, 7, 2), ("layer1/conv2", 3, 256, 64, 64, 3, 1),
    ("layer2/block0/conv2", 1, 256, 128, 128, 3, 2), ("layer2/conv2", 3, 128, 128, 128, 3, 1),
    ("layer3/block0/conv2", 1, 128, 256, 256, 3, 2), ("layer3/conv2", 5, 64, 256, 256, 3, 1),
    ("layer4/block0/conv2", 1, 64, 512, 512, 3, 2), ("layer4/conv2", 2, 32, 512, 512, 3, 1),
    ("decoder/block0/conv1", 1, 64, 3072, 256, 3, 1), ("decoder/block0/conv2", 1, 64, 256, 256, 3, 1),
    ("decoder/block1/conv1", 1, 128, 768, 128, 3, 1), ("decoder/block1/conv2", 1, 128, 128, 128, 3, 1),
    ("decoder/block2/conv1", 1, 256, 384, 64, 3, 1), ("decoder/block2/conv2", 1, 256, 64, 64, 3, 1),
    ("decoder/block3/conv1", 1, 512, 128, 32, 3, 1), ("decoder/block3/conv2", 1, 512, 32, 32, 3, 1),
    ("decoder/block4/conv1", 1, 1024, 32, 16, 3, 1), ("decoder/block4/conv2", 1, 1024, 16, 16, 3, 1),
    ("head", 1, 1024, 16, 1, 3, 1),
]
# (layer, input H = W, Cin, Cout, kernel, stride, padding): the x2 decoder upsamplings.
TRANSPOSED = [
    ("linknet_r18/block4/deconv", 512, 16, 16, 4, 2, 1),
    ("linknet_r18/block3/deconv", 256, 16, 16, 4, 2, 1),
    ("linknet_r18/block2/deconv", 128, 32, 32, 4, 2, 1),
    ("plain_unet/up1 (kernel 2)", 512, 64, 32, 2, 2, 0),
]
# The jaxlib's own choice: YNNPACK for single convolutions (naming the flag also keeps urisc_jax from changing it).
YNNPACK_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"


def _timed_ms(fn, *args, repeats: int) -> float:
  return round(timed(lambda: fn(*args), repeats) * 1e3, 2)


def measure_convolutions(batch: int, repeats: int) -> None:
  """Worker: times forward, input gradient and weight gradient of each U-Net-R50 convolution in this process."""
  rng = np.random.default_rng(0)
  totals = np.zeros(3)
  for layer, count, size, cin, cout, k, stride in UNET_R50_CONVOLUTIONS:
    conv = functools.partial(layers.conv2d_cpu, stride=stride, padding=(k - 1) // 2)
    x = jnp.asarray(rng.random((batch, size, size, cin), np.float32))
    kernel = jnp.asarray(rng.normal(size=(k, k, cin, cout)).astype(np.float32))
    cotangent = jnp.ones(jax.eval_shape(conv, x, kernel).shape, jnp.float32)
    forward = jax.jit(conv)
    input_gradient = jax.jit(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0])
    weight_gradient = jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0])
    ms = [_timed_ms(forward, x, kernel, repeats=repeats), _timed_ms(input_gradient, x, kernel, cotangent,
          repeats=repeats), _timed_ms(weight_gradient, x, kernel, cotangent, repeats=repeats)]
    totals += count * np.asarray(ms)
    emit({"bench": "layers", "part": "convolutions", "layer": f"unet_r50/{layer}", "count": count,
          "shape": [batch, size, size, cin, cout, k, stride], "forward_ms": ms[0], "input_gradient_ms": ms[1],
          "weight_gradient_ms": ms[2]})
  emit({"bench": "layers", "part": "convolutions", "layer": "total", "forward_ms": round(totals[0], 1),
        "input_gradient_ms": round(totals[1], 1), "weight_gradient_ms": round(totals[2], 1)})


def compare_convolution_backends(args) -> None:
  """Runs the convolution worker with the project's flags and with YNNPACK convolutions; emits the speed-ups."""
  totals = {}
  for backend, extra in (("eigen (urisc_jax)", ""), ("ynnpack (jaxlib default)", YNNPACK_CONVOLUTIONS)):
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {extra}".strip())
    log(f"convolutions with {backend} ...")
    command = [sys.executable, "-m", "benchmarks.layers", "--worker", f"--batch={args.batch}",
               f"--repeats={args.repeats}"]
    records = run_and_collect(command, what=" ".join(command), env=env)
    totals[backend] = next(r for r in records if r["layer"] == "total")
  ours, default = totals["eigen (urisc_jax)"], totals["ynnpack (jaxlib default)"]
  emit({"bench": "layers", "part": "convolutions", "metric": "speedup", "over": "ynnpack (jaxlib default)",
        **{key: round(default[key] / ours[key], 2)
           for key in ("forward_ms", "input_gradient_ms", "weight_gradient_ms")}})


def _agree(layer: str, got, want) -> None:
  """Raises unless two forms of one layer agree to a relative 1e-4 (of the largest value)."""
  difference = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  if difference > 1e-4:
    raise AssertionError(f"{layer}: the two forms disagree (max relative difference {difference:.2e})")


def compare_transposed(batch: int, repeats: int) -> None:
  """Phase form vs dilated form of each upsampling: forward and forward + backward; both must agree."""
  rng = np.random.default_rng(0)
  for layer, size, cin, cout, k, stride, padding in TRANSPOSED:
    x = jnp.asarray(rng.random((batch, size, size, cin), np.float32))
    kernel = jnp.asarray(rng.normal(size=(k, k, cin, cout)).astype(np.float32))
    times, outputs = {}, {}
    for form, fn in (("dilated", layers.dilated_conv_transpose2d), ("phases", layers.conv_transpose2d_cpu)):
      fn = functools.partial(fn, stride=stride, padding=padding)
      cotangent = jnp.ones(jax.eval_shape(fn, x, kernel).shape, jnp.float32)
      forward = jax.jit(fn)
      backward = jax.jit(jax.grad(lambda x, k, fn=fn: jnp.vdot(fn(x, k), cotangent), argnums=(0, 1)))
      outputs[form] = np.asarray(forward(x, kernel))
      times[form] = (_timed_ms(forward, x, kernel, repeats=repeats), _timed_ms(backward, x, kernel, repeats=repeats))
      emit({"bench": "layers", "part": "transposed", "layer": layer, "form": form,
            "shape": [batch, size, size, cin, cout, k, stride], "forward_ms": times[form][0],
            "forward_backward_ms": times[form][1]})
    _agree(layer, outputs["phases"], outputs["dilated"])
    emit({"bench": "layers", "part": "transposed", "layer": layer, "metric": "speedup", "over": "dilated",
          "forward": round(times["dilated"][0] / times["phases"][0], 2),
          "forward_backward": round(times["dilated"][1] / times["phases"][1], 2)})


def _scaled(size: int, crop: int) -> int:
  return max(1, size * crop // 1024)


def compare_weight_gradients(batch: int, crop: int, repeats: int) -> None:
  """XLA's weight gradient of each stride-1 3x3 convolution against the swapped form."""
  rng = np.random.default_rng(0)
  totals = {"xla": 0.0, "swapped": 0.0}
  for layer, count, size, cin, cout, k, stride in UNET_R50_CONVOLUTIONS:
    if stride != 1 or k != 3:
      continue
    size = _scaled(size, crop)
    x = jnp.asarray(rng.random((batch, size, size, cin), np.float32))
    cotangent = jnp.asarray(rng.random((batch, size, size, cout), np.float32))
    kernel = jnp.zeros((k, k, cin, cout))
    xla = jax.jit(lambda x, g: jax.vjp(lambda w: jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")), kernel)[1](g)[0])
    swapped = jax.jit(functools.partial(cpu_convolution.swapped_weight_gradient, kernel_size=k, padding=1))
    _agree(layer, swapped(x, cotangent), xla(x, cotangent))
    ms = {"xla": _timed_ms(xla, x, cotangent, repeats=repeats),
          "swapped": _timed_ms(swapped, x, cotangent, repeats=repeats)}
    for form in totals:
      totals[form] += count * ms[form]
    emit({"bench": "layers", "part": "weight_gradients", "layer": f"unet_r50/{layer}", "count": count,
          "shape": [batch, size, size, cin, cout], "xla_ms": ms["xla"], "swapped_ms": ms["swapped"]})
  emit({"bench": "layers", "part": "weight_gradients", "layer": "total", "metric": "speedup", "over": "xla",
        "value": round(totals["xla"] / totals["swapped"], 2), "xla_ms": round(totals["xla"], 1),
        "swapped_ms": round(totals["swapped"], 1)})


# (block, input H = W at a 1024^2 crop, Cin, Cout) of the U-Net-ResNet50 decoder's upsampled inputs.
UNET_R50_UPSAMPLINGS = [("block0", 32, 2048, 256), ("block1", 64, 256, 128), ("block2", 128, 128, 64),
                        ("block3", 256, 64, 32), ("block4", 512, 32, 16)]


def compare_upsamplings(batch: int, crop: int, repeats: int) -> None:
  """Upsample-then-conv against the folded low-resolution form, forward + backward."""
  rng = np.random.default_rng(0)
  totals = {"upsampled": 0.0, "folded": 0.0}
  for block, size, cin, cout in UNET_R50_UPSAMPLINGS:
    size = _scaled(size, crop)
    x = jnp.asarray(rng.random((batch, size, size, cin), np.float32))
    kernel = jnp.asarray(rng.normal(size=(3, 3, cin, cout)).astype(np.float32))
    cotangent = jnp.ones((batch, 2 * size, 2 * size, cout), jnp.float32)
    forms = {"upsampled": lambda x, k: layers.conv2d_cpu(layers.upsample_nearest(x, 2), k, padding=1),
             "folded": layers.upsample2_conv3x3_cpu}
    ms, grads = {}, {}
    for form, fn in forms.items():
      backward = jax.jit(jax.grad(lambda x, k, fn=fn: jnp.vdot(fn(x, k), cotangent), argnums=(0, 1)))
      grads[form] = backward(x, kernel)
      ms[form] = _timed_ms(backward, x, kernel, repeats=repeats)
      totals[form] += ms[form]
    for got, want in zip(grads["folded"], grads["upsampled"]):
      _agree(block, got, want)
    emit({"bench": "layers", "part": "upsampling", "layer": f"unet_r50/decoder/{block}",
          "shape": [batch, size, size, cin, cout], "upsampled_forward_backward_ms": ms["upsampled"],
          "folded_forward_backward_ms": ms["folded"]})
  emit({"bench": "layers", "part": "upsampling", "layer": "total", "metric": "speedup", "over": "upsampled",
        "value": round(totals["upsampled"] / totals["folded"], 2)})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--parts", default="convolutions,transposed")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", type=int, default=1024, help="crop side the layer shapes are taken at")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    measure_convolutions(args.batch, args.repeats)
    return
  parts = args.parts.split(",")
  if "convolutions" in parts:
    compare_convolution_backends(args)
  if "transposed" in parts:
    compare_transposed(args.batch, args.repeats)
  if "weight_gradients" in parts:
    compare_weight_gradients(args.batch, args.size, args.repeats)
  if "upsampling" in parts:
    compare_upsamplings(args.batch, args.size, args.repeats)


if __name__ == "__main__":
  main()
