"""Checkpoints with orbax: model and optimizer state, data iterator state and run metadata, saved together.

Orbax writes each step into a temporary folder and renames it when complete, so an interrupted save never leaves a
checkpoint that looks whole; `latest_step` only sees finished ones. Resume is automatic: the trainer restores the
newest step that can be read into arrays already laid out with the training shardings (`restore_latest`); a step
damaged afterwards (a truncated copy, a deleted file, a full disk) is skipped for the one before it, and named. In
a multi-process run process 0 chooses that step for all, and a process that cannot read it stops them all.
"""

import dataclasses
import logging
import pathlib
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from urisc_jax import multihost


class CheckpointMismatchError(ValueError):
  """A readable checkpoint that holds another model or optimizer than the config builds."""


class UnreadableCheckpointsError(ValueError):
  """No step of a checkpoint folder can be read; the message lists each step and why."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `Checkpointer.restore_latest` found: the step, its state, data and meta, and the newer steps it skipped
  as unreadable ({step: reason})."""
  step: int
  state: Any
  data: dict
  meta: dict
  skipped: dict[int, str]


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for every array of `tree`, the target orbax restores into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _target_shapes(tree: Any) -> list[tuple[int, ...]]:
  return sorted(tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf) for leaf in jax.tree.leaves(tree))


def _stored_shapes(state_dir: pathlib.Path) -> list[tuple[int, ...]] | None:
  """The shapes of the arrays a saved state holds (sorted), from its metadata; None where that cannot be read."""
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(state_dir)
  except Exception:  # pylint: disable=broad-except  # missing or damaged metadata: judged by the restore itself
    return None
  tree = getattr(metadata, "tree", metadata)
  return sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape")))


def _reason(error: Exception) -> str:
  """The first line of an orbax or TensorStore error, without TensorStore's pointer to its details."""
  return (str(error).splitlines() or [type(error).__name__])[0].split(" See full TensorStore details")[0][:300]


def _read_every_array(state_dir: pathlib.Path, *, batch: int = 32) -> str | None:
  """Reads every array of a saved state through TensorStore, waiting for each read; the first error, or None.

  Why before orbax's restore: orbax reads all arrays in an event loop that it closes as soon as the first read
  fails; the reads still in flight then complete into the closed loop, and TensorStore reports each of them as an
  unraisable "RuntimeError: Event loop is closed" traceback (over a thousand for a damaged step of a U-Net). Here
  every read is waited for, so none is left in flight, and a damaged step never reaches orbax. The arrays are read
  `batch` at a time (a bounded extra buffer); the second read by orbax comes from the page cache.
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  base = {"driver": "ocdbt", "base": f"file://{state_dir.absolute()}/"}
  context = ts.Context()  # one OCDBT cache for every array of the step
  try:
    keys = [key.decode() for key in ts.KvStore.open(base, context=context).result().list().result()]
  except Exception as e:  # pylint: disable=broad-except  # TensorStore raises bare ValueErrors / Exceptions
    return _reason(e)
  names = sorted(key[:-len("/.zarray")] for key in keys if key.endswith("/.zarray"))
  first = None
  for start in range(0, len(names), batch):
    opens = [ts.open({"driver": "zarr", "kvstore": {**base, "path": f"{name}/"}}, context=context)
             for name in names[start:start + batch]]
    reads = []
    for future in opens:  # every future is waited for, failed or not
      try:
        reads.append(future.result().read())
      except Exception as e:  # pylint: disable=broad-except
        first = first or e
    for future in reads:
      try:
        future.result()
      except Exception as e:  # pylint: disable=broad-except
        first = first or e
    if first is not None:
      return _reason(first)
  return None


class Checkpointer:
  """Saves and restores {"state": pytree, "data": json, "meta": json} under `directory/<step>`.

  Args:
    directory: checkpoint root, e.g. workdir/checkpoints.
    max_to_keep: number of most recent checkpoints kept on disk.
  """

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2, create: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    if not create and not self.directory.is_dir():
      raise FileNotFoundError(f"No checkpoint in {self.directory}: train first (--mode=train) or pass the --workdir "
                              "of a trained run.")
    # In a multi-process run the processes meet at barriers named after the step; the keep-last and the best-state
    # managers save the same step at the same time, so each names its barriers after its own folder.
    multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=self.directory.name)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
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

  def unreadable(self, step: int) -> str | None:
    """Why step `step`'s arrays cannot be read (every one is read through TensorStore), or None when they can."""
    where = self.directory / str(step)
    # Before anything of orbax reads the step (its metadata reads each array's header the same way as a restore).
    return _read_every_array(where / "state") if (where / "state" / "manifest.ocdbt").is_file() else None

  def restore(self, step: int, target_state: Any, *, checked: bool = False) -> tuple[Any, dict, dict]:
    """Restores step `step` into the structure, dtypes and shardings of `target_state`; `checked`: its arrays were
    just read by `unreadable`.

    Returns:
      (state, data, meta) as saved.

    Raises:
      CheckpointMismatchError: the step holds arrays of other shapes than `target_state` (the model, its width or
        the optimizer changed since it was written).
      UnreadableCheckpointsError: the step's files are missing or damaged.
    """
    where = self.directory / str(step)
    problem = None if checked else self.unreadable(step)
    if problem is not None:
      raise UnreadableCheckpointsError(f"checkpoint {where} cannot be read: {problem}")
    stored = _stored_shapes(where / "state")
    if stored is not None and stored != _target_shapes(target_state):
      raise CheckpointMismatchError(
          f"checkpoint {where} does not fit the model and optimizer of this config (was the model, its width or the "
          f"optimizer changed since it was written?): it holds {len(stored)} arrays, the config makes "
          f"{len(_target_shapes(target_state))}, of other shapes. Use a new --workdir for the new config, or rerun "
          f"with the config it was written with ({self.directory.parent / 'config.json'}).")
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(_abstract(target_state)),
              data=ocp.args.JsonRestore(),
              meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  # orbax and TensorStore raise bare Exceptions
      reason = _reason(e)
      if "structures do not match" in reason:  # same shapes under other names: another model
        raise CheckpointMismatchError(
            f"checkpoint {where} does not fit the model and optimizer of this config: {reason} Use a new --workdir "
            f"for the new config, or rerun with the config it was written with "
            f"({self.directory.parent / 'config.json'}).") from e
      raise UnreadableCheckpointsError(f"checkpoint {where} cannot be read: {reason}") from e
    return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

  def restore_latest(self, target_state: Any) -> Restored | None:
    """The newest step that can be read, restored into `target_state`'s layout; None when there is no step.

    A step that cannot be read (files missing or damaged) is skipped for the one before it, with a warning that
    names it and why. A step that holds another model stops the search: older steps would not fit either.

    Raises:
      CheckpointMismatchError: as `restore`.
      UnreadableCheckpointsError: every step is unreadable; the message lists each and why.
    """
    if jax.process_count() > 1:
      return self._restore_agreed(target_state)
    skipped = {}
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, data, meta = self.restore(step, target_state)
      except UnreadableCheckpointsError as e:
        skipped[step] = str(e)
        logging.warning("%s; trying the step before it.", e)
        continue
      return Restored(step, state, data, meta, skipped)
    self._raise_if_none_readable(skipped)
    return None

  def _raise_if_none_readable(self, skipped: dict[int, str]) -> None:
    if skipped:
      listing = "; ".join(skipped.values())
      raise UnreadableCheckpointsError(
          f"no step in {self.directory} can be read ({listing}). They were damaged after they were written (an "
          "interrupted copy, a full disk?): restore them from a backup, or move the folders named here aside to "
          "start over.")

  def _restore_agreed(self, target_state: Any) -> Restored | None:
    """`restore_latest` for a multi-process run: every process restores the same step, or all stop.

    Process 0 chooses (its newest step whose arrays all read, skipping the others as one process does) and
    broadcasts the step with the ones it skipped; every process then reads that step's arrays before any restores
    it (the processes run orbax's restore together), and the outcomes are gathered. A step that some process cannot
    read stops every process with one message naming them: resuming from another step there would leave the
    processes on different states (and JAX's preemption sync expects the same step everywhere).
    """
    choice = None
    if multihost.is_writer():
      skipped = {}
      for step in sorted(self.all_steps(), reverse=True):
        problem = self.unreadable(step)
        if problem is None:
          choice = (step, skipped)
          break
        skipped[step] = f"checkpoint {self.directory / str(step)} cannot be read: {problem}"
        logging.warning("%s; trying the step before it.", skipped[step])
      choice = choice or (None, skipped)
    step, skipped = multihost.broadcast_object(choice)
    if step is None:
      self._raise_if_none_readable(skipped)
      return None
    problems = multihost.gather_objects(None if multihost.is_writer() else self.unreadable(step))
    failed = {process: problem for process, problem in enumerate(problems) if problem is not None}
    if failed:
      listing = "; ".join(f"process {process}: {problem}" for process, problem in failed.items())
      raise UnreadableCheckpointsError(
          f"checkpoint {self.directory / str(step)}, the newest step process 0 can read, cannot be read by every "
          f"process ({listing}). All processes resume from the same step: check that the workdir is the same "
          "shared folder on every host and that its files are whole there, or move that step's folder aside to "
          "resume from the one before it.")
    state, data, meta = self.restore(step, target_state, checked=True)
    return Restored(step, state, data, meta, skipped)

  def set_aside(self, steps, *, label: str = "unreadable") -> list[pathlib.Path]:
    """Renames step folders to `<step>.<label>-<time>`, out of orbax's sight, so that training can write those steps
    again; their files are kept (unreadable ones for inspection). Returns the new paths."""
    moved = []
    if multihost.is_writer():
      for step in steps:
        source = self.directory / str(step)
        if source.is_dir():
          target = self.directory / f"{step}.{label}-{time.strftime('%Y%m%d-%H%M%S')}"
          source.rename(target)
          moved.append(target)
    multihost.sync(f"set aside {self.directory.name}")
    self._manager.reload()
    return moved

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
    self.best_step, self.best_score = step, None
    if step is not None:
      try:
        self.best_score = self._checkpointer.restore_meta(step).get(score_key)
      except Exception as e:  # pylint: disable=broad-except  # damaged: the next validated state replaces it
        logging.warning("the best checkpoint %s cannot be read (%s); the next validated state replaces it.",
                        self.directory / str(step), str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        self._checkpointer.set_aside([step])
        self.best_step = None

  @property
  def directory(self) -> pathlib.Path:
    return self._checkpointer.directory

  def offer(self, step: int, state: Any, score: float, *, meta: dict | None = None) -> bool:
    """Saves `state` if `score` beats the best so far (ties keep the earlier step); returns whether it did."""
    if self.best_score is not None and not score > self.best_score:
      return False
    # A run resumed from an earlier step (its newest checkpoint was unreadable) replays steps this folder may already
    # hold from before: the entry being beaten is at this step or after it. Orbax refuses to save a step it holds
    # (StepAlreadyExistsError) and keeps the highest step when it prunes, so the old entry is moved aside first and
    # removed once the new one is written.
    self._checkpointer.wait()  # a save still in flight is not yet in its step folder
    held = [s for s in self._checkpointer.all_steps() if s >= step]  # the same on every process
    replaced = self._checkpointer.set_aside(held, label="replaced") if held else []
    self._checkpointer.save(step, state, meta={**(meta or {}), self.score_key: float(score), "step": int(step)})
    if replaced:
      self._checkpointer.wait()
      for folder in replaced:
        shutil.rmtree(folder, ignore_errors=True)
    self.best_step, self.best_score = step, float(score)
    return True

  def close(self) -> None:
    self._checkpointer.close()
