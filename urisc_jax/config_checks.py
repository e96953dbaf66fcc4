"""The run config checked in one place, before any work: every value in its range, every divisibility the devices
and processes need, the crop against the images, the model against its input multiple.

Without this a bad value surfaced late or not at all: `train.num_steps=-3` wrote metrics and predictions of an
untrained model and exited 0, `checkpoint_every=0` divided by zero after the first step, `model.width=0` trained
one-channel layers. `validate(config, mode)` collects every problem of the sections `mode` uses and raises one
`ConfigError` that names each key, its value and the valid range; main turns it into exit status 2.
"""

import math
from collections.abc import Callable
from typing import Any

import jax

# Sections of the config each mode reads (the others may hold anything).
SECTIONS = {
    "train": ("train", "model", "data", "optim", "loss", "mesh", "predict", "eval"),
    "predict": ("model", "predict", "data_images"),
    "evaluate": ("eval", "data_images"),
    "prepare": ("data",),
    "criteria": ("data",),
    "attribute": ("model", "predict", "attribution", "data"),
    "export": ("model", "export", "data_images"),
}
TTA_CHOICES = (1, 2, 4, 8)
ON_ERROR_CHOICES = ("stop", "skip")
GT_MODES = ("official", "binarized")
EXPORT_FORMATS = ("onnx", "torch", "bioimageio", "stablehlo")
MEMBRANE_CHOICES = ("black", "white")
BLEND_CHOICES = ("gaussian", "constant")
VOLUME_DTYPES = ("uint8", "float16")
# The quadrature rules of attribution/integrated_gradients.py (kept here: importing it would load Flax).
ATTRIBUTION_RULES = ("gauss_legendre", "riemann_right", "riemann_left", "riemann_middle", "trapezoid")
ATTRIBUTION_PROTOCOLS = ("native", "paper")
SMALLEST_WIDTH = 1 / 64  # the 64-channel stem keeps at least one channel
# The bioimage.io package's test crop is S x S, predicted whole at export and by every tool that checks the package:
# 2048^2 is 16 MB per tensor; 16384 took over 3 GB while exporting.
EXPORT_MAX_SAMPLE_SIZE = 2048


class ConfigError(ValueError):
  """Config values out of range; the message names each key, its value and what it must be."""


def _get(config, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Problems:
  """Collects "config.key=value: must be ..." lines."""

  def __init__(self, config):
    self.config, self.lines = config, []

  def value(self, key: str):
    try:
      return _get(self.config, key)
    except (KeyError, AttributeError):
      self.lines.append(f"config.{key} is missing: add it (configs/default.py has every key)")
      return None

  def require(self, key: str, ok: Callable[[Any], bool], what: str) -> Any:
    value = self.value(key)
    if value is not None and not ok(value):
      self.lines.append(f"config.{key}={value!r}: must be {what}")
    return value

  def integer(self, key: str, minimum: int) -> int | None:
    value = self.require(key, lambda v: _is_int(v) and v >= minimum, f"an integer >= {minimum}")
    return value if _is_int(value) and value >= minimum else None

  def choice(self, key: str, choices) -> None:
    self.require(key, lambda v: v in choices, f"one of {', '.join(map(repr, choices))}")

  def call(self, what: str, fn: Callable[[], Any]) -> Any:
    """Runs an existing validator (model registry, optimizer, loss, mesh) and keeps its message."""
    try:
      return fn()
    except (ValueError, TypeError, KeyError) as e:
      self.lines.append(f"{what}: {e}")
      return None


def _volume_checks(problems: _Problems) -> None:
  """config.predict.volume and config.predict.dask (read only when the input is a chunked volume, but checked always:
  a bad value should not wait for the first volume)."""
  from urisc_jax import volume_predict  # pylint: disable=g-import-not-at-top
  chunk = problems.integer("predict.volume.chunk", 1)
  block = problems.integer("predict.volume.block", 1)
  levels = problems.integer("predict.volume.levels", 1)
  problems.choice("predict.volume.dtype", VOLUME_DTYPES)
  problems.integer("predict.dask.workers", 0)
  problems.integer("predict.dask.retries", 0)
  address = problems.value("predict.dask.address")
  problem = volume_predict.dask_address_problem(address) if address is not None else None
  if problem:
    problems.lines.append(f"config.predict.dask.address={address!r}: {problem}")
  for key in ("predict.volume.open_timeout_s", "predict.dask.timeout_s"):
    problems.require(key, lambda v: _is_number(v) and v > 0, "a positive number of seconds")
  if chunk and block and block % chunk:
    problems.lines.append(f"config.predict.volume.block={block}: must be a multiple of config.predict.volume.chunk="
                          f"{chunk}, so that no two blocks write one chunk")
  if chunk and levels and chunk % 2 ** (levels - 1):
    problems.lines.append(f"config.predict.volume.chunk={chunk}: must be a multiple of 2^(levels - 1) = "
                          f"{2 ** (levels - 1)} (config.predict.volume.levels={levels}), so that every pyramid level "
                          "keeps whole chunks")


def _tensorstore_checks(problems: _Problems, mode: str) -> None:
  """config.data.tensorstore: the training split's volume, and for training the labels every split needs (the train
  and test splits always, the validation split where it names a volume): a missing one fails only after training."""
  volume = "a zarr / N5 / precomputed path, a file:// URL or a TensorStore spec"
  names = {role: problems.value(f"data.{role}_split") for role in ("train", "val", "test")}
  volumes = problems.value("data.tensorstore")
  for role, split in names.items():
    if not isinstance(split, str) or (split and (volumes is None or split not in volumes)):
      continue  # dataset.check_splits names a split without keys
    if role == "train":
      problems.require(f"data.tensorstore.{split}.image", lambda v: isinstance(v, str) and v.strip() != "",
                       f"a volume to train from: {volume}")
    if mode != "train":
      continue
    if role == "test" and (not split or not str(volumes[split].get("image", "")).strip()):
      where = f"config.data.tensorstore.{split}.image" if split else "config.data.test_split"
      problems.lines.append(f"{where} is empty: training ends by predicting and scoring the test split's sections, "
                            f"so name a labelled test volume ({volume}) in config.data.tensorstore.<test split>"
                            ".image and .label")
      continue
    if split and str(volumes[split].get("image", "")).strip():
      problems.require(f"data.tensorstore.{split}.label", lambda v: isinstance(v, str) and v.strip() != "",
                       f"the label volume of config.data.tensorstore.{split}.image (the {role} split is "
                       f"{'trained on' if role == 'train' else 'scored'}): {volume}")


# The per-device batch settings, the global key each one sets, and what one batch holds.
PER_DEVICE_BATCHES = (("train", "crops"), ("predict", "tiles"))


def resolve_batch_sizes(config, *, device_count: int | None = None) -> list[str]:
  """Turns `<section>.batch_size_per_device` (when > 0) into the global `<section>.batch_size`, in place.

  The global batch is then the per-device one times the job's device count (all hosts), so that one setting starts
  a job of any size: a global batch must split evenly over the processes, which a fixed one does not at every
  scale. Call it after the job is joined (`jax.device_count()` counts every host's devices) and before `validate`.
  A per-device value that is not an integer >= 0 is left for `validate` to name.

  Returns:
    One line per batch it set, e.g. "config.train.batch_size=32 (4 crops per device x 8 devices)".
  """
  devices = jax.device_count() if device_count is None else device_count
  lines = []
  for section, what in PER_DEVICE_BATCHES:
    node = config.get(section)
    per_device = node.get("batch_size_per_device", 0) if node is not None else 0
    if _is_int(per_device) and per_device > 0:
      node.batch_size = per_device * devices
      lines.append(f"config.{section}.batch_size={node.batch_size} ({per_device} {what} per device x {devices} "
                   f"device{'s' if devices > 1 else ''})")
  return lines


def local_predict_batch(predict_config, local_device_count: int | None = None) -> int:
  """Tiles per call for a process predicting alone on its own devices (multi-host validation): the per-device batch
  times its devices when that is set, else `predict.batch_size` as it is."""
  per_device = predict_config.get("batch_size_per_device", 0)
  if _is_int(per_device) and per_device > 0:
    return per_device * (jax.local_device_count() if local_device_count is None else local_device_count)
  return predict_config.batch_size


def _divisible_by_processes(problems: _Problems, section: str, batch: int) -> None:
  processes = jax.process_count()
  if batch % processes:
    problems.lines.append(f"config.{section}.batch_size={batch}: must be a multiple of the {processes} processes of "
                          f"this run; or set config.{section}.batch_size_per_device=N instead (the global batch is "
                          f"then N x the {jax.device_count()} devices, whatever the job's size)")


def validate(config, mode: str) -> None:
  """Raises ConfigError listing every problem in the sections `mode` reads (see SECTIONS); nothing else runs."""
  from urisc_jax import losses, models, optim, platforms, sharding  # pylint: disable=g-import-not-at-top

  sections = SECTIONS.get(mode, ())
  problems = _Problems(config)
  multiple = None
  if "model" in sections:
    name = problems.value("model.name")
    if name is not None:
      multiple = problems.call("config.model.name", lambda: models.input_multiple(name))
    problems.require("model.width", lambda v: _is_number(v) and v >= SMALLEST_WIDTH,
                     f"a number >= {SMALLEST_WIDTH:g} (1/64: the 64-channel stem keeps one channel; 1.0 is the "
                     "published model)")
    problems.call("config.model.dtype", lambda: platforms.compute_dtype(config.model.get("dtype", "float32")))
    if not problems.lines:
      overrides = {k: v for k, v in config.model.items() if k not in ("name", "dtype")}
      problems.call("config.model", lambda: models.build(name, in_channels=1, num_classes=1, **overrides))

  if "data" in sections or "data_images" in sections:
    problems.require("data.std", lambda v: _is_number(v) and v > 0, "a positive number")
    problems.require("data.mean", _is_number, "a finite number")
    problems.integer("data.max_image_pixels", 1)
  if "data" in sections:
    problems.choice("data.membrane", MEMBRANE_CHOICES)
    problems.require("data.label_threshold", lambda v: v is None or (_is_int(v) and 0 <= v <= 255),
                     "unset or an integer gray level in 0..255")
    problems.integer("data.num_workers", 0)
    crop = problems.integer("data.crop_size", 1)
    if crop and multiple and crop % multiple:
      problems.lines.append(f"config.data.crop_size={crop}: must be a multiple of {multiple}, the input multiple of "
                            f"config.model.name={config.model.name!r} (e.g. {-(-crop // multiple) * multiple})")
    if config.data.get("source") == "tensorstore":
      _tensorstore_checks(problems, mode)
    if config.data.get("source") == "synthetic":
      height = problems.integer("data.synthetic.height", 1)
      width = problems.integer("data.synthetic.width", 1)
      problems.integer("data.synthetic.num_train", 1)
      problems.integer("data.synthetic.num_val", 0)
      # Training ends by predicting and scoring the test images: with none it would train fully, then fail.
      problems.integer("data.synthetic.num_test", 1 if mode == "train" else 0)
      if crop and height and width and crop > min(height, width):
        problems.lines.append(f"config.data.crop_size={crop}: must be at most the synthetic images' "
                              f"{height} x {width} (config.data.synthetic.height / width)")
  if mode in ("train", "prepare", "criteria") and not problems.lines:
    from urisc_jax.data import dataset  # pylint: disable=g-import-not-at-top
    # A split that leaks into another, or a split key that does not exist, refused now rather than after the data
    # is prepared; for training also a test split that names nothing (it would train fully, then fail).
    problems.call("config.data", lambda: dataset.check_splits(config.data))
    if mode == "train":
      problems.call("config.data", lambda: dataset.check_test_split(config.data))

  if "train" in sections:
    steps = problems.integer("train.num_steps", 1)
    batch = problems.integer("train.batch_size", 1)
    for key in ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints"):
      problems.integer(key, 1)
    problems.integer("train.eval_every", 0)
    if "batch_size_per_device" in config.train:
      problems.integer("train.batch_size_per_device", 0)
    if batch:
      _divisible_by_processes(problems, "train", batch)
    if "optim" in sections and steps:
      problems.require("optim.learning_rate", lambda v: _is_number(v) and v > 0, "a positive number")
      problems.integer("optim.warmup_steps", 0)
      problems.call("config.optim", lambda: optim.optimizer_from_config(config.optim, steps))
    if "loss" in sections:
      problems.call("config.loss", lambda: losses.from_config(config.loss))
    if "mesh" in sections:
      mesh = problems.call("config.mesh", lambda: sharding.mesh_from_config(config.mesh))
      if mesh is not None:
        problems.call("config.mesh", lambda: sharding.check_spatial_axis_within_hosts(mesh))
        if crop and multiple:
          problems.call("config.mesh", lambda: sharding.check_spatial_split(mesh, crop, stride=multiple))
        if batch and batch % sharding.data_parallel_size(mesh):
          problems.lines.append(f"config.train.batch_size={batch}: must be a multiple of the mesh's data axis "
                                f"({sharding.data_parallel_size(mesh)} devices); change it or config.mesh")

  if "predict" in sections:
    tile = problems.integer("predict.tile", 1)
    if tile and multiple and tile % multiple:
      problems.lines.append(f"config.predict.tile={tile}: must be a multiple of {multiple}, the model's input "
                            "multiple")
    problems.require("predict.step", lambda v: _is_number(v) and 0 < v <= 1, "a fraction of the tile in (0, 1]")
    problems.require("predict.halo", lambda v: v is None or (_is_int(v) and v >= 0),
                     "unset (blended tiles) or an integer >= 0")
    predict_batch = problems.integer("predict.batch_size", 1)
    if "batch_size_per_device" in config.predict:
      problems.integer("predict.batch_size_per_device", 0)
    if predict_batch:
      _divisible_by_processes(problems, "predict", predict_batch)
    problems.choice("predict.tta", TTA_CHOICES)
    problems.choice("predict.blend", BLEND_CHOICES)
    problems.choice("predict.on_error", ON_ERROR_CHOICES)
    problems.require("predict.input_pixel_nm", lambda v: v is None or (_is_number(v) and v > 0),
                     "unset (read from the file, else the training data's) or a positive pixel size in nm")
    problems.require("data.pixel_nm", lambda v: v is None or (_is_number(v) and v > 0),
                     "unset (unknown: no resolution matching) or a positive pixel size in nm")
    problems.require("predict.threshold", lambda v: v is None or (_is_number(v) and 0 < v < 1),
                     "unset (chosen on validation images) or a probability in (0, 1)")
    if mode == "predict" and "volume" in config.predict:
      _volume_checks(problems)

  if "eval" in sections:
    problems.choice("eval.gt_mode", GT_MODES)

  if "export" in sections:
    problems.choice("export.format", EXPORT_FORMATS)
    problems.require("export.checkpoint", lambda v: isinstance(v, str) and v != "",
                     "'best', 'latest' or a checkpoint folder")
    size = problems.require("export.sample_size", lambda v: _is_int(v) and 1 <= v <= EXPORT_MAX_SAMPLE_SIZE,
                            f"an integer in 1..{EXPORT_MAX_SAMPLE_SIZE} (the side of the package's test crop)")
    size = size if _is_int(size) and 1 <= size <= EXPORT_MAX_SAMPLE_SIZE else None
    if size and multiple and size % multiple:
      problems.lines.append(f"config.export.sample_size={size}: must be a multiple of {multiple}, the model's input "
                            "multiple")

  if "attribution" in sections:
    for key in ("attribution.steps", "attribution.num_targets", "attribution.chunk_size",
                "attribution.targets_per_pass", "attribution.nodes_per_interval"):
      problems.integer(key, 1)
    problems.integer("attribution.border", 0)
    problems.choice("attribution.rule", ATTRIBUTION_RULES)
    problems.choice("attribution.protocol", ATTRIBUTION_PROTOCOLS)
    paper_size = problems.integer("attribution.paper_size", 32)
    if paper_size and paper_size % 32:
      problems.lines.append(f"config.attribution.paper_size={paper_size}: must be a multiple of 32, the models' "
                            "input multiple")
    problems.integer("attribution.paper_grid", 1)
    problems.require("attribution.tolerance", lambda v: v is None or (_is_number(v) and v >= 0),
                     "unset (one pass of attribution.steps nodes) or a number >= 0")
    steps, cap = problems.value("attribution.steps"), problems.integer("attribution.max_nodes", 1)
    if cap is not None and _is_int(steps) and cap < steps:
      problems.lines.append(f"config.attribution.max_nodes={cap}: must be >= config.attribution.steps={steps}")
    problems.require("attribution.pixel_nm", lambda v: _is_number(v) and v > 0, "a positive pixel size in nm")

  if problems.lines:
    raise ConfigError(f"the config of this --mode={mode} run has {len(problems.lines)} problem"
                      f"{'s' if len(problems.lines) > 1 else ''}:\n  " + "\n  ".join(problems.lines))
