"""Command line: flags -> config -> mode.

    python -m urisc_jax.main --config=configs/default.py --workdir=runs/default [--mode=train] [--config.key=value]

Modes:
  train     train (resuming from workdir/checkpoints), choose the threshold on validation images, predict and score
            the test images: workdir/metrics.json, workdir/predictions/, workdir/overlay.png
  predict   predict --config.predict.input (a file or folder) with the latest checkpoint of workdir; a chunked
            volume (PATH.zarr, PATH.n5, a TensorStore JSON spec) is predicted blockwise on Dask into the OME-Zarr
            --config.predict.output=OUT.zarr
  evaluate  score submission TIFFs in --config.eval.pred_dir against ground truth in --config.eval.gt_dir
  prepare   decode every split of the configured dataset into the memory-mappable cache
  criteria  image definition criteria (Brenner, SMD2, Variance, Vollath) of images and their downsampled versions
  attribute integrated gradients of sampled true-positive, false-positive and false-negative pixels of the trained
            model and their attribution fields S_k: workdir/attribution/ (stats.json, targets.json, figures)
  export    the best checkpoint as --config.export.format=onnx|torch|bioimageio|stablehlo at
            --config.export.output (default workdir/export/): see urisc_jax/export/

A process of a multi-process run (one per host, or per GPU) adds --distributed (JAX finds the job: SLURM, Cloud TPU
pods) or --coordinator_address=HOST:PORT --num_processes=N --process_id=I; train, predict and attribute then run on
all processes together and process 0 writes the results; evaluate, prepare, criteria, export and the prediction of
a chunked volume (on process 0's Dask cluster) run on process 0 alone while the others wait. A process whose peers
do not all join within --initialization_timeout_s exits with status 2 and one line naming the coordinator.
A run stopped by SIGTERM saves a checkpoint and exits with status 143; rerunning the same command resumes it.
"""

import contextlib
import json
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from urisc_jax import checkpoint, config_checks, multihost, outputs, platforms, run_lock, xla_flags
from urisc_jax.data import imageio
from urisc_jax.evaluation import f1
from urisc_jax.models import torch_import

MODES = ("train", "predict", "evaluate", "prepare", "criteria", "attribute", "export")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/default.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, predictions and metrics.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
# A process of a multi-process run (see README, Scaling out): either --distributed (JAX finds the job: SLURM, Cloud
# TPU pods, ...) or the explicit three, e.g. N processes on one machine.
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-process job that JAX detects (SLURM, TPU pod).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index, 0 .. num_processes - 1.")
_LOCAL_DEVICES = flags.DEFINE_string("local_device_ids", "", "Local devices this process drives, e.g. 0,1.")
_INIT_TIMEOUT = flags.DEFINE_float("initialization_timeout_s", multihost.INITIALIZATION_TIMEOUT_S,
                                   "Seconds a process of a multi-process run waits for all processes to join.")


# Exit statuses: 0 done, 1 a failure (a bug or the machine: the traceback says where), BAD_INPUT_EXIT_CODE a bad
# config, data file, checkpoint or workdir (one message names it and the fix), 143 stopped by SIGTERM after saving.
BAD_INPUT_EXIT_CODE = 2
INPUT_ERRORS = (config_checks.ConfigError, imageio.DataError, checkpoint.CheckpointMismatchError,
                checkpoint.UnreadableCheckpointsError, run_lock.WorkdirBusyError, torch_import.CheckpointError,
                f1.SubmissionFormatError, f1.ImageReadError, f1.PairingError, FileNotFoundError, NotADirectoryError,
                PermissionError)


def _set_volume_open_timeout(config) -> None:
  """Volumes (predicted, or trained from) give up opening after config.predict.volume.open_timeout_s seconds."""
  seconds = config.predict.get("volume", {}).get("open_timeout_s")
  if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0:  # else: checked, default
    from urisc_jax import volumes  # pylint: disable=g-import-not-at-top
    volumes.set_open_timeout(seconds)


def _record_run(config, workdir: pathlib.Path) -> None:
  """Writes the resolved config and the command line into the workdir, so a run can be repeated exactly."""
  workdir.mkdir(parents=True, exist_ok=True)
  outputs.write_text(workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  outputs.append_line(workdir / "command.txt", " ".join([sys.executable, "-m", "urisc_jax.main", *sys.argv[1:]]))


def run(config, workdir: pathlib.Path, mode: str) -> dict | list:
  """Dispatches to the library function of `mode` (importable, so notebooks and tests can call the same)."""
  if mode == "train":
    from urisc_jax import train
    return train.train_and_evaluate(config, workdir)
  if mode == "predict":
    from urisc_jax import volumes
    if volumes.is_volume_input(config.predict.input):
      from urisc_jax import volume_predict
      # One driver writes the output with its Dask workers; the other processes restore the checkpoint with it
      # (a collective), then wait for its outcome instead of predicting the same volume into the same output.
      return multihost.process_0_drives(lambda: volume_predict.predict_volume(config, workdir), "volume prediction",
                                        input_errors=INPUT_ERRORS)
    from urisc_jax import predict
    return [str(p) for p in predict.predict_files(config, workdir)]
  if mode in ("evaluate", "prepare", "criteria", "export") and not multihost.is_writer():
    return {}  # Host work on files: process 0 does it for the job.
  if mode == "evaluate":
    from urisc_jax.evaluation import report
    if not config.eval.pred_dir or not config.eval.gt_dir:
      raise app.UsageError("--mode=evaluate needs --config.eval.pred_dir=DIR and --config.eval.gt_dir=DIR.")
    return report.evaluate_folders(config.eval.pred_dir, config.eval.gt_dir, workdir / "evaluation",
                                   gt_mode=config.eval.gt_mode, prob_dir=config.eval.prob_dir or None,
                                   strict=config.eval.strict)
  if mode == "prepare":
    from urisc_jax.data import dataset
    return {split: len(dataset.prepared_split(config.data, workdir, getattr(config.data, f"{split}_split")))
            for split in ("train", "val", "test")}
  if mode == "criteria":
    return _criteria(config, workdir)
  if mode == "attribute":
    from urisc_jax.attribution import run as attribution_run
    return attribution_run.attribute(config, workdir)
  if mode == "export":
    from urisc_jax import export
    return export.export(config, workdir)
  raise app.UsageError(f"Unknown mode {mode!r}; choose one of {MODES}.")


def _criteria(config, workdir: pathlib.Path) -> dict:
  from urisc_jax.data import dataset, sources
  from urisc_jax.evaluation import criteria
  if config.criteria.input:
    images = sources.image_files(config.criteria.input)
    first_shape = sources.read_image(images[0]).shape if images else None
  else:  # Prepared images: stack slices and TFDS records have no image file of their own.
    prepared = dataset.prepared_split(config.data, workdir, config.data.test_split)
    images = [(im.name, im.image) for im in prepared]
    first_shape = prepared[0].image().shape if prepared else None
  if not images:
    raise app.UsageError("No images for --mode=criteria: set --config.criteria.input=PATH.")
  height, width = first_shape
  size = (max(1, round(height * config.criteria.scale)), max(1, round(width * config.criteria.scale)))
  return criteria.compare_original_and_downsampled(images, workdir / "criteria", size=size,
                                                   methods=config.criteria.methods)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("Pass --config=configs/<name>.py and --workdir=DIR.")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and JAX log every checkpoint step at INFO; keep the console to progress bars and results.
    logging.set_verbosity(logging.WARNING)
  try:
    options = multihost.distributed_options(
        distributed=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, local_device_ids=_LOCAL_DEVICES.value)
    # Before any other JAX call: every process joins the job, then sees all hosts' devices.
    multihost.initialize(options, _INIT_TIMEOUT.value)
  except ValueError as e:  # flags that do not describe a job: one line naming them, not the whole usage text
    print(f"error: {e}", file=sys.stderr)
    sys.exit(BAD_INPUT_EXIT_CODE)
  workdir = pathlib.Path(_WORKDIR.value)
  config = _CONFIG.value
  try:
    # Per-device batches become global ones here, once the job's device count is known; config.json records them.
    for line in config_checks.resolve_batch_sizes(config):
      if multihost.is_writer():
        print(f"batch: {line}", file=sys.stderr)
    config_checks.validate(config, _MODE.value)
    if workdir.exists() and not workdir.is_dir():
      raise config_checks.ConfigError(f"--workdir={workdir} is a file, not a folder; pass a folder.")
    if _MODE.value == "predict" and not workdir.exists():
      # Prediction reads a trained run; refusing here keeps a mistyped --workdir from being created (and left).
      raise config_checks.ConfigError(f"No checkpoint in --workdir={workdir} (it does not exist): --mode=predict "
                                      "uses a trained run; train first (--mode=train) or pass the --workdir of a "
                                      "trained run.")
    platforms.enable_compilation_cache(config.get("compilation_cache", "default"))
    imageio.set_max_pixels(config.data.max_image_pixels)
    _set_volume_open_timeout(config)
    # Process 0 holds the workdir for the whole job: a second run there stops at once, naming the first.
    with run_lock.exclusive(workdir) if multihost.is_writer() else contextlib.nullcontext():
      if multihost.is_writer():
        _record_run(config, workdir)
      result = run(config, workdir, _MODE.value)
  except multihost.Preempted as stopped:
    print(stopped, file=sys.stderr)
    sys.exit(multihost.PREEMPTED_EXIT_CODE)
  except multihost.ProcessZeroFailed as e:  # process 0 printed the reason; this process says where to look
    print(f"error: {e} (see process 0's output)", file=sys.stderr)
    sys.exit(BAD_INPUT_EXIT_CODE if e.input_error else 1)
  except INPUT_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(BAD_INPUT_EXIT_CODE)
  if multihost.is_writer() and isinstance(result, dict):
    # Standard JSON on stdout: a score that does not exist (one image's s.e.) is null, not NaN.
    print(json.dumps(outputs.json_safe(_headline(result)), indent=2, sort_keys=True))


def _headline(result: dict) -> dict:
  """The scalars of a result and of its sub-dicts (one level, e.g. "two_class"), without per-image lists."""
  headline = {}
  for key, value in result.items():
    if isinstance(value, dict):
      scalars = {k: v for k, v in value.items() if not isinstance(v, (list, dict))}
      if scalars:
        headline[key] = scalars
    elif not isinstance(value, list):
      headline[key] = value
  return headline


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a flag that cannot be parsed reported as an input error: one line naming the flag,
  status 2 (absl's default exits 1 and a UsageError prints the whole usage text)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    print(f"error: {first} (python -m urisc_jax.main --helpshort lists the flags)", file=sys.stderr)
    sys.exit(BAD_INPUT_EXIT_CODE)


if __name__ == "__main__":
  # The measured-fastest XLA:CPU options, before anything starts JAX's backend (it reads XLA_FLAGS once). Importing
  # this module computes nothing, so the flags are in place for every mode.
  xla_flags.apply()
  app.run(main, flags_parser=_parse_flags)
