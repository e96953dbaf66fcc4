"""How exactly each export format reproduces the JAX model, and how large it is, for the four published models.

    python -m benchmarks.export                               # all four models, all formats, 256^2 input
    python -m benchmarks.export --models=linknet_r18 --formats=onnx,torch --size=512

For U-Net-ResNet50, LinkNet-ResNet18, CASENet-ResNet152 (U-RISC variant) and the plain U-Net at full width: the
model is initialised and its BatchNorm running statistics are calibrated on the input image (train-mode passes), so
that its logits have the scale of a trained model's; then each format is written with `urisc_jax.export.write` and
run by the runtime its users have:
- onnx: onnxruntime (CPU) on the graph with the normalization inside;
- stablehlo: the deserialized `jax.export` module;
- torch: the state dict loaded with strict=True into the project's torch reference model (segmentation_models_pytorch
  names; tests/fixtures/models/torch_reference.py) and run by torch (float32, CPU), where torch is installed and
  such a model exists (U-Net, LinkNet); CASENet and the plain U-Net report only their size;
- bioimageio: the package's own pipeline, as bioimageio.core runs it: rdf.yaml's preprocessing, weights.onnx,
  sigmoid; compared in probabilities with the JAX model's.
The input is the first ISBI 2012 training slice (../shared/data/isbi2012, centre crop) when present, else a synthetic
U-RISC-like image. One JSON object per line:
  {"bench": "export", "model", "format", "metric": "max_abs_diff", "value", "unit": "logit" | "probability",
   "logit_scale": max |JAX logit|, "bytes": exported size, "seconds": export time}
"""

import argparse
import importlib.util
import pathlib
import tempfile
import time

import jax
import numpy as np

from benchmarks.json_lines import emit, log
from urisc_jax import export as exporting
from urisc_jax import models
from urisc_jax.data import synthetic
from urisc_jax.export import graph, onnx_graph, stablehlo

REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = {
    "unet_r50": ("unet", {"encoder": "resnet50"}),
    "linknet_r18": ("linknet", {"encoder": "resnet18"}),
    "casenet_r152": ("casenet", {"encoder": "resnet152"}),
    "plain_unet": ("plain_unet", {}),
}
FORMATS = ("onnx", "stablehlo", "torch", "bioimageio")
MEAN, STD = 0.57287007, 0.12740536  # the project's default normalization (CEM500K's)


def sample_image(size: int) -> tuple[str, np.ndarray]:
  isbi = REPO.parent / "shared" / "data" / "isbi2012" / "train" / "images" / "00.png"
  if isbi.exists():
    from PIL import Image  # pylint: disable=g-import-not-at-top
    image = np.asarray(Image.open(isbi).convert("L"))
    name = "isbi2012/train/00.png"
  else:
    image, _ = synthetic.render(synthetic.urisc_like(size, size), 7)
    name = "synthetic urisc_like seed 7"
  top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
  return name, np.ascontiguousarray(np.asarray(image, np.uint8)[top:top + size, left:left + size])


def calibrated(name: str, overrides: dict, image: np.ndarray, passes: int) -> exporting.TrainedModel:
  """A full-width model with He-initialised weights and BatchNorm statistics from `passes` train-mode passes."""
  model = models.build(name, in_channels=1, num_classes=1, **overrides)
  variables = models.init_variables(model, (1, *image.shape, 1))
  x = ((image[None, :, :, None] / 255.0 - MEAN) / STD).astype(np.float32)
  update = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"])
  for _ in range(passes):
    variables = {**variables, "batch_stats": update(variables, x)}
  variables = jax.tree.map(lambda v: np.asarray(v, np.float32), variables)
  return exporting.TrainedModel(name=name, model=model, variables=variables, mean=MEAN, std=STD,
                                multiple=models.input_multiple(name), step=0, checkpoint_dir=pathlib.Path("-"),
                                model_config={"name": name, "width": 1.0, **overrides}, threshold=0.5, halo=None)


def torch_logits(trained: exporting.TrainedModel, path: pathlib.Path, x_nchw: np.ndarray) -> np.ndarray | None:
  """The exported state dict in the torch reference model (strict load), or None without torch or such a model."""
  if trained.name not in ("unet", "linknet"):
    return None
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  spec = importlib.util.spec_from_file_location("torch_reference",
                                                REPO / "tests" / "fixtures" / "models" / "torch_reference.py")
  reference = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(reference)
  net = reference.SegmentationModel(trained.name, trained.model_config["encoder"], in_channels=1, classes=1).eval()
  net.load_state_dict(load_file(path), strict=True)
  with torch.no_grad():
    return net(torch.from_numpy(((x_nchw - trained.mean) / trained.std).astype(np.float32))).numpy()


def measure(key: str, trained: exporting.TrainedModel, formats, sample, folder: pathlib.Path) -> None:
  x = (sample[1][None, None] / np.float32(255)).astype(np.float32)
  jax_logits = np.asarray(jax.jit(graph.inference_function(trained.model, trained.variables, mean=trained.mean,
                                                           std=trained.std))(x))
  scale = float(np.abs(jax_logits).max())
  names = {"onnx": "model.onnx", "stablehlo": "model.stablehlo", "torch": "model.safetensors",
           "bioimageio": "package"}
  for fmt in formats:
    path = folder / f"{key}_{names[fmt]}"
    start = time.perf_counter()
    summary = exporting.write(trained, fmt, path, sample=sample, sample_size=sample[1].shape[0])
    seconds = time.perf_counter() - start
    unit = "logit"
    if fmt == "onnx":
      got = onnx_graph.run(path, x)
    elif fmt == "stablehlo":
      got = np.asarray(stablehlo.load(path).call(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    elif fmt == "torch":
      got = torch_logits(trained, path, x)
    else:
      test_input = np.load(path / "test_input.npy")
      pre = ((test_input / np.float32(255) - trained.mean) / trained.std).astype(np.float32)
      got = 1 / (1 + np.exp(-onnx_graph.run(path / "weights.onnx", pre)))
      unit = "probability"
    want = jax_logits if unit == "logit" else 1 / (1 + np.exp(-jax_logits.astype(np.float64)))
    diff = None if got is None else float(np.abs(np.asarray(got, np.float64) - want).max())
    emit({"bench": "export", "model": key, "format": fmt, "metric": "max_abs_diff", "value": diff, "unit": unit,
          "logit_scale": scale, "bytes": summary["bytes"], "seconds": round(seconds, 1),
          **({"validation": summary["validation"], "weights": summary["weights"]} if fmt == "bioimageio" else {}),
          **({"note": "no torch model of this layout to run (project layout)" if trained.name not in (
              "unet", "linknet") else "torch not installed"} if diff is None else {})})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--formats", default=",".join(FORMATS))
  parser.add_argument("--size", type=int, default=256, help="input side (a multiple of 32)")
  parser.add_argument("--passes", type=int, default=10, help="train-mode passes calibrating BatchNorm statistics")
  args = parser.parse_args()
  sample = sample_image(args.size)
  log(f"input: {sample[0]}, {args.size} x {args.size}")
  with tempfile.TemporaryDirectory() as folder:
    for key in args.models.split(","):
      name, overrides = MODELS[key]
      log(f"{key}: calibrating ...")
      trained = calibrated(name, overrides, sample[1], args.passes)
      measure(key, trained, args.formats.split(","), sample, pathlib.Path(folder))


if __name__ == "__main__":
  main()
