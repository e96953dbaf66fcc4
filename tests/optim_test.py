"""Schedules at known steps, the encoder's learning-rate multiplier, clipping, gradient accumulation equal to one
large batch, and a bfloat16 train step that keeps float32 parameters."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from urisc_jax import losses, models, optim, train
from urisc_jax import state as state_lib


def _config(**overrides):
  """The default config's optim block (keys as configs/default.py has them), with overrides."""
  from configs import default
  config = default.get_config().optim
  config.update(overrides)
  return config


def _lr(config, num_steps, step):
  return float(optim.schedule_from_config(config, num_steps)(step))


def test_cosine_warms_up_linearly_then_decays_to_the_end_value():
  config = _config(schedule="cosine", learning_rate=1e-2, warmup_steps=10, end_lr_factor=0.1)
  assert _lr(config, 110, 0) == 0.0
  assert _lr(config, 110, 5) == pytest.approx(5e-3)
  assert _lr(config, 110, 10) == pytest.approx(1e-2)  # warm-up end = peak
  assert _lr(config, 110, 60) == pytest.approx(1e-3 + (1e-2 - 1e-3) / 2)  # half way down the cosine
  assert _lr(config, 110, 110) == pytest.approx(1e-3)
  values = [_lr(config, 110, s) for s in range(10, 111)]
  assert all(b <= a for a, b in zip(values, values[1:]))


def test_poly_follows_the_polynomial_to_the_end_value():
  config = _config(schedule="poly", learning_rate=1e-2, warmup_steps=10, end_lr_factor=0.0, poly_power=0.9)
  assert _lr(config, 110, 10) == pytest.approx(1e-2)
  assert _lr(config, 110, 60) == pytest.approx(1e-2 * 0.5 ** 0.9)
  assert _lr(config, 110, 110) == pytest.approx(0.0, abs=1e-12)


def test_constant_stays_at_the_peak_after_warm_up():
  config = _config(schedule="constant", learning_rate=3e-3, warmup_steps=4)
  assert _lr(config, 50, 2) == pytest.approx(1.5e-3)
  assert [_lr(config, 50, s) for s in (4, 25, 49)] == pytest.approx([3e-3] * 3)


def test_one_cycle_rises_from_peak_over_div_factor_and_falls_to_the_end():
  config = _config(schedule="one_cycle", learning_rate=1e-2, one_cycle_pct_start=0.3, one_cycle_div_factor=25.0,
                   end_lr_factor=1e-3)
  values = np.array([_lr(config, 100, s) for s in range(101)])
  assert values[0] == pytest.approx(1e-2 / 25, rel=1e-5)
  assert values[15] == pytest.approx((1e-2 / 25 + 1e-2) / 2)  # linear rise
  assert values.argmax() == 30 and values[30] == pytest.approx(1e-2)
  assert np.all(np.diff(values[:31]) > 0) and np.all(np.diff(values[30:]) < 0)
  assert values[100] == pytest.approx(1e-5)


def test_with_accumulation_the_schedule_advances_once_per_update():
  config = _config(schedule="cosine", learning_rate=1e-2, warmup_steps=2, accumulate_steps=4)
  per_update = optim.update_schedule(config, 10)  # 40 train steps = 10 updates
  for step in range(40):
    assert _lr(config, 40, step) == pytest.approx(float(per_update(step // 4)))
  assert _lr(config, 40, 8) == pytest.approx(1e-2)  # the third update is the warm-up's end


@pytest.mark.parametrize("key, value, choices", [("schedule", "linear", "one_cycle"), ("name", "lion", "sgd")])
def test_unknown_names_say_which_key_to_set_and_the_choices(key, value, choices):
  with pytest.raises(ValueError, match=f"config.optim.{key}.*{choices}"):
    optim.optimizer_from_config(_config(**{key: value}), 10)


def test_accumulate_steps_below_one_is_rejected():
  with pytest.raises(ValueError, match="config.optim.accumulate_steps"):
    optim.optimizer_from_config(_config(accumulate_steps=0), 10)


def test_configs_without_the_optional_keys_still_build():
  old = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3, "schedule": "cosine", "warmup_steps": 5,
                                   "end_lr_factor": 0.05, "weight_decay": 1e-4, "grad_clip_norm": 1.0})
  params = {"w": jnp.ones(3)}
  tx = optim.optimizer_from_config(old, 20)
  updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  assert np.all(np.isfinite(np.asarray(updates["w"])))


def _tree(seed):
  """A params-shaped tree with the top-level keys the models use (CASENet's 'sides' among them)."""
  rng = np.random.default_rng(seed)
  return {part: {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
          for part in ("encoder", "decoder", "head", "sides")}


def test_encoder_multiplier_scales_exactly_the_encoder_updates_of_sgd():
  config = _config(name="sgd", momentum=0.0, learning_rate=0.1, schedule="constant", warmup_steps=0,
                   grad_clip_norm=0.0, encoder_lr_multiplier=0.25)
  params, grads = _tree(0), _tree(1)
  tx = optim.optimizer_from_config(config, 10)
  updates, _ = tx.update(grads, tx.init(params), params)
  for part, update in updates.items():
    scale = 0.1 * (0.25 if part == "encoder" else 1.0)
    np.testing.assert_allclose(update["kernel"], -scale * grads[part]["kernel"], rtol=1e-6)


def test_encoder_multiplier_scales_adam_updates_relative_to_the_decoder():
  params, grads = _tree(2), _tree(3)

  def updates_with(multiplier):
    tx = optim.optimizer_from_config(_config(encoder_lr_multiplier=multiplier, warmup_steps=0), 10)
    return tx.update(grads, tx.init(params), params)[0]

  scaled, plain = updates_with(0.1), updates_with(1.0)
  np.testing.assert_allclose(scaled["encoder"]["kernel"], 0.1 * plain["encoder"]["kernel"], rtol=1e-6)
  for part in ("decoder", "head", "sides"):
    np.testing.assert_array_equal(scaled[part]["kernel"], plain[part]["kernel"])


def test_encoder_multiplier_on_a_model_without_encoder_names_the_config_key():
  tx = optim.optimizer_from_config(_config(encoder_lr_multiplier=0.1), 10)
  with pytest.raises(ValueError, match="config.optim.encoder_lr_multiplier"):
    tx.init({"block1": {"kernel": jnp.ones(2)}})


@pytest.mark.parametrize("grad_scale", [0.01, 100.0])
def test_clipping_bounds_the_update_norm(grad_scale):
  config = _config(name="sgd", momentum=0.0, learning_rate=1.0, schedule="constant", warmup_steps=0,
                   grad_clip_norm=0.5)
  params = _tree(4)
  grads = jax.tree.map(lambda g: g * grad_scale, _tree(5))
  tx = optim.optimizer_from_config(config, 10)
  updates, _ = tx.update(grads, tx.init(params), params)
  norm, grad_norm = float(optax.global_norm(updates)), float(optax.global_norm(grads))
  assert norm <= 0.5 * (1 + 1e-6)
  if grad_norm < 0.5:  # small gradients pass unchanged
    assert norm == pytest.approx(grad_norm, rel=1e-6)
  else:
    assert norm == pytest.approx(0.5, rel=1e-6)


class _PixelLinear(nn.Module):
  """Logit = a * gray + b per pixel: a model without BatchNorm, so micro-batches see the same function."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(1, name="head")(x)


def _state(model, tx):
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                              opt_state=tx.init(params))


def test_accumulating_k_micro_steps_equals_one_step_on_the_concatenated_batch():
  k, micro = 4, 2
  rng = np.random.default_rng(6)
  image = rng.integers(0, 256, (2, k * micro, 8, 8, 1), dtype=np.uint8)  # two updates' worth of data
  batches = [{"image": im, "label": (im < 90).astype(np.uint8)} for im in image]
  model = _PixelLinear()
  options = dict(name="adam", learning_rate=0.05, schedule="cosine", warmup_steps=0, grad_clip_norm=0.1)
  results = {}
  for accumulate in (1, k):
    tx = optim.optimizer_from_config(_config(accumulate_steps=accumulate, **options), 2 * accumulate)
    step = jax.jit(train.make_train_step(model, tx, losses.focal_dice, mean=0.5, std=0.25))
    state, history = _state(model, tx), []
    for batch in batches:
      for i in range(0, k * micro, k * micro // accumulate):
        piece = {key: v[i:i + k * micro // accumulate] for key, v in batch.items()}
        state, _ = step(state, piece, jax.random.key(1))
        history.append(state.params)
    results[accumulate] = history
  one_step, accumulated = results[1], results[k]
  initial = _state(model, optax.identity()).params
  for update in range(2):
    before = one_step[update - 1] if update else initial
    for micro_step in range(k - 1):  # params hold still while gradients accumulate
      jax.tree.map(np.testing.assert_array_equal, accumulated[update * k + micro_step], before)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
                 accumulated[update * k + k - 1], one_step[update])
  assert not np.allclose(one_step[1]["head"]["kernel"], one_step[0]["head"]["kernel"])


def test_a_bfloat16_train_step_runs_and_keeps_float32_params():
  model = state_lib.build_model(ml_collections.ConfigDict(
      {"name": "unet", "encoder": "resnet18", "width": 0.125, "dtype": "bfloat16"}))
  # The options on a real params tree: AdamW, poly, clipping, the encoder multiplier (accumulation is tested above).
  tx = optim.optimizer_from_config(_config(name="adamw", schedule="poly", warmup_steps=0, encoder_lr_multiplier=0.1),
                                   4)
  # Variables drawn with numpy: compiling model.init would cost more than the step itself.
  variables = models.random_variables(models.abstract_variables(model, (1, 32, 32, 1)))
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                               batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))
  step = jax.jit(train.make_train_step(model, tx, losses.focal_dice, mean=0.5, std=0.25))
  image = np.random.default_rng(7).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
  batch = {"image": image, "label": (image < 40).astype(np.uint8)}
  first = state.params
  state, metrics = step(state, batch, jax.random.key(1))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  for tree in (state.params, state.batch_stats):
    assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), first, state.params)
  assert all(jax.tree.leaves(changed))
