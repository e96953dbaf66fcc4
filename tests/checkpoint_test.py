"""Checkpoint round trip: arrays bit-identical, JSON side data intact, latest step found, old steps pruned."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from urisc_jax import checkpoint


def _state(seed):
  rng = np.random.default_rng(seed)
  params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 1, 4)), jnp.float32)},
            "head": {"bias": jnp.asarray(rng.normal(size=(1,)), jnp.float32)}}
  return {"step": jnp.asarray(seed, jnp.int32), "params": params,
          "batch_stats": {"mean": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
          "opt_state": optax.adam(1e-3).init(params)}


def test_round_trip_is_bit_identical_and_keeps_side_data(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", max_to_keep=2)
  for step in (2, 4, 6):
    ckpt.save(step, _state(step), data={"next_index": step * 8}, meta={"threshold": 0.4})
  ckpt.wait()
  assert ckpt.latest_step() == 6
  assert ckpt.all_steps() == [4, 6]
  restored, data, meta = ckpt.restore(6, _state(0))
  ckpt.close()
  expected = _state(6)
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.dtype == want.dtype
  assert data == {"next_index": 48} and meta == {"threshold": 0.4}


def test_a_new_checkpointer_finds_the_latest_step_of_an_earlier_one(tmp_path):
  first = checkpoint.Checkpointer(tmp_path / "ckpt")
  first.save(3, _state(3))
  first.close()
  second = checkpoint.Checkpointer(tmp_path / "ckpt")
  assert second.latest_step() == 3
  assert second.restore_meta(3) == {}
  second.close()


def test_an_unfinished_save_folder_is_not_a_checkpoint(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  ckpt.save(1, _state(1))
  ckpt.wait()
  # What a crash mid-write leaves: orbax's temporary folder for step 2, never renamed into place.
  (tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-123").mkdir()
  ckpt.close()
  assert checkpoint.Checkpointer(tmp_path / "ckpt").latest_step() == 1


def test_best_checkpoint_keeps_only_the_highest_score_and_remembers_it(tmp_path):
  best = checkpoint.BestCheckpoint(tmp_path / "best")
  offered = [best.offer(step, _state(step), score, meta={"threshold": step / 10})
             for step, score in ((2, 0.5), (4, 0.7), (6, 0.6), (8, 0.7))]
  best.close()
  assert offered == [True, True, False, False]  # a tie keeps the earlier state
  reopened = checkpoint.BestCheckpoint(tmp_path / "best")
  assert (reopened.best_step, reopened.best_score) == (4, 0.7)
  assert not reopened.offer(10, _state(10), 0.69)
  reopened.close()
  ckpt = checkpoint.Checkpointer(tmp_path / "best")
  assert ckpt.all_steps() == [4]
  restored, _, meta = ckpt.restore(4, _state(0))
  ckpt.close()
  assert meta == {"threshold": 0.4, "val_f1": 0.7, "step": 4}
  np.testing.assert_array_equal(restored["params"]["conv"]["kernel"], _state(4)["params"]["conv"]["kernel"])


def test_restoring_into_another_model_names_the_checkpoint_and_the_fix(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
  ckpt.save(2, _state(2))
  ckpt.wait()
  wider = _state(0)
  wider["params"]["conv"]["kernel"] = jnp.zeros((3, 3, 1, 8))  # e.g. the config's width changed
  wider["opt_state"] = optax.adam(1e-3).init(wider["params"])
  with pytest.raises(ValueError, match=r"checkpoints/2 does not fit .* Use a new --workdir"):
    ckpt.restore(2, wider)
  ckpt.close()
