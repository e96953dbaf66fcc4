"""`--mode=export`: a trained model in a format other tools open.

    python -m urisc_jax.main --config=CONFIG --workdir=RUN --mode=export --config.export.format=onnx \
        [--config.export.output=PATH] [--config.export.checkpoint=best|latest|FOLDER] [--config.export.sigmoid=True]

Formats (one module each):
- onnx (`onnx_graph`): the inference graph, normalization included, dynamic batch / height / width, opset 17.
- torch (`torch_state`): a PyTorch state dict (.safetensors, or .pt / .pth in torch.save's format), with
  segmentation_models_pytorch's names for U-Net and LinkNet and the project's own names for CASENet and the plain
  U-Net; the inverse of `models.torch_import.load_state_dict`.
- bioimageio (`bioimageio_package`): a bioimage.io model package (rdf.yaml, ONNX weights, a PyTorch state dict
  where smp builds the model, test tensors and a cover from a real image), validated with bioimageio.spec.
- stablehlo (`stablehlo`): a serialized `jax.export` module, symbolic in batch, height and width.

Every format holds the float32 model in eval mode (BatchNorm running statistics) of the chosen checkpoint: the best
one by validation F1 (workdir/checkpoints_best) unless config.export.checkpoint says otherwise.
"""

import dataclasses
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np

from urisc_jax import checkpoint, config_checks, models, optim, state

FORMATS = ("onnx", "torch", "bioimageio", "stablehlo")
DEFAULT_NAMES = {"onnx": "model.onnx", "torch": "model.safetensors", "bioimageio": "bioimageio",
                 "stablehlo": "model.stablehlo"}


class OutputError(config_checks.ConfigError):
  """config.export.output cannot take the export (a folder where a file goes, a file where a folder goes, a user's
  folder, no permission); the message names the key and the fix."""


@dataclasses.dataclass
class TrainedModel:
  """What every exporter needs from a trained run.

  Attributes:
    name: config.model.name ('unet', 'linknet', 'casenet', 'plain_unet').
    model: the float32 Flax module.
    variables: {'params', 'batch_stats'} as numpy float32 arrays.
    mean, std: the input normalization it was trained with (gray in [0, 1] -> (x - mean) / std).
    multiple: what input height and width must be multiples of.
    step: the checkpoint's step; checkpoint_dir: where it was read.
    model_config: config.model as a dict (encoder, width, ...).
    threshold: the decision threshold chosen on validation images for this step (0.5 when none was stored).
    halo: config.predict.halo, the margin the project's tiling drops at tile borders (None: blended tiles).
  """
  name: str
  model: Any
  variables: Any
  mean: float
  std: float
  multiple: int
  step: int
  checkpoint_dir: pathlib.Path
  model_config: dict
  threshold: float
  halo: int | None


def checkpoint_folder(workdir: pathlib.Path, which: str) -> pathlib.Path:
  """workdir/checkpoints_best for 'best' (workdir/checkpoints when no best state was kept: runs with
  train.eval_every=0 and no validation split), workdir/checkpoints for 'latest', else the folder named."""
  if which == "best":
    best = workdir / "checkpoints_best"
    if best.is_dir():
      checkpointer = checkpoint.Checkpointer(best, create=False)
      step = checkpointer.latest_step()
      checkpointer.close()
      if step is not None:
        return best
    logging.warning("no best checkpoint in %s (train.eval_every=0 or no validation images?); exporting the latest "
                    "one of %s", best, workdir / "checkpoints")
    return workdir / "checkpoints"
  if which == "latest":
    return workdir / "checkpoints"
  return pathlib.Path(which)


def load_trained(config, workdir: str | pathlib.Path) -> TrainedModel:
  """The checkpoint config.export.checkpoint names, as a float32 model with numpy variables (on the host)."""
  from urisc_jax import predict  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  folder = checkpoint_folder(workdir, config.export.checkpoint)
  model_settings = config.model.copy_and_resolve_references()
  model_settings.dtype = "float32"  # exports compute in float32 whatever the training dtype was
  model = state.build_model(model_settings)
  model_config = model_settings.to_dict()
  checkpointer = checkpoint.Checkpointer(folder, create=False)
  tx = optim.optimizer_from_config(config.optim, config.train.num_steps)
  abstract = jax.eval_shape(lambda rng: state.init_state(model, tx, rng, config.data.crop_size), jax.random.key(0))
  placement = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), abstract)
  restored = checkpointer.restore_latest(target)
  checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {folder}: train first (--mode=train) or pass the --workdir of a "
                            "trained run (or --config.export.checkpoint=FOLDER).")
  variables = jax.tree.map(lambda v: np.asarray(v, np.float32),
                           {"params": restored.state.params, "batch_stats": restored.state.batch_stats})
  normalization = restored.meta.get("normalization") or {"mean": config.data.mean, "std": config.data.std}
  # config.predict.threshold if set, else the one chosen with the best state, else threshold.json's for this step.
  threshold = config.predict.threshold
  if threshold is None:
    threshold = restored.meta.get("threshold")
  if threshold is None:
    threshold = predict.decision_threshold(config, workdir, restored.step)
  return TrainedModel(name=config.model.name, model=model, variables=variables, mean=float(normalization["mean"]),
                      std=float(normalization["std"]), multiple=models.input_multiple(config.model.name),
                      step=int(restored.step), checkpoint_dir=folder, model_config=model_config,
                      threshold=float(threshold), halo=config.predict.get("halo"))


def output_path(config, workdir: pathlib.Path) -> pathlib.Path:
  """config.export.output, or workdir/export/<default name of the format>."""
  if config.export.output:
    return pathlib.Path(config.export.output)
  return workdir / "export" / DEFAULT_NAMES[config.export.format]


def check_output(path: str | pathlib.Path, fmt: str) -> None:
  """Refuses, before the checkpoint is loaded, an output `fmt` cannot be written to: a folder where the format writes
  one file, a file where it writes a folder, a path below a file, a folder that is not writable, and (bioimageio) a
  non-empty folder that is not a package this project wrote.

  Raises:
    OutputError: naming config.export.output and the fix.
  """
  path = pathlib.Path(path)
  key = f"config.export.output={str(path)!r}"
  folder_format = fmt == "bioimageio" and path.suffix != ".zip"
  if folder_format:
    from urisc_jax.export import bioimageio_package  # pylint: disable=g-import-not-at-top
    if path.exists() and not path.is_dir():
      raise OutputError(f"{key} is a file; a bioimage.io package is a folder: pass a new folder, or a path ending in "
                        ".zip for the zipped package.")
    reason = bioimageio_package.foreign_folder(path)
    if reason:
      raise OutputError(f"{key} is an existing folder that is not a package written by this project ({reason}); it "
                        "is left as it is. Pass a new or empty folder.")
  elif path.is_dir():
    name = "bioimageio.zip" if fmt == "bioimageio" else DEFAULT_NAMES[fmt]
    raise OutputError(f"{key} is a folder; the {fmt} export is one file: pass a file path, e.g. "
                      f"--config.export.output={path / name}.")
  ancestor = path.parent
  while not ancestor.exists() and ancestor != ancestor.parent:
    ancestor = ancestor.parent
  if not ancestor.is_dir():
    raise OutputError(f"{key}: {ancestor} is a file, so nothing can be written below it; pass a path in a folder.")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise OutputError(f"{key}: the folder {ancestor} is not writable (permission denied); pass a path in a writable "
                      "folder with --config.export.output=PATH.")


def export(config, workdir: str | pathlib.Path) -> dict:
  """`--mode=export`: writes config.export.format to `output_path`; returns a summary (path, bytes, step, ...).

  The output is checked (`check_output`) before anything is loaded or written; a permission error while writing is
  reported against config.export.output, not the temporary file it was written through."""
  workdir = pathlib.Path(workdir)
  fmt = config.export.format
  if fmt not in FORMATS:
    raise ValueError(f"config.export.format={fmt!r}: choose one of {', '.join(FORMATS)}")
  output = output_path(config, workdir)
  check_output(output, fmt)
  trained = load_trained(config, workdir)
  sample = None
  if fmt == "bioimageio":
    from urisc_jax.export import bioimageio_package  # pylint: disable=g-import-not-at-top
    sample = bioimageio_package.sample_image(config, workdir)
  try:
    summary = write(trained, fmt, output, sigmoid=config.export.sigmoid, sample=sample,
                    sample_size=config.export.sample_size)
  except PermissionError as e:
    raise OutputError(f"config.export.output={str(output)!r}: cannot write there ({e.strerror or e}); pass a path "
                      "in a writable folder with --config.export.output=PATH.") from e
  return {**summary, "checkpoint": str(trained.checkpoint_dir)}


def write(trained: TrainedModel, fmt: str, path: str | pathlib.Path, *, sigmoid: bool = False,
          sample: tuple[str, np.ndarray] | None = None, sample_size: int = 256) -> dict:
  """Writes `trained` as `fmt` at `path`; returns a summary with the size in bytes.

  Args:
    trained: the model and what to know about it (`load_trained`).
    fmt: one of FORMATS.
    path: the file (onnx, torch: .safetensors, .pt or .pth; stablehlo) or the package folder / .zip (bioimageio).
    sigmoid: onnx and stablehlo: probabilities instead of logits.
    sample: bioimageio: (name, uint8 [H, W]) the image its test tensors and cover are cut from.
    sample_size: bioimageio: side of the test crop.
  """
  path = pathlib.Path(path)
  summary = {"format": fmt, "output": str(path), "model": trained.name, "step": trained.step,
             "input_multiple": trained.multiple, "normalization": {"mean": trained.mean, "std": trained.std}}
  if fmt == "onnx":
    from urisc_jax.export import onnx_graph  # pylint: disable=g-import-not-at-top
    proto = onnx_graph.convert(trained.model, trained.variables, mean=trained.mean, std=trained.std,
                               multiple=trained.multiple, sigmoid=sigmoid, metadata=describe(trained, sigmoid=sigmoid))
    summary.update(bytes=onnx_graph.save(proto, path), opset=onnx_graph.OPSET,
                   input_tensor="image float32 [batch, 1, height, width], gray in [0, 1]",
                   output_tensor=f"{proto.graph.output[0].name} float32 [batch, 1, height, width]")
  elif fmt == "torch":
    from urisc_jax.export import torch_state  # pylint: disable=g-import-not-at-top
    tensors = torch_state.state_dict(trained.variables)
    if path.suffix in (".pt", ".pth"):
      size = torch_state.save_pth(tensors, path)
    else:
      size = torch_state.save(tensors, path, metadata=describe(trained))
    summary.update(bytes=size, layout=torch_state.layout(trained.name), tensors=len(tensors))
  elif fmt == "stablehlo":
    from urisc_jax.export import stablehlo  # pylint: disable=g-import-not-at-top
    exported = stablehlo.export_module(trained.model, trained.variables, mean=trained.mean, std=trained.std,
                                       multiple=trained.multiple, sigmoid=sigmoid)
    summary.update(bytes=stablehlo.save(exported, path), platforms=list(exported.platforms),
                   input_tensor=f"float32 {exported.in_avals[0].shape}, gray in [0, 1]")
  elif fmt == "bioimageio":
    from urisc_jax.export import bioimageio_package  # pylint: disable=g-import-not-at-top
    if sample is None:
      raise ValueError("the bioimageio format needs a sample image (name, uint8 [H, W]) for its test tensors")
    summary.update(bioimageio_package.build(trained, sample, path, size=sample_size))
  else:
    raise ValueError(f"export format {fmt!r}: choose one of {', '.join(FORMATS)}")
  return summary


def describe(trained: TrainedModel, *, sigmoid: bool = False) -> dict[str, str]:
  """String metadata stored in ONNX and safetensors files: what the model is and how to feed it."""
  return {"urisc_jax.model": trained.name,
          "urisc_jax.model_config": str({k: v for k, v in trained.model_config.items()}),
          "urisc_jax.step": str(trained.step),
          "urisc_jax.input": "gray in [0, 1]; height and width multiples of " + str(trained.multiple),
          "urisc_jax.normalization": f"(x - {trained.mean!r}) / {trained.std!r}",
          "urisc_jax.output": "membrane probability" if sigmoid else "membrane logit",
          "urisc_jax.threshold": repr(trained.threshold)}
