"""Checkpoints with orbax: model and optimizer state, data iterator state and run metadata, saved together.

Orbax writes each step into a temporary folder and renames it when complete, so an interrupted save never leaves a
checkpoint that looks whole; `latest_step` only sees finished ones. Resume is automatic: the trainer asks for the
latest step and restores it into arrays already laid out with the training shardings.
"""

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for every array of `tree`, the target orbax restores into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Saves and restores {"state": pytree, "data": json, "meta": json} under `directory/<step>`.

  Args:
    directory: checkpoint root, e.g. workdir/checkpoints.
    max_to_keep: number of most recent checkpoints kept on disk.
  """

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    # In a multi-process run the processes meet at barriers named after the step; the keep-last and the best-state
    # managers save the same step at the same time, so each names its barriers after its own folder.
    multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=self.directory.name)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                             multiprocessing_options=multiprocessing))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data: dict | None = None, meta: dict | None = None) -> None:
    """Saves `state` (a pytree of arrays) with the JSON-able data iterator state `data` and `meta`."""
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data or {}),
            meta=ocp.args.JsonSave(meta or {})),
        force=True)

  def restore(self, step: int, target_state: Any) -> tuple[Any, dict, dict]:
    """Restores step `step` into the structure, dtypes and shardings of `target_state`.

    Returns:
      (state, data, meta) as saved.
    """
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(_abstract(target_state)),
              data=ocp.args.JsonRestore(),
              meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"checkpoint {self.directory / str(step)} does not fit the model and optimizer of this config (was the "
          f"model, its width or the optimizer changed since it was written?): {str(e).splitlines()[0]} Use a new "
          f"--workdir for the new config, or delete {self.directory} to start this one over.") from e
    return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

  def restore_meta(self, step: int) -> dict:
    """Only the JSON metadata of a step (e.g. the decision threshold), without loading arrays."""
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"] or {})

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class BestCheckpoint:
  """Keeps the one state with the highest validation score under `directory` (e.g. workdir/checkpoints_best).

  Beside the keep-last-N checkpoints of the trainer, so that neither policy evicts the other's. The score and any
  metadata (the threshold chosen with it) are stored in the checkpoint's meta, so a resumed run knows the score to
  beat, and prediction can use the best state with its own threshold.

  Args:
    directory: folder holding the single best step.
    score_key: meta key of the score that is maximized.
  """

  def __init__(self, directory: str | pathlib.Path, *, score_key: str = "val_f1"):
    self._checkpointer = Checkpointer(directory, max_to_keep=1)
    self.score_key = score_key
    step = self._checkpointer.latest_step()
    self.best_step = step
    self.best_score = None if step is None else self._checkpointer.restore_meta(step).get(score_key)

  @property
  def directory(self) -> pathlib.Path:
    return self._checkpointer.directory

  def offer(self, step: int, state: Any, score: float, *, meta: dict | None = None) -> bool:
    """Saves `state` if `score` beats the best so far (ties keep the earlier step); returns whether it did."""
    if self.best_score is not None and not score > self.best_score:
      return False
    self._checkpointer.save(step, state, meta={**(meta or {}), self.score_key: float(score), "step": int(step)})
    self.best_step, self.best_score = step, float(score)
    return True

  def close(self) -> None:
    self._checkpointer.close()
