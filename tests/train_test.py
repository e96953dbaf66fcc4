"""The train step: it learns, it is deterministic, and on any mesh it equals the single-device step."""

import functools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from urisc_jax import losses, sharding, state as state_lib, train

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_model():
  return state_lib.build_model(ml_collections.ConfigDict(
      {"name": "unet", "encoder": "resnet18", "width": 0.125, "dtype": "float32"}))


def _batch(seed=0, n=2, size=64):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
  return {"image": image, "label": (image < 40).astype(np.uint8)}


@pytest.fixture(scope="module")
def compiled():
  model, tx = _tiny_model(), optax.adam(3e-3)
  step = jax.jit(train.make_train_step(model, tx, losses.focal_dice, mean=0.5, std=0.25))
  init = jax.jit(functools.partial(state_lib.init_state, model, tx, crop_size=64))
  return step, init


def test_steps_lower_the_loss_and_update_every_part_of_the_state(compiled):
  step, init = compiled
  state = init(jax.random.key(0))
  batch, rng = _batch(), jax.random.key(1)
  first_params, first_stats = state.params, state.batch_stats
  history = []
  for _ in range(8):
    state, metrics = step(state, batch, rng)
    history.append(float(metrics["loss"]))
  assert int(state.step) == 8
  assert all(np.isfinite(history))
  assert all(b < a for a, b in zip(history, history[1:])), history  # fitting one batch: loss falls every step
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), first_params, state.params)
  assert all(jax.tree.leaves(changed))
  assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), first_stats, state.batch_stats)))


def test_the_step_is_deterministic(compiled):
  step, init = compiled
  batch, rng = _batch(3), jax.random.key(2)
  a, ma = step(init(jax.random.key(0)), batch, rng)
  b, mb = step(init(jax.random.key(0)), batch, rng)
  assert float(ma["loss"]) == float(mb["loss"])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


_SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np, optax, ml_collections
    from urisc_jax import losses, sharding, state as state_lib, train

    model = state_lib.build_model(ml_collections.ConfigDict(
        {"name": "unet", "encoder": "resnet18", "width": 0.125, "dtype": "float32"}))
    tx = optax.adam(1e-3)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 64, 64, 1), dtype=np.uint8)
    batch = {"image": image, "label": (image < 40).astype(np.uint8)}
    step_fn = train.make_train_step(model, tx, losses.focal_dice, mean=0.5, std=0.25)

    def run(axes, order):
      devices = jax.devices()[:int(np.prod([s for _, s in axes]))]
      mesh = sharding.mesh_from_config(axes, devices)
      state, shardings = state_lib.create_state(model, tx, mesh, jax.random.key(0), 64)
      step = jax.jit(step_fn, in_shardings=(shardings, sharding.batch_sharding(mesh), None),
                     out_shardings=(shardings, None))
      local = {k: v[order] for k, v in batch.items()}
      new_state, metrics = step(state, sharding.global_batch_from_local(mesh, local), jax.random.key(1))
      new_state, metrics = jax.device_get((new_state, metrics))
      return {"loss": np.asarray(metrics["loss"]), "params": new_state.params,
              "grads": new_state.opt_state[0].mu, "batch_stats": new_state.batch_stats}

    def relative(a, b):
      a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]).astype(np.float64)
      b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)]).astype(np.float64)
      return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    identity, shuffled = np.arange(8), np.array([3, 1, 7, 0, 2, 6, 5, 4])
    reference = run((("data", 1),), identity)
    # The same step on one device with the batch reordered: mathematically identical, numerically it only changes
    # the order of float32 reductions, which is all that sharding may change.
    reordered = run((("data", 1),), shuffled)
    sharded = run((("data", 8),), identity)
    print(json.dumps({name: {part: relative(result[part], reference[part]) for part in reference}
                      for name, result in (("reordered", reordered), ("sharded", sharded))}))
""")


def test_data_parallel_step_equals_the_single_device_step():
  """8 simulated CPU devices vs one: the same loss and BatchNorm statistics, and parameters and gradients as close as
  reordering the batch on one device leaves them (float32 reductions in another order)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  errors = json.loads(result.stdout.strip().splitlines()[-1])
  sharded, reordered = errors["sharded"], errors["reordered"]
  assert sharded["loss"] < 1e-6 and sharded["batch_stats"] < 1e-6, errors
  for part in ("params", "grads"):
    assert sharded[part] <= 3 * reordered[part] + 1e-6, (part, errors)


def test_transfer_checkpoint_sets_the_encoder_and_the_input_normalization():
  """The U-Net-transfer recipe: a CEM500K-layout checkpoint (tiny widths) replaces exactly the encoder's weights."""
  from urisc_jax.models import torch_import
  path = REPO / "tests" / "fixtures" / "models" / "cem500k_mocov2_tiny.pth.tar"
  model = state_lib.build_model(ml_collections.ConfigDict(
      {"name": "unet", "encoder": "resnet50", "width": 1 / 32, "dtype": "float32"}))
  tx = optax.adam(1e-3)
  mesh = sharding.mesh_from_config((("data", -1),))
  fresh, shardings = state_lib.create_state(model, tx, mesh, jax.random.key(0), 64)
  fresh = jax.device_get(fresh)
  loaded, info = state_lib.load_pretrained_encoder(jax.device_put(fresh, shardings), str(path), shardings)
  assert info.normalization.mean == pytest.approx(0.57287007) and info.normalization.std == pytest.approx(0.12740536)
  torch_state = torch_import.read_checkpoint(path)["state_dict"]
  conv1 = np.asarray(torch_state["module.encoder_q.conv1.weight"])  # [O, I, kh, kw]
  np.testing.assert_allclose(np.asarray(loaded.params["encoder"]["conv1"]["kernel"]), conv1.transpose(2, 3, 1, 0))
  for part in ("decoder", "head"):
    for a, b in zip(jax.tree.leaves(loaded.params[part]), jax.tree.leaves(fresh.params[part])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(loaded.batch_stats["encoder"]), jax.tree.leaves(fresh.batch_stats["encoder"])))
