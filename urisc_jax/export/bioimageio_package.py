"""A bioimage.io model package of a trained model (ilastik, Fiji/deepImageJ, napari, bioimageio.core open it).

Folder layout (or the same files in a .zip when the output path ends with .zip):
  rdf.yaml            the model description (format 0.5), validated with bioimageio.spec before this returns
  weights.onnx        the graph of `onnx_graph` without the normalization (rdf.yaml states it as preprocessing)
  weights.pt          U-Net / LinkNet at width 1 only: the segmentation_models_pytorch state dict (torch.save's
                      format, written without torch), architecture `segmentation_models_pytorch.Unet` / `Linknet`
  test_input.npy      float32 [1, 1, S, S]: a crop of a real image, gray values 0..255 as read
  test_output.npy     float32 [1, 1, S, S]: the membrane probability the JAX model computes for it
  sample_input.tif, sample_output.tif   the same as images (uint8 gray, float32 probability)
  cover.png           the crop and the prediction drawn on it, side by side
  README.md           what the model is, how to feed it, the halo and the threshold, the citation

Tensors: input "raw" with axes batch, channel (gray), y, x (sizes min M + k * m, m = the model's input multiple,
M = 4 x halo rounded up to m: the project's smallest halo tile); preprocessing scale_linear (1/255: gray to [0, 1])
then fixed_zero_mean_unit_variance (the training normalization). Output "membrane" with axes batch, channel, y, x of
the input's size and halo config.predict.halo (a tiler drops that margin of each tile, as `inference` does);
postprocessing sigmoid, so the package returns probabilities; membrane = probability >= the threshold in
config.urisc_jax.threshold (chosen on validation images).
"""

import datetime
import os
import pathlib
import shutil
import tempfile

import numpy as np

from urisc_jax import inference, outputs
from urisc_jax.export import graph, onnx_graph, torch_state

CITATION = ("Shi R, Wang W, Li Z, He L, Sheng K, Ma L, Du K, Jiang T and Huang T (2022). U-RISC: An Annotated "
            "Ultra-High-Resolution Electron Microscopy Dataset Challenging the Existing Deep Learning Algorithms. "
            "Frontiers in Computational Neuroscience 16:842760.")
CITATION_DOI = "10.3389/fncom.2022.842760"
INPUT_ID, OUTPUT_ID = "raw", "membrane"
PYTORCH_VERSION = "2.13.0"  # the torch the strict state-dict load was checked with (tests/export_test.py)
# Every name a package folder of this project holds: an existing folder with anything else is the user's.
PACKAGE_FILES = frozenset({"rdf.yaml", "weights.onnx", "weights.pt", "test_input.npy", "test_output.npy",
                           "sample_input.tif", "sample_output.tif", "cover.png", "README.md"})


def sample_image(config, workdir: pathlib.Path) -> tuple[str, np.ndarray]:
  """(name, uint8 [H, W]) of config.export.sample, or of the first image of config.data's test split."""
  from urisc_jax.data import dataset, sources  # pylint: disable=g-import-not-at-top
  if config.export.sample:
    path = pathlib.Path(config.export.sample)
    return path.name, sources.read_image(path)
  images = dataset.prepared_split(config.data, workdir, config.data.test_split, progress=False)
  if not images:
    raise FileNotFoundError("--config.export.format=bioimageio needs a sample image for its test tensors: pass "
                            "--config.export.sample=IMAGE (config.data's test split has no image).")
  return images[0].name, np.asarray(images[0].image())


def _crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central size x size crop of a uint8 [H, W] image (reflect-padded where the image is smaller)."""
  h, w = image.shape
  if h < size or w < size:
    image = np.pad(image, ((0, max(0, size - h)), (0, max(0, size - w))), mode="reflect")
    h, w = image.shape
  top, left = (h - size) // 2, (w - size) // 2
  return np.ascontiguousarray(image[top:top + size, left:left + size])


def smp_architecture(trained) -> dict | None:
  """The segmentation_models_pytorch architecture entry of rdf.yaml, or None where smp cannot build the model
  (CASENet, the plain U-Net, other widths or decoder channels than smp's)."""
  config = trained.model_config
  if trained.name not in torch_state.SMP_MODELS or float(config.get("width", 1.0)) != 1.0:
    return None
  if trained.name == "unet" and tuple(config.get("decoder_channels", (256, 128, 64, 32, 16))) != (
      256, 128, 64, 32, 16):
    return None
  if trained.name == "linknet" and int(config.get("prefinal_channels", 32)) != 32:
    return None
  return {"callable": torch_state.SMP_MODELS[trained.name], "import_from": "segmentation_models_pytorch",
          "kwargs": {"encoder_name": config.get("encoder", "resnet50" if trained.name == "unet" else "resnet18"),
                     "encoder_weights": None, "in_channels": 1, "classes": 1}}


def min_tile(trained) -> int:
  """The smallest input size the package advertises: the project's smallest halo tile (4 x halo, a multiple of
  the input multiple), or the input multiple without a halo."""
  if not trained.halo:
    return trained.multiple
  return inference.min_halo_tile(trained.halo, multiple=trained.multiple)


def build(trained, sample: tuple[str, np.ndarray], output: str | pathlib.Path, *, size: int = 256) -> dict:
  """Writes the package for `trained` (an `export.TrainedModel`) at `output` (a folder, or a .zip) and validates it.

  Args:
    trained: the model, its variables, normalization, halo and threshold.
    sample: (name, uint8 [H, W]) the image the test tensors and the cover are cut from.
    output: the package folder (created), or a path ending in .zip.
    size: side of the square test crop, raised to the smallest advertised tile if below it.

  Returns:
    {"bytes": total size, "files": {name: bytes}, "validation": status, "test_size": S, "weights": [...]}.

  Raises:
    ValueError: bioimageio.spec found the description invalid (its report is in the message).
  """
  output = pathlib.Path(output)
  if output.suffix == ".zip" and output.is_dir():
    raise NotADirectoryError(f"config.export.output={output} is a folder; pass a path ending in .zip that is not one")
  if output.suffix == ".zip":
    with tempfile.TemporaryDirectory() as folder:
      summary = _write_folder(trained, sample, pathlib.Path(folder), size=size)
      from bioimageio.spec import save_bioimageio_package  # pylint: disable=g-import-not-at-top
      with outputs.atomic_path(output) as tmp:
        save_bioimageio_package(pathlib.Path(folder) / "rdf.yaml", output_path=tmp.with_suffix(".zip"))
        tmp.with_suffix(".zip").replace(tmp)
    summary["bytes"] = output.stat().st_size
    return summary
  if output.exists() and not output.is_dir():
    raise NotADirectoryError(f"config.export.output={output} is a file; pass a folder or a path ending in .zip")
  reason = foreign_folder(output)
  if reason:
    raise FileExistsError(f"config.export.output={output} is an existing folder that is not a package written by this "
                          f"project ({reason}); it is left as it is. Pass a new or empty folder.")
  # Built in a hidden sibling and renamed into place once validated: an interrupted export (an error, SIGTERM) leaves
  # at most that sibling (.<name>.<random>.partial), never a folder at `output` that looks like a whole package.
  output.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial"))
  try:
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it owner-only; the package is as any new folder
    summary = _write_folder(trained, sample, staging, size=size)
    _move_into_place(staging, output)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return summary


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def foreign_folder(folder: pathlib.Path) -> str | None:
  """Why an existing, non-empty `folder` is not a package this project wrote (so an export must not replace it), or
  None where it is absent, empty or one of ours: an rdf.yaml with a config.urisc_jax section and no other names than
  a package holds (PACKAGE_FILES)."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    return None
  names = sorted(p.name for p in folder.iterdir())
  if not names:
    return None
  others = [n for n in names if n not in PACKAGE_FILES]
  if others:
    shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    return f"it holds {shown}, which a package does not"
  try:
    import yaml  # pylint: disable=g-import-not-at-top
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    ours = isinstance(rdf, dict) and isinstance((rdf.get("config") or {}).get("urisc_jax"), dict)
  except (OSError, ValueError, AttributeError, yaml.YAMLError):
    ours = False
  return None if ours else "it has no rdf.yaml written by urisc_jax"


def _move_into_place(staging: pathlib.Path, output: pathlib.Path) -> None:
  """Renames the finished package `staging` to `output`, replacing an empty folder or a previous package there: the
  previous one is renamed aside first and removed only once the new one is in place."""
  if not output.exists():
    staging.rename(output)
    return
  previous = pathlib.Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".previous"))
  previous.rmdir()
  output.rename(previous)
  try:
    staging.rename(output)
  except BaseException:
    previous.rename(output)
    raise
  shutil.rmtree(previous, ignore_errors=True)


def _write_folder(trained, sample, folder: pathlib.Path, *, size: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  folder.mkdir(parents=True, exist_ok=True)
  name, image = sample
  side = max(size, min_tile(trained))
  side = -(-side // trained.multiple) * trained.multiple
  crop = _crop(image, side)
  test_input = crop.astype(np.float32)[None, None]
  forward = jax.jit(graph.inference_function(trained.model, trained.variables, mean=trained.mean, std=trained.std,
                                             sigmoid=True, layout="NCHW"))
  test_output = np.asarray(forward(test_input / np.float32(255)), np.float32)
  files = {}
  for file_name, array in (("test_input.npy", test_input), ("test_output.npy", test_output)):
    with outputs.atomic_path(folder / file_name) as tmp:
      with open(tmp, "wb") as f:
        np.save(f, array)
  outputs.write_tiff(folder / "sample_input.tif", crop)  # the same, as images a person can open
  outputs.write_tiff(folder / "sample_output.tif", test_output[0, 0])
  membrane = test_output[0, 0] >= trained.threshold
  cover = np.concatenate([np.repeat(crop[..., None], 3, axis=-1), inference.overlay(crop, membrane)], axis=1)
  outputs.write_png(folder / "cover.png", cover)

  proto = onnx_graph.convert(trained.model, trained.variables, mean=trained.mean, std=trained.std,
                             multiple=trained.multiple, normalize=False, sigmoid=False)
  onnx_graph.save(proto, folder / "weights.onnx")
  weights = {"onnx": {"source": "weights.onnx", "opset_version": onnx_graph.OPSET,
                      "comment": "converted from the JAX model by jax2onnx; normalization is preprocessing"}}
  architecture = smp_architecture(trained)
  if architecture is not None:
    torch_state.save_pth(torch_state.state_dict(trained.variables), folder / "weights.pt")
    weights["pytorch_state_dict"] = {"source": "weights.pt", "architecture": architecture,
                                     "pytorch_version": PYTORCH_VERSION, "parent": "onnx",
                                     "comment": "segmentation_models_pytorch names; strict load"}
  outputs.write_text(folder / "README.md", _readme(trained, architecture is not None))
  rdf = _description(trained, weights, sample_name=name, side=side)
  import yaml  # pylint: disable=g-import-not-at-top
  outputs.write_text(folder / "rdf.yaml", yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True))
  status = validate(folder / "rdf.yaml")
  for path in sorted(folder.iterdir()):
    files[path.name] = path.stat().st_size
  return {"bytes": sum(files.values()), "files": files, "validation": status, "test_size": side,
          "weights": list(weights)}


def _model_title(trained) -> str:
  config = trained.model_config
  titles = {"unet": "U-Net", "linknet": "LinkNet", "casenet": "CASENet", "plain_unet": "plain U-Net"}
  title = titles.get(trained.name, trained.name)
  if trained.name in ("unet", "linknet", "casenet") and config.get("encoder"):
    title += "-" + str(config["encoder"]).replace("resnet", "ResNet")
  width = float(config.get("width", 1.0))
  # bioimage.io names allow letters, digits, _+-() and spaces only.
  return title + ("" if width == 1.0 else f" ({100 * width:.0f} pct width)")


def _description(trained, weights: dict, *, sample_name: str, side: int) -> dict:
  """The rdf.yaml content (bioimage.io model format 0.5)."""
  from bioimageio.spec.model import v0_5  # pylint: disable=g-import-not-at-top
  space = {"min": min_tile(trained), "step": trained.multiple}
  output_axes = []
  for axis in ("y", "x"):
    entry = {"type": "space", "id": axis, "size": {"tensor_id": INPUT_ID, "axis_id": axis}}
    if trained.halo:
      entry["halo"] = int(trained.halo)
    output_axes.append(entry)
  return {
      "type": "model",
      "format_version": v0_5.ModelDescr.implemented_format_version,
      "name": f"U-RISC membrane {_model_title(trained)}",
      "description": (f"Cell membrane segmentation of electron microscopy images: {_model_title(trained)} trained "
                      "with urisc_jax (a JAX reimplementation of the U-RISC benchmark); returns the membrane "
                      "probability per pixel."),
      "authors": [{"name": "urisc_jax contributors"}],
      "cite": [{"text": CITATION, "doi": CITATION_DOI}],
      "license": "MIT",
      "tags": ["electron-microscopy", "membrane-segmentation", "semantic-segmentation", "2d", "onnx", "jax"],
      "documentation": {"source": "README.md"},
      "covers": [{"source": "cover.png"}],
      "timestamp": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
      "inputs": [{
          "id": INPUT_ID,
          "description": "gray EM image, 8-bit values 0..255 (as float32)",
          "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["gray"]},
                   {"type": "space", "id": "y", "size": space}, {"type": "space", "id": "x", "size": space}],
          "test_tensor": {"source": "test_input.npy"},
          "sample_tensor": {"source": "sample_input.tif"},
          "data": {"type": "float32", "range": [0.0, 255.0]},
          "preprocessing": [
              {"id": "scale_linear", "kwargs": {"gain": 1.0 / 255.0, "offset": 0.0}},
              {"id": "fixed_zero_mean_unit_variance", "kwargs": {"mean": trained.mean, "std": trained.std}},
          ],
      }],
      "outputs": [{
          "id": OUTPUT_ID,
          "description": "membrane probability",
          "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["membrane"]}] + output_axes,
          "test_tensor": {"source": "test_output.npy"},
          "sample_tensor": {"source": "sample_output.tif"},
          "data": {"type": "float32", "range": [0.0, 1.0]},
          "postprocessing": [{"id": "sigmoid"}],
      }],
      "weights": weights,
      "config": {"urisc_jax": {"model": trained.name, "model_config": {k: _plain(v) for k, v in
                                                                      trained.model_config.items()},
                               "checkpoint_step": trained.step, "threshold": trained.threshold,
                               "halo": trained.halo, "test_tensors_from": sample_name, "test_size": side}},
  }


def _plain(value):
  """YAML-safe config values (tuples as lists)."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _readme(trained, has_torch: bool) -> str:
  halo = (f"Tile with a halo of {trained.halo} px: tiles overlap by {2 * trained.halo} px and each keeps its inner "
          "part (the margin where the logits still feel the tile border is dropped)." if trained.halo else
          "No halo was configured for this model: blend overlapping tiles.")
  torch_line = ("- weights.pt: the same weights as a segmentation_models_pytorch state dict "
                f"(`segmentation_models_pytorch.{torch_state.SMP_MODELS.get(trained.name, '')}`, strict load).\n"
                if has_torch else "")
  return f"""# U-RISC membrane segmentation: {_model_title(trained)}

Trained with urisc_jax (checkpoint step {trained.step}). Input: a gray EM image (8-bit values), any height and
width that are multiples of {trained.multiple} (at least {min_tile(trained)} px). Preprocessing, as stated in
rdf.yaml: gray / 255, then (x - {trained.mean:.8g}) / {trained.std:.8g} (the training normalization). Output: the
membrane probability per pixel (sigmoid of the network's logit); membrane = probability >= {trained.threshold:g},
the threshold chosen on validation images.

{halo}

- weights.onnx: the network (opset {onnx_graph.OPSET}, dynamic batch, height and width), normalization excluded.
{torch_line}
Open it in ilastik (Neural Network Classification), Fiji with deepImageJ, napari (bioimageio plugin) or with
`bioimageio.core` in Python.

Cite: {CITATION} doi:{CITATION_DOI}
"""


def validate(rdf_path: pathlib.Path) -> str:
  """bioimageio.spec's validation of the description (with file and hash checks); returns its status.

  Raises:
    ValueError: the description is invalid, with the validator's report.
  """
  from bioimageio.spec import load_description  # pylint: disable=g-import-not-at-top
  descr = load_description(str(rdf_path), perform_io_checks=True)
  summary = descr.validation_summary
  if summary.status == "failed":
    raise ValueError(f"{rdf_path}: bioimageio.spec rejects the description:\n{summary.format()}")
  return str(summary.status)

