"""Mixed precision as accelerator users expect: config.model.dtype="auto" computes in bfloat16 on GPUs and TPUs and in
float32 on the CPU, while parameters, BatchNorm statistics, the loss and the optimizer state stay float32, so a
bfloat16 step is a float32 step to bfloat16's rounding and checkpoints move freely between the two."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from urisc_jax import checkpoint, losses, models, platforms, train
from urisc_jax import state as state_lib

# A bfloat16 run follows the float32 run from the same start on the same batches: measured on this CPU (U-Net- and
# LinkNet-ResNet18 at 1/8 width, 2 x 64^2 crops, Adam 2e-3, 12 steps), losses within 2 % at every step.
LOSS_RTOL = 0.03
TRAJECTORY_STEPS = 12


def _model(name, dtype):
  return state_lib.build_model(ml_collections.ConfigDict(
      {"name": name, "encoder": "resnet18", "width": 0.125, "dtype": dtype}))


def _batches(count):
  rng = np.random.default_rng(3)
  images = [rng.integers(0, 256, (2, 64, 64, 1), dtype=np.uint8) for _ in range(count)]
  return [{"image": image, "label": (image < 60).astype(np.uint8)} for image in images]


def _state(model, tx):
  variables = models.random_variables(models.abstract_variables(model, (1, 64, 64, 1)), seed=5)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                               batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))
  # Committed to the device, as restored checkpoints are: one compilation serves both.
  return jax.device_put(state, jax.devices()[0])


@pytest.fixture(scope="module")
def steps():
  """Jitted train steps by (model, dtype), compiled once for the module's tests."""
  tx = optax.adam(2e-3)
  return tx, {(name, dtype): jax.jit(train.make_train_step(_model(name, dtype), tx, losses.focal_dice, mean=0.5,
                                                           std=0.25))
              for name in ("unet", "linknet") for dtype in ("float32", "bfloat16")}


def _float_dtypes(tree) -> set:
  return {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


def test_the_default_config_computes_in_float32_on_the_cpu_and_bfloat16_on_accelerators():
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  assert config.model.dtype == "auto"
  assert state_lib.build_model(config.model).dtype == platforms.compute_dtype("auto")
  assert platforms.compute_dtype("auto", backend="cpu") == jnp.float32
  assert platforms.compute_dtype("auto", backend="gpu") == jnp.bfloat16


@pytest.mark.parametrize("name", ["unet", "linknet"])
def test_a_bfloat16_run_follows_the_float32_run_and_keeps_float32_state(name, steps):
  """Per-step gradients of these random-weight networks are far apart at initialization (their train-mode backward
  pass amplifies bfloat16's rounding through the layers: cosine 0.84-0.89 to float32's, while float32 and float64
  agree to 1e-7), so what is compared is what a user sees: the run."""
  tx, step_of = steps
  losses_by_dtype = {}
  for dtype in ("float32", "bfloat16"):
    step = step_of[name, dtype]
    state, trajectory = _state(_model(name, "float32"), tx), []
    for batch in _batches(TRAJECTORY_STEPS):
      state, metrics = step(state, batch, jax.random.key(0))
      trajectory.append(float(metrics["loss"]))
    losses_by_dtype[dtype] = np.array(trajectory)
    for part in ("params", "batch_stats", "opt_state"):
      assert _float_dtypes(getattr(state, part)) == {jnp.dtype(jnp.float32)}, (dtype, part)
  low, high = losses_by_dtype["bfloat16"], losses_by_dtype["float32"]
  assert np.all(np.isfinite(low))
  np.testing.assert_allclose(low, high, rtol=LOSS_RTOL)
  assert low[-4:].mean() < low[:4].mean() and high[-4:].mean() < high[:4].mean()


def test_checkpoints_move_between_bfloat16_and_float32_runs(tmp_path, steps):
  tx, step_of = steps
  batch = _batches(1)[0]
  low, high = _model("unet", "bfloat16"), _model("unet", "float32")
  low_step, high_step = step_of["unet", "bfloat16"], step_of["unet", "float32"]
  trained, _ = low_step(_state(low, tx), batch, jax.random.key(0))

  saver = checkpoint.Checkpointer(tmp_path / "checkpoints")
  saver.save(1, trained)
  saver.close()
  # Restored into the float32 run's state: the same arrays, and its step runs on them.
  restored, _, _ = checkpoint.Checkpointer(tmp_path / "checkpoints").restore(1, _state(high, tx))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(trained)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  continued, metrics = high_step(restored, batch, jax.random.key(1))
  assert np.isfinite(float(metrics["loss"])) and int(continued.step) == 2
  # And back: a float32 state into the bfloat16 run.
  saver = checkpoint.Checkpointer(tmp_path / "checkpoints")
  saver.save(2, continued)
  saver.close()
  back, _, _ = checkpoint.Checkpointer(tmp_path / "checkpoints").restore(2, _state(low, tx))
  _, metrics = low_step(back, batch, jax.random.key(2))
  assert np.isfinite(float(metrics["loss"]))
