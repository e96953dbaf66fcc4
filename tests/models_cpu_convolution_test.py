"""The swapped weight gradient against XLA's own (a second derivation of the same sum) and its dispatch rule."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urisc_jax import xla_flags
from urisc_jax.models import cpu_convolution, layers

# Floating-point comparisons (the CPU convolution forms against XLA's own gradients):
# .ci/run runs them again under XLA's AVX2 cap.
pytestmark = pytest.mark.numerics


def _lax_conv(x, kernel, padding):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((padding, padding), (padding, padding)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("batch,height,width,kernel_size,padding",
                         [(2, 6, 5, 3, 1), (1, 4, 7, 3, 0), (3, 5, 5, 2, 0), (2, 3, 4, 2, 1), (1, 9, 8, 7, 3)])
def test_swapped_weight_gradient_equals_the_convolution_gradient(batch, height, width, kernel_size, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, height, width, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 3, 4)), jnp.float32)
  out_shape = _lax_conv(x, kernel, padding).shape
  dy = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
  want = jax.vjp(lambda k: _lax_conv(x, k, padding), kernel)[1](dy)[0]
  got = cpu_convolution.swapped_weight_gradient(x, dy, kernel_size, padding)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("batch", [2, cpu_convolution.MAX_SWAPPED_BATCH + 1])
def test_conv2d_gradients_equal_xla_ones_on_both_sides_of_the_batch_rule(batch):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(batch, 6, 7, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 5, 2)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(batch, 6, 7, 2)), jnp.float32)

  def grads(conv):
    return jax.jit(jax.grad(lambda x, k: jnp.vdot(conv(x, k), cotangent), argnums=(0, 1)))(x, kernel)

  got = grads(lambda x, k: layers.conv2d(x, k, padding=1))
  want = grads(lambda x, k: _lax_conv(x, k, 1))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def test_the_swapped_form_is_what_runs_on_the_cpu_with_eigen_convolutions():
  x = jnp.zeros((2, 8, 8, 3))
  kernel = jnp.zeros((3, 3, 3, 4))
  hlo = jax.jit(jax.grad(lambda k: layers.conv2d(x, k, padding=1).sum())).lower(kernel).as_text()
  # XLA's own weight gradient convolves x (feature: batch) by dy; the swapped one convolves the padded dy by x.
  swapped = "tensor<4x10x10x2xf32>" in hlo
  assert swapped == (jax.default_backend() == "cpu" and xla_flags.eigen_convolutions())


def test_bfloat16_gradient_keeps_the_kernel_dtype():
  x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
  kernel = jnp.ones((3, 3, 2, 2), jnp.bfloat16)
  gradient = jax.grad(lambda k: layers.conv2d(x, k, padding=1).astype(jnp.float32).sum())(kernel)
  assert gradient.dtype == jnp.bfloat16
  # Interior taps see all 16 pixels of the 4x4 map, corner taps 9.
  assert float(gradient[1, 1, 0, 0]) == 16.0 and float(gradient[0, 0, 0, 0]) == 9.0


_SHARDED_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from urisc_jax.models import layers

rng = np.random.default_rng(2)
x = jnp.asarray(rng.normal(size=(2, 16, 12, 5)), jnp.float32)
kernel = jnp.asarray(rng.normal(size=(3, 3, 5, 6)), jnp.float32)
cotangent = jnp.asarray(rng.normal(size=(2, 16, 12, 6)), jnp.float32)
grads = jax.grad(lambda x, k: jnp.vdot(layers.conv2d(x, k, padding=1), cotangent), argnums=(0, 1))
want = jax.jit(grads)(x, kernel)
mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "spatial"))
spread = NamedSharding(mesh, P("data", "spatial"))
got = jax.jit(grads, in_shardings=(spread, NamedSharding(mesh, P())))(jax.device_put(x, spread), kernel)
print(json.dumps([float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) for g, w in zip(got, want)]))
"""


def test_swapped_gradient_is_unchanged_by_data_and_spatial_sharding():
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).resolve().parents[1], check=True)
  input_error, kernel_error = json.loads(result.stdout.strip().splitlines()[-1])
  assert input_error < 1e-5 and kernel_error < 1e-5


def test_forward_mode_works_once_the_swapped_path_is_turned_off(monkeypatch):
  x = jnp.ones((1, 5, 5, 2))
  kernel = jnp.ones((3, 3, 2, 1))
  monkeypatch.setattr(cpu_convolution, "MAX_SWAPPED_BATCH", 0)
  _, tangent = jax.jvp(lambda k: layers.conv2d(x, k, padding=1), (kernel,), (kernel,))
  np.testing.assert_allclose(tangent, _lax_conv(x, kernel, 1))  # linear in the kernel: the tangent is conv(x, dk)


def test_second_order_reverse_mode_matches_xla():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 5, 6, 2)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 3)), jnp.float32)

  def gradient_norm(conv):
    inner = jax.grad(lambda k: jnp.sum(jnp.tanh(conv(x, k))))
    return jax.grad(lambda k: jnp.sum(inner(k) ** 2))(kernel)

  np.testing.assert_allclose(gradient_norm(lambda x, k: layers.conv2d(x, k, padding=1)),
                             gradient_norm(lambda x, k: _lax_conv(x, k, 1)), rtol=1e-4, atol=1e-4)
