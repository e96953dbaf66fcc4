"""Each operation's form per backend (`urisc_jax.platforms`): plain convolutions in bfloat16 for GPUs and TPUs, the
measured-fastest forms on the CPU, and the same numbers either way.

What a GPU or TPU would compile is read from the program lowered for it on this CPU machine
(`lowering_platforms=("cuda",)` / `("tpu",)`), as XLA:GPU and XLA:TPU receive it.
"""

import collections
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from urisc_jax import inference, losses, models, platforms, train
from urisc_jax.state import TrainState

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "models"
sys.path.insert(0, str(FIXTURES))
import make_cpu_forms_golden as golden  # pylint: disable=g-import-not-at-top,wrong-import-position

GOLDEN = FIXTURES / "cpu_forms_golden.npz"

# Every model family, narrow (the lowered program has the same operations at any width).
LOWERED_MODELS = {
    "unet_resnet50": ("unet", {"encoder": "resnet50", "width": 0.125}, 64),
    "linknet_resnet18": ("linknet", {"encoder": "resnet18", "width": 0.25}, 64),
    "casenet_urisc": ("casenet", {"encoder": "resnet50", "width": 0.0625}, 32),
    "casenet_original": ("casenet", {"variant": "original", "encoder": "resnet50", "width": 0.0625}, 32),
    "plain_unet": ("plain_unet", {"width": 0.125}, 32),
}


# Leaves whose exact gradient is zero (a bias before a BatchNorm) hold only rounding noise, which scales with the
# network, not with the leaf: each leaf's scale is its own gradient norm plus this fraction of the largest one.
ZERO_GRADIENT_FLOOR = 1e-3


def assert_close_to_golden(got: dict, want: dict, direction_norms: np.ndarray, *, logits_rtol: float,
                           gradients_rtol: float, what: str) -> None:
  """Logits within `logits_rtol` of the largest stored logit; each leaf's gradient norm within `gradients_rtol` of
  its scale, and its projection on a direction d within `gradients_rtol` x scale x |d| (Cauchy-Schwarz: the most a
  gradient error of that relative size can move the projection)."""
  logits_scale = np.abs(want["logits"]).max()
  np.testing.assert_allclose(got["logits"], want["logits"], rtol=0, atol=logits_rtol * logits_scale,
                             err_msg=f"{what}/logits")
  norms = want["grad_norms"]
  scale = norms + ZERO_GRADIENT_FLOOR * norms.max()
  np.testing.assert_array_less(np.abs(got["grad_norms"] - norms), gradients_rtol * scale,
                               err_msg=f"{what}/grad_norms")
  np.testing.assert_array_less(np.abs(got["grad_projections"] - want["grad_projections"]),
                               gradients_rtol * scale * direction_norms, err_msg=f"{what}/grad_projections")


def _stored(case: str) -> dict:
  stored = np.load(GOLDEN)
  return {key: stored[f"{case}/{key}"] for key in ("logits", "grad_norms", "grad_projections")}


def _direction_norms(directions) -> np.ndarray:
  return np.array([np.linalg.norm(d) for d in jax.tree.leaves(directions)])


@pytest.mark.numerics
@pytest.mark.parametrize("case", sorted(golden.CASES))
def test_cpu_forms_compute_the_stored_function_in_float64(case):
  """The CPU forms compute, in float64, the function stored in the golden file (tests/fixtures/models/
  make_cpu_forms_golden.py), values and gradients.

  Gradients to 1e-9: float64 throughout (the backward pass starts from the cotangent, exact in float64), and float64
  rounding (1.1e-16) amplified by these networks (float32 shows up to ~3e4 ulps for single train-mode gradient
  elements) stays near 1e-12: computed under XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 on one core (taskset -c 0), every
  norm and projection was within 7e-13 of the file, written with AVX2 on two cores. 1e-9 leaves three decades for
  any other CPU's blocking, instruction set or thread count. Logits to 2.5e-7 of the largest: the models return
  float32 logits by design (their heads cast to what the loss and the sigmoid take), so the float64 function's
  logits carry one final float32 rounding, which a 1e-13 difference underneath can move by one ulp (6e-8 relative).
  Either bound still catches any change of the function: a swapped or flipped kernel, a missing BatchNorm, a wrong
  phase of a transposed convolution or a wrong epsilon move values by far more."""
  with jax.enable_x64(True):
    inputs = golden.case_inputs(golden.CASES[case], jnp.float64)
    got = golden.case_values(*inputs)
  assert all(leaf.dtype == np.float64 for leaf in jax.tree.leaves(inputs[1]))
  assert_close_to_golden(got, _stored(case), _direction_norms(inputs[-1]), logits_rtol=2.5e-7, gradients_rtol=1e-9,
                         what=case)


@pytest.mark.numerics
@pytest.mark.parametrize("case", sorted(golden.CASES))
def test_cpu_forms_in_float32_stay_within_float32_rounding_of_the_stored_function(case):
  """The float32 forms (what training and prediction run on the CPU) compute the stored float64 function to float32
  rounding.

  Logits: 1e-4 of the largest logit; measured 3e-7 to 1.3e-6 (U-Net-ResNet50's 50 layers the most), so the bound
  leaves ~80x for another CPU's blocking, instruction set and thread count, and still catches a change of any
  logit by 1e-4 of the largest. Gradients: 1e-2 of each leaf's scale; train-mode BatchNorm over a batch of 2
  amplifies float32 rounding (single elements of a leaf differ by up to 0.4 % between two summation orders; the
  norms and projections, which average over a leaf, were measured within 1.5e-4), so 1e-2 leaves ~60x, and a wrong
  form (a swapped or flipped kernel, a missing normalization, a transposed convolution's wrong phase) changes the
  gradients of every leaf it touches by order 1."""
  inputs = golden.case_inputs(golden.CASES[case])
  got = golden.case_values(*inputs)
  assert_close_to_golden(got, _stored(case), _direction_norms(inputs[-1]), logits_rtol=1e-4, gradients_rtol=1e-2,
                         what=case)


@pytest.mark.numerics
def test_the_golden_comparison_catches_a_flipped_kernel():
  """What the float32 tolerances would still catch: one 3x3 kernel of the plain U-Net flipped (a convolution that
  became a correlation, the classic port bug) fails the comparison."""
  model, variables, x, cotangent, directions = golden.case_inputs(golden.CASES["plain_unet"])
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  path, kernel = next((p, k) for p, k in flat if k.ndim == 4 and k.shape[:2] == (3, 3))
  flipped = jax.tree_util.tree_map_with_path(lambda p, k: k[::-1, ::-1] if p == path else k, variables["params"])
  got = golden.case_values(model, {**variables, "params": flipped}, x, cotangent, directions)
  with pytest.raises(AssertionError):
    assert_close_to_golden(got, _stored("plain_unet"), _direction_norms(directions), logits_rtol=1e-4,
                           gradients_rtol=1e-2, what="plain_unet with a flipped kernel")


def _train_mode_logits_and_gradients(model, variables, x, cotangent, directions):
  del directions
  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                            mutable=["batch_stats"])
    return jnp.vdot(logits, cotangent), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  return np.asarray(logits), [np.asarray(g) for g in jax.tree.leaves(grads)]


@pytest.mark.numerics
@pytest.mark.parametrize("case", [
    ("unet", {"encoder": "resnet18", "width": 0.125}, (2, 64, 64, 1)),  # 1x1, folded upsampling, swapped gradients
    golden.CASES["linknet_resnet18"],  # phase transposed convolutions
], ids=["unet_resnet18", "linknet_resnet18"])
def test_the_accelerator_forms_compute_the_same_values_and_gradients(case, monkeypatch):
  """The plain convolutions GPUs and TPUs get, run here on the CPU, give what the CPU forms give: the per-backend
  choice changes speed, not the model. In float64, so that the comparison is not lost in the rounding of a deep
  network in train mode (float32 gradients of these random networks differ by up to 0.4 % between any two
  summation orders)."""
  with jax.enable_x64(True):
    cpu_logits, cpu_grads = _train_mode_logits_and_gradients(*golden.case_inputs(case, jnp.float64))
    monkeypatch.setattr(platforms, "per_backend", lambda *, cpu, accelerator: accelerator)
    logits, grads = _train_mode_logits_and_gradients(*golden.case_inputs(case, jnp.float64))
  np.testing.assert_allclose(logits, cpu_logits, rtol=1e-6, atol=1e-9 * np.abs(cpu_logits).max())
  # One scale for all leaves: gradients that are 0 in exact arithmetic (a bias before a BatchNorm) come out as
  # rounding noise of 1e-15 in either form.
  largest = max(np.abs(g).max() for g in cpu_grads)
  for got, want in zip(grads, cpu_grads):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * largest)


def _abstract_train_step(family, overrides, size, dtype):
  model = models.build(family, in_channels=1, num_classes=1, dtype=dtype, **overrides)
  shape = (2, size, size, 1)
  abstract = models.abstract_variables(model, shape)
  tx = optax.adam(1e-3)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract["params"],
                     batch_stats=abstract["batch_stats"], opt_state=jax.eval_shape(tx.init, abstract["params"]))
  batch = {"image": jax.ShapeDtypeStruct(shape, jnp.uint8), "label": jax.ShapeDtypeStruct(shape, jnp.uint8)}
  step = jax.jit(train.make_train_step(model, tx, losses.focal_dice, mean=0.5, std=0.25))
  return model, abstract, step.trace(state, batch, jax.random.key(0))


def _module_facts(text: str) -> dict:
  """What a lowered StableHLO module does that matters here."""
  ops = collections.Counter(re.findall(r"stablehlo\.([a-z_]+)", text))
  matrix_products = [line for line in text.splitlines() if "stablehlo.dot_general" in line
                     and len(re.findall(r"tensor<\d+x\d+x[a-z]+\d*>", line.split(" : ", 1)[1])) >= 3]
  transposes_6d = [line for line in text.splitlines() if "stablehlo.transpose" in line
                   and re.search(r"tensor<(\d+x){6}[a-z]", line)]
  convolutions = [line for line in text.splitlines() if "stablehlo.convolution" in line]
  return {"ops": ops, "matrix_products": matrix_products, "transposes_6d": transposes_6d,
          "convolutions": convolutions,
          "bf16_convolutions": [line for line in convolutions if re.search(r"\(tensor<[0-9x]+xbf16>, tensor<[0-9x]+xbf16>",
                                                                           line)],
          "dilated_convolutions": [line for line in convolutions if "lhs_dilate = [1, 1]" not in line]}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", sorted(LOWERED_MODELS))
def test_accelerators_get_plain_bfloat16_convolutions_in_the_train_step_and_tile_forward(name, platform):
  family, overrides, size = LOWERED_MODELS[name]
  dtype = platforms.compute_dtype("auto", backend="gpu" if platform == "cuda" else "tpu")
  assert dtype == jnp.bfloat16
  model, abstract, traced_step = _abstract_train_step(family, overrides, size, dtype)
  forward = jax.jit(inference.tile_forward_function(model, mean=0.5, std=0.25))
  tiles = jax.ShapeDtypeStruct((2, size, size, 1), jnp.uint8)
  lowered = {"train step": traced_step.lower(lowering_platforms=(platform,)).as_text(),
             "tile forward": forward.trace(abstract, tiles).lower(lowering_platforms=(platform,)).as_text()}
  for what, text in lowered.items():
    facts = _module_facts(text)
    # A 1x1 convolution written as a matrix product multiplies two rank-2 tensors ([N*H*W, C] by [C, F], or the
    # transposed products of its gradient). CASENet's bilinear resizes contract one image axis with a resize matrix
    # (a rank-2 by a rank-4 tensor), which is what they should be.
    assert not facts["matrix_products"], (what, facts["matrix_products"][:3])
    assert not facts["transposes_6d"], (what, "phase depth-to-space", facts["transposes_6d"][:3])
    assert facts["convolutions"], what
    assert len(facts["bf16_convolutions"]) == len(facts["convolutions"]), (what, "every convolution in bfloat16")
  if family in ("linknet", "plain_unet") or overrides.get("variant") == "original":
    # Transposed convolutions reach the backend as lhs-dilated convolutions (cuDNN's data-gradient kernels).
    assert _module_facts(lowered["tile forward"])["dilated_convolutions"], "transposed convolutions"


def test_the_cpu_gets_the_matrix_product_and_phase_forms():
  """Lowered for the CPU, the same programs hold the CPU forms: 1x1 convolutions as matrix products, and transposed
  convolutions over their output phases instead of lhs-dilated convolutions."""
  _, _, traced = _abstract_train_step("unet", {"encoder": "resnet50", "width": 0.125}, 64, jnp.float32)
  assert len(_module_facts(traced.lower(lowering_platforms=("cpu",)).as_text())["matrix_products"]) > 50
  model = models.build("linknet", encoder="resnet18", width=0.25, in_channels=1, num_classes=1)
  forward = jax.jit(inference.tile_forward_function(model, mean=0.5, std=0.25))
  traced = forward.trace(models.abstract_variables(model, (2, 64, 64, 1)), jax.ShapeDtypeStruct((2, 64, 64, 1),
                                                                                                   jnp.uint8))
  dilated = {platform: _module_facts(traced.lower(lowering_platforms=(platform,)).as_text())["dilated_convolutions"]
             for platform in ("cpu", "cuda")}
  assert not dilated["cpu"] and len(dilated["cuda"]) == 5  # the 4 decoder blocks' and the head's x2 upsampling


@pytest.mark.parametrize("name,backend,expected", [
    ("auto", "cpu", jnp.float32), ("auto", "gpu", jnp.bfloat16), ("auto", "cuda", jnp.bfloat16),
    ("auto", "rocm", jnp.bfloat16), ("auto", "tpu", jnp.bfloat16), ("float32", "gpu", jnp.float32),
    ("bfloat16", "cpu", jnp.bfloat16)])
def test_compute_dtype_auto_is_bfloat16_on_accelerators_only(name, backend, expected):
  assert platforms.compute_dtype(name, backend=backend) == expected


def test_an_unknown_dtype_names_the_key_and_the_choices():
  with pytest.raises(ValueError, match=r"config.model.dtype='float33'.*auto, float32, bfloat16"):
    platforms.compute_dtype("float33")
