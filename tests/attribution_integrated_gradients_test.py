"""Integrated gradients: exact on linear models, batched == textbook loop, baselines, receptive-field crops."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urisc_jax import models
from urisc_jax.attribution import integrated_gradients as ig
from urisc_jax.attribution import receptive_field

# Floating-point comparisons (closed forms, orders of convergence and equal forms of IG):
# .ci/run runs them again under XLA's AVX2 cap.
pytestmark = pytest.mark.numerics

MEAN, STD = 0.57287007, 0.12740536


class LinearLogits(nn.Module):
  """logits[n, i, j] = sum_{h, w, c} K[h, w, c, i, j] x[n, h, w, c] + b[i, j]: IG is (x - x') * K[..., i, j]."""
  height: int
  width: int

  @nn.compact
  def __call__(self, x, train=False):
    kernel = self.param("kernel", nn.initializers.normal(1.0), x.shape[1:] + (self.height, self.width))
    bias = self.param("bias", nn.initializers.normal(1.0), (self.height, self.width))
    return (jnp.einsum("nhwc,hwcij->nij", x, kernel) + bias)[..., None]


class PointwiseConv(nn.Module):
  """A 1x1 conv: linear in its input, each logit sees one pixel's channels."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Conv(1, (1, 1), bias_init=nn.initializers.constant(0.3))(x)


class ConvStack(nn.Module):
  """3x3 convs with ReLUs (dilations as given): the receptive-field radius is the sum of the dilations."""
  dilations: tuple[int, ...]

  @nn.compact
  def __call__(self, x, train=False):
    for d in self.dilations:
      x = nn.relu(nn.Conv(4, (3, 3), kernel_dilation=(d, d), padding="SAME")(x))
    return nn.Conv(1, (1, 1))(x)


class SmallNet(nn.Module):
  """conv-BN-ReLU, a strided conv, nearest upsampling, a skip and biases: small, but not linear or homogeneous."""

  @nn.compact
  def __call__(self, x, train=False):
    bias = nn.initializers.normal(0.5)
    h = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(6, (3, 3), bias_init=bias)(x)))
    d = nn.relu(nn.Conv(6, (3, 3), strides=(2, 2), bias_init=bias)(h))
    up = jnp.repeat(jnp.repeat(d, 2, axis=1), 2, axis=2)
    return nn.Conv(1, (3, 3), bias_init=bias)(jnp.concatenate([h, up], axis=-1))


def _init(module, shape, seed=0):
  return module.init(jax.random.key(seed), jnp.zeros(shape, jnp.float32))


def _image(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("method", ig.RULES)
def test_linear_model_attribution_is_input_difference_times_weight(method):
  module = LinearLogits(6, 5)
  variables = _init(module, (1, 6, 5, 2))
  rng = np.random.default_rng(1)
  x, baseline = rng.normal(size=(2, 6, 5, 2)).astype(np.float32)
  targets = np.array([[0, 0], [3, 2], [5, 4]])
  result = ig.integrated_gradients(ig.ModelLogits(module), variables, x, baseline, targets, steps=7, rule=method,
                                   chunk_size=3)
  kernel = np.asarray(variables["params"]["kernel"])
  expected = np.stack([(x - baseline) * kernel[..., i, j] for i, j in targets])
  np.testing.assert_allclose(result.attributions, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(result.completeness_gap, 0.0, atol=1e-4)


@pytest.mark.parametrize("method", ["riemann_right", "trapezoid", "gauss_legendre"])
def test_pointwise_conv_attributes_only_the_target_pixel(method):
  module = PointwiseConv()
  variables = _init(module, (1, 8, 8, 3))
  rng = np.random.default_rng(2)
  x, baseline = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  result = ig.integrated_gradients(ig.ModelLogits(module), variables, x, baseline, (4, 5), steps=5, rule=method)
  weight = np.asarray(variables["params"]["Conv_0"]["kernel"])[0, 0, :, 0]
  expected = np.zeros((1, 8, 8, 3), np.float32)
  expected[0, 4, 5] = (x[4, 5] - baseline[4, 5]) * weight
  np.testing.assert_allclose(result.attributions, expected, atol=1e-6)
  np.testing.assert_allclose(result.logits - result.baseline_logits, result.attributions.sum(), rtol=1e-5)
  assert result.maps.shape == (1, 8, 8)


def test_quadrature_rules_integrate_polynomials_as_their_order_allows():
  for method in ig.RULES:
    alphas, weights = ig.quadrature(method, 6)
    assert alphas.shape == weights.shape == (6,) and np.isclose(weights.sum(), 1.0)
    assert alphas.min() >= 0 and alphas.max() <= 1
  alphas, weights = ig.quadrature("riemann_right", 4)
  np.testing.assert_allclose(alphas, [0.25, 0.5, 0.75, 1.0])
  alphas, weights = ig.quadrature("gauss_legendre", 4)  # exact up to degree 7: integral of a^7 on [0, 1] = 1/8
  np.testing.assert_allclose(weights @ alphas**7, 1 / 8, rtol=1e-12)
  alphas, weights = ig.quadrature("trapezoid", 3)
  np.testing.assert_allclose(alphas, [0, 0.5, 1])
  np.testing.assert_allclose(weights, [0.25, 0.5, 0.25])
  with pytest.raises(ValueError, match="trapezoid"):
    ig.quadrature("trapezoid", 1)
  with pytest.raises(ValueError, match="gauss_legendre"):
    ig.quadrature("simpson", 10)


@pytest.fixture(scope="module")
def small_net():
  module = SmallNet()
  variables = _init(module, (1, 32, 32, 1), seed=3)
  rng = np.random.default_rng(4)  # running statistics as after training
  variables["batch_stats"] = jax.tree.map(lambda v: rng.uniform(0.5, 1.5, v.shape).astype(np.float32),
                                          variables["batch_stats"])
  return ig.ModelLogits(module), variables


def test_batched_targets_and_chunks_equal_the_textbook_loop_and_single_target_calls(small_net):
  logit_fn, variables = small_net
  image = _image((32, 32), seed=5)
  x = ig.input_window(image, mean=MEAN, std=STD)
  baseline = ig.make_baseline("noise", image, mean=MEAN, std=STD, seed=1)
  targets = np.array([[10, 20], [17, 16], [31, 0]])
  # 10 steps in chunks of 4: the last chunk is padded with zero-weight points.
  batched = ig.integrated_gradients(logit_fn, variables, x, baseline, targets, steps=10, chunk_size=4)
  loop = ig.integrated_gradients(logit_fn, variables, x, baseline, targets, steps=10, vectorized=False)
  scale = np.abs(loop.attributions).max()
  np.testing.assert_allclose(batched.attributions, loop.attributions, atol=1e-5 * scale)
  np.testing.assert_allclose(batched.logits, loop.logits, rtol=1e-6)
  for i, target in enumerate(targets):
    single = ig.integrated_gradients(logit_fn, variables, x, baseline, target, steps=10, chunk_size=4)
    np.testing.assert_allclose(single.attributions[0], batched.attributions[i], atol=1e-5 * scale)
  # Away from the border a target draws on 7 x 7 px or more (3x3 conv, strided 3x3 conv, 3x3 conv).
  assert np.count_nonzero(batched.maps[0]) >= 49 and np.count_nonzero(batched.maps[1]) >= 49
  assert not np.allclose(batched.maps[0], batched.maps[1])


def test_completeness_gap_is_reported_and_shrinks_with_steps(small_net):
  logit_fn, variables = small_net
  image = _image((32, 32), seed=6)
  x = ig.input_window(image, mean=MEAN, std=STD)
  baseline = ig.make_baseline("black", image, mean=MEAN, std=STD)
  targets = [[5, 5], [20, 14], [30, 30], [12, 25]]
  gaps = []
  for steps in (4, 16, 64):  # several chunks of 4 each
    result = ig.integrated_gradients(logit_fn, variables, x, baseline, targets, steps=steps, chunk_size=4)
    change = result.logits - result.baseline_logits
    expected = result.attributions.reshape(len(targets), -1).sum(1) - change
    np.testing.assert_allclose(result.completeness_gap, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.completeness_gap_rel, expected / np.abs(change), rtol=1e-3)
    gaps.append(np.abs(result.completeness_gap).mean())
  assert gaps[0] > gaps[1] > gaps[2], gaps


# U-Net runs in the run tests, the plain U-Net in the crop test below. LinkNet's last block keeps width x 32
# channels: at 1/16 most pixels would see only dead ReLUs.
@pytest.mark.parametrize("name,options", [("linknet", {"encoder": "resnet18", "width": 1 / 4}),
                                          ("casenet", {"encoder": "resnet18", "width": 1 / 16})])
def test_registry_models_are_complete_by_euler(name, options):
  """With zero biases and BatchNorm shifts a registry model is positively homogeneous, F(a x) = a F(x), so the
  gradient is constant along the path from the zero baseline and one step is exact: sum(IG) = x . grad F(x) = F(x)."""
  model = models.build(name, **options)
  variables = models.random_variables(models.abstract_variables(model, (1, 32, 32, 1)), seed=1)
  x = ig.input_window(_image((32, 32), seed=9), mean=MEAN, std=STD)
  result = ig.integrated_gradients(ig.ModelLogits(model), variables, x, np.zeros_like(x), [[3, 4], [20, 27]],
                                   steps=1, chunk_size=1)
  np.testing.assert_allclose(result.baseline_logits, 0.0, atol=1e-6)
  np.testing.assert_allclose(result.attributions.reshape(2, -1).sum(1), result.logits,
                             atol=1e-4 * np.abs(result.attributions).sum())
  assert np.all(np.count_nonzero(result.maps, axis=(1, 2)) > 100)


def test_baselines():
  image = _image((40, 50), seed=7)
  window = ig.Crop(top=8, left=10, height=16, width=24, target=(0, 0))
  x = ig.input_window(image, window, mean=MEAN, std=STD)
  np.testing.assert_allclose(x[..., 0], (image[8:24, 10:34] / 255 - MEAN) / STD, atol=1e-5)
  np.testing.assert_array_equal(ig.make_baseline("zeros", image, window, mean=MEAN, std=STD), 0.0)
  black = ig.make_baseline("black", image, window, mean=MEAN, std=STD)
  np.testing.assert_allclose(black, (0 - MEAN) / STD, rtol=1e-6)
  # A window's baseline is the same window of the whole image's baseline.
  for kind in ("blurred", "noise"):
    whole = ig.make_baseline(kind, image, mean=MEAN, std=STD, seed=3, blur_sigma=2.0)
    part = ig.make_baseline(kind, image, window, mean=MEAN, std=STD, seed=3, blur_sigma=2.0)
    np.testing.assert_allclose(part, whole[8:24, 10:34], atol=1e-5)
  blurred = ig.make_baseline("blurred", image, mean=MEAN, std=STD, blur_sigma=2.0)
  assert blurred.std() < 0.5 * ig.input_window(image, mean=MEAN, std=STD).std()  # noise image: blur smooths it
  noise = ig.make_baseline("noise", image, mean=MEAN, std=STD, seed=3)[..., 0] * STD + MEAN  # back to gray [0, 1]
  assert 0 <= noise.min() and noise.max() <= 1 and abs(noise.mean() - 0.5) < 0.05
  assert not np.allclose(noise, ig.make_baseline("noise", image, mean=MEAN, std=STD, seed=4)[..., 0] * STD + MEAN)
  with pytest.raises(ValueError, match="zeros"):
    ig.make_baseline("gray", image, mean=MEAN, std=STD)


def test_receptive_field_crop_is_aligned_clipped_and_reindexes_the_target():
  crop = ig.receptive_field_crop((1000, 800), (500, 300), 100)
  assert crop.box == (384, 192, 224, 224)  # rows [400, 600] -> [384, 608), cols [200, 400] -> [192, 416)
  assert crop.target == (116, 108)
  assert crop.top + crop.target[0] == 500 and crop.left + crop.target[1] == 300
  corner = ig.receptive_field_crop((1000, 800), (10, 790), 100)
  assert corner.box == (0, 672, 128, 128) and corner.target == (10, 118)  # clipped at the borders
  assert ig.receptive_field_crop((256, 256), (100, 100), None).box == (0, 0, 256, 256)
  assert ig.receptive_field_crop((256, 256), (100, 100), 10_000).box == (0, 0, 256, 256)
  # A side that is not a multiple of 32: the window ends flush with the far border.
  edge = ig.receptive_field_crop((1000, 100), (990, 98), 40)
  assert edge.box == (904, 4, 96, 96) and edge.target == (86, 94)
  for crop in (crop, corner, edge):
    assert crop.height % 32 == 0 and crop.width % 32 == 0
  with pytest.raises(ValueError, match="outside"):
    ig.receptive_field_crop((64, 64), (64, 0), 10)


@pytest.mark.parametrize("dilations,radius", [((1, 1, 1), 3), ((1, 2, 4), 7)])
def test_measured_receptive_field_of_a_conv_stack(dilations, radius):
  module = ConvStack(dilations)
  variables = _init(module, (1, 8, 8, 1), seed=1)
  assert receptive_field.receptive_field_radius(ig.ModelLogits(module), variables, multiple=1, size=64) == radius
  # On the 32 px grid the radius covers every phase of the grid: 31 more.
  assert receptive_field.receptive_field_radius(ig.ModelLogits(module), variables, multiple=32, size=128) == radius + 31


def test_crop_around_the_receptive_field_equals_the_whole_image():
  model = models.build("plain_unet", width=1 / 16)
  radius = receptive_field.model_receptive_field_radius(model)
  assert 100 < radius < 160  # 92 px of 3x3 convs at strides 1..16, the pooling grid's phase and the 32 px grid's
  variables = models.random_variables(models.abstract_variables(model, (1, 32, 32, 1)), seed=2)
  image = _image((256, 320), seed=8)
  target = (60, 250)
  [whole] = ig.attribute_image(ig.ModelLogits(model), variables, image, [target], mean=MEAN, std=STD,
                               baseline="blurred", blur_sigma=3.0, radius=None, steps=2, chunk_size=2)
  [cropped] = ig.attribute_image(ig.ModelLogits(model), variables, image, [target], mean=MEAN, std=STD,
                                 baseline="blurred", blur_sigma=3.0, radius=radius, steps=2, chunk_size=2)
  top, left = cropped.origin
  height, width = cropped.maps.shape[1:]
  assert (top, left, height, width) == (0, 96, 192, 224)
  np.testing.assert_array_equal(cropped.targets, [target])
  np.testing.assert_allclose(cropped.logits, whole.logits, rtol=1e-5, atol=1e-5)
  inside = whole.maps[0, top:top + height, left:left + width]
  scale = np.abs(whole.maps).max()
  np.testing.assert_allclose(cropped.maps[0], inside, atol=1e-5 * scale)
  assert np.abs(whole.maps[0]).sum() - np.abs(inside).sum() <= 1e-5 * np.abs(inside).sum()  # nothing outside


def test_clear_errors():
  module = PointwiseConv()
  variables = _init(module, (1, 8, 8, 1))
  x = np.zeros((8, 8, 1), np.float32)
  logit_fn = ig.ModelLogits(module)
  with pytest.raises(ValueError, match="outside"):
    ig.integrated_gradients(logit_fn, variables, x, x, [(8, 0)], steps=2)
  with pytest.raises(ValueError, match="baseline"):
    ig.integrated_gradients(logit_fn, variables, x, x[:4], [(0, 0)], steps=2)
  with pytest.raises(ValueError, match=r"\[H, W, C\]"):
    ig.integrated_gradients(logit_fn, variables, x[..., 0], x[..., 0], [(0, 0)], steps=2)
  with pytest.raises(ValueError, match="multiples of 32"):
    ig.attribute_image(logit_fn, variables, _image((40, 64)), [(0, 0)], mean=MEAN, std=STD, radius=None, steps=2)


# ----------------------------------------------------------------------------------------------------------------
# Quadrature accuracy against closed forms, and refinement to a completeness tolerance.

class PolynomialLogits:
  """F_t(x) = sum_p sum_i K[p - 1, i, t] x_i^p (p = 1..D): separable, so IG_t,i = sum_p K[p-1, i, t] (x_i^p - x'_i^p)
  exactly, and along the straight path the integrand is a polynomial of degree D - 1 in a."""

  def __call__(self, variables, x):
    kernel = variables["kernel"]  # [D, H, W, C, T]
    powers = jnp.stack([x**p for p in range(1, kernel.shape[0] + 1)], axis=1)  # [N, D, H, W, C]
    return jnp.einsum("ndhwc,dhwct->nt", powers, kernel)[:, None, :]  # [N, 1, T]: target t at (0, t)

  def __hash__(self):
    return 0

  def __eq__(self, other):
    return isinstance(other, PolynomialLogits)


def _polynomial(degrees, seed=0):
  """Variables of PolynomialLogits with one target per entry of `degrees` (target t has degree degrees[t])."""
  rng = np.random.default_rng(seed)
  kernel = rng.normal(size=(max(degrees), 3, 3, 1, len(degrees))) / 2
  for t, degree in enumerate(degrees):
    kernel[degree:, ..., t] = 0
  x, baseline = rng.uniform(-1.5, 1.5, size=(2, 3, 3, 1)).astype(np.float32)
  exact = np.stack([sum(kernel[p - 1, ..., t] * (x.astype(np.float64)**p - baseline.astype(np.float64)**p)
                        for p in range(1, max(degrees) + 1)) for t in range(len(degrees))])
  targets = np.array([[0, t] for t in range(len(degrees))])
  return {"kernel": jnp.asarray(kernel, jnp.float32)}, x, baseline, targets, exact


@pytest.mark.parametrize("rule", ig.RULES)
def test_linear_and_quadratic_maps_match_closed_form_ig(rule):
  variables, x, baseline, targets, exact = _polynomial([1, 2])
  gaps = []
  for nodes in (2, 8, 32):
    result = ig.integrated_gradients(PolynomialLogits(), variables, x, baseline, targets, steps=nodes,
                                     nodes_per_interval=nodes, rule=rule, chunk_size=8)
    np.testing.assert_allclose(result.attributions[0], exact[0], atol=2e-5)  # linear map: constant integrand
    assert abs(result.completeness_gap[0]) < 2e-5
    gaps.append(abs(float(result.completeness_gap[1])))
    if rule in ("gauss_legendre", "riemann_middle", "trapezoid"):  # exact on a linear integrand
      np.testing.assert_allclose(result.attributions[1], exact[1], atol=2e-5)
  if rule in ("riemann_right", "riemann_left"):  # error c1 / (2n): exactly O(1/n), to zero
    assert gaps[0] > 0.01
    np.testing.assert_allclose(np.array(gaps) * [2, 8, 32], gaps[0] * 2, rtol=1e-3)
  else:
    assert max(gaps) < 2e-5


def test_gauss_legendre_is_exact_for_integrands_of_degree_up_to_2n_minus_1():
  # F of degree 8: the integrand has degree 7, integrated exactly by 4 Gauss-Legendre nodes, not by 3.
  variables, x, baseline, targets, exact = _polynomial([8], seed=1)
  errors = {}
  for nodes in (3, 4, 6):
    result = ig.integrated_gradients(PolynomialLogits(), variables, x, baseline, targets, steps=nodes,
                                     nodes_per_interval=nodes, chunk_size=8)
    errors[nodes] = np.abs(result.attributions[0] - exact[0]).max()
  scale = np.abs(exact).max()
  assert errors[3] > 1e-3 * scale and errors[4] < 1e-5 * scale and errors[6] < 1e-5 * scale, (errors, scale)


def test_refinement_meets_the_tolerance_and_costs_only_the_targets_that_need_it():
  variables, x, baseline, targets, exact = _polynomial([1, 6, 2], seed=2)
  # Right Riemann (errs by O(1/n) on each interval, always with the sign of the integrand's slope) needs hundreds
  # of nodes here.
  result = ig.integrated_gradients(PolynomialLogits(), variables, x, baseline, targets, steps=4, rule="riemann_right",
                                   tolerance=1e-2, max_nodes=4096, chunk_size=8)
  assert result.met_tolerance.all(), result.completeness_gap
  change = np.abs(result.logits - result.baseline_logits)
  assert np.all(np.abs(result.completeness_gap) <= 1e-2 * np.maximum(change, 1))
  assert result.nodes[0] == result.evaluations[0] == 4  # the linear map is exact at once
  assert result.nodes[1] > result.nodes[2] > 4  # the higher degree needs more
  np.testing.assert_allclose(result.attributions, exact, atol=1e-2 * np.abs(exact).max())
  capped = ig.integrated_gradients(PolynomialLogits(), variables, x, baseline, targets, steps=4, rule="riemann_right",
                                   tolerance=1e-2, max_nodes=8, chunk_size=8)
  assert list(capped.met_tolerance) == [True, False, False] and capped.nodes.max() <= 8
  one_pass = ig.integrated_gradients(PolynomialLogits(), variables, x, baseline, targets, steps=4,
                                     rule="riemann_right", chunk_size=8)
  assert list(one_pass.nodes) == [4, 4, 4] and one_pass.tolerance is None and one_pass.met_tolerance.all()


def test_refinement_on_a_relu_network_meets_the_tolerance_and_equals_the_textbook_loop(small_net):
  """A ReLU network's gradient jumps along the path; splitting the intervals with the largest local gaps meets the
  default tolerance where the first pass does not, and the batched passes equal one jax.grad per point."""
  logit_fn, variables = small_net
  image = _image((32, 32), seed=6)
  x = ig.input_window(image, mean=MEAN, std=STD)
  baseline = ig.make_baseline("black", image, mean=MEAN, std=STD)
  targets = np.array([[5, 5], [20, 14], [30, 30], [12, 25]])
  first = ig.integrated_gradients(logit_fn, variables, x, baseline, targets, steps=8, chunk_size=8)
  refined = ig.integrated_gradients(logit_fn, variables, x, baseline, targets, steps=8, tolerance=0.01,
                                    max_nodes=512, chunk_size=8)
  assert refined.met_tolerance.all(), refined.completeness_gap
  assert not ig.completeness_met(first.completeness_gap, first.logits, first.baseline_logits, 0.01).all()
  assert np.all(refined.evaluations >= refined.nodes) and refined.nodes.max() > 8
  loop = ig.integrated_gradients(logit_fn, variables, x, baseline, targets[:2], steps=8, tolerance=0.01,
                                 max_nodes=512, vectorized=False)
  np.testing.assert_array_equal(loop.nodes, refined.nodes[:2])
  np.testing.assert_allclose(loop.attributions, refined.attributions[:2], atol=1e-4 * np.abs(loop.attributions).max())


def test_refinement_options_are_checked():
  variables, x, baseline, targets, _ = _polynomial([1])
  with pytest.raises(ValueError, match="max_nodes"):
    ig.integrated_gradients(PolynomialLogits(), variables, x, baseline, targets, steps=8, tolerance=0.01, max_nodes=4)
  with pytest.raises(ValueError, match="tolerance"):
    ig.integrated_gradients(PolynomialLogits(), variables, x, baseline, targets, steps=8, tolerance=-1.0)
  with pytest.raises(ValueError, match="nodes_per_interval"):
    ig.integrated_gradients(PolynomialLogits(), variables, x, baseline, targets, steps=8, rule="trapezoid",
                            nodes_per_interval=1)
