"""--mode=export: ONNX, PyTorch state dict, bioimage.io package and StableHLO against the JAX model they came from.

One module-scoped workdir holds a narrow U-Net-ResNet18 checkpoint (initialised, BatchNorm statistics calibrated
on a synthetic image so the logits have a realistic scale) as the best checkpoint; each format is exported from it
through `export.export`, as `--mode=export` does, and run by the runtime its users have: onnxruntime, torch (the
project's torch reference model with segmentation_models_pytorch's names, strict load), bioimageio.spec and
bioimageio.core, jax.export. Logits are compared at 1e-4 of the logit scale (max(1, max |logit|)).
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from urisc_jax import checkpoint, models, optim, platforms, state
from urisc_jax import export as exporting
from urisc_jax.data import synthetic
from urisc_jax.export import bioimageio_package, graph, onnx_graph, stablehlo, torch_state
from urisc_jax.models import layers, torch_import

TOLERANCE = 1e-4
BEST_STEP, LATEST_STEP = 3, 4


def _synthetic(height, width, seed):
  image, _ = synthetic.render(synthetic.urisc_like(height, width), seed)
  return np.asarray(image, np.uint8)


def _assert_close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  scale = max(1.0, float(np.abs(want).max()))
  assert np.abs(got - want).max() <= TOLERANCE * scale, (np.abs(got - want).max(), scale)


def _calibrated_state(model, tx, config, image):
  """Initial parameters with BatchNorm running statistics moved to a real image's (eval logits of a sane scale)."""
  variables = models.init_variables(model, (1, config.data.crop_size, config.data.crop_size, 1))
  st = state.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                        batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))
  x = ((image[None, :, :, None] / 255.0 - config.data.mean) / config.data.std).astype(np.float32)
  update = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"])
  stats = st.batch_stats
  for _ in range(30):  # momentum 0.1: 0.9 ** 30 = 4 % of the initial statistics remain
    stats = update({"params": st.params, "batch_stats": stats}, x)
  return st.replace(batch_stats=stats, step=jnp.asarray(BEST_STEP, jnp.int32))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, workdir): a best checkpoint at step 3 and a different latest one at step 4."""
  workdir = tmp_path_factory.mktemp("export_run")
  config = tiny.get_config()
  config.model.dtype = "float32"
  config.predict.halo = 16
  config.export.sample_size = 64
  model = state.build_model(config.model)
  tx = optim.optimizer_from_config(config.optim, config.train.num_steps)
  best = _calibrated_state(model, tx, config, _synthetic(128, 128, seed=5))
  meta = {"normalization": {"mean": config.data.mean, "std": config.data.std}, "threshold": 0.42}
  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints_best", max_to_keep=1)
  checkpointer.save(BEST_STEP, best, meta={**meta, "val_f1": 0.5, "step": BEST_STEP})
  checkpointer.wait()
  checkpointer.close()
  latest = best.replace(params=jax.tree.map(lambda p: p * 0.5, best.params),
                        step=jnp.asarray(LATEST_STEP, jnp.int32))
  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints")
  checkpointer.save(LATEST_STEP, latest, meta=meta)
  checkpointer.wait()
  checkpointer.close()
  sample = workdir / "sample.png"
  Image.fromarray(_synthetic(96, 96, seed=9)).save(sample)
  config.export.sample = str(sample)
  return config, workdir


@pytest.fixture(scope="module")
def trained(run):
  config, workdir = run
  return exporting.load_trained(config, workdir)


def _export(run, fmt, output, **overrides):
  config, workdir = run
  config = config.copy_and_resolve_references()
  config.export.format, config.export.output = fmt, str(output)
  for key, value in overrides.items():
    config.export[key] = value
  return exporting.export(config, workdir)


def _jax_logits(trained, x_nchw, *, sigmoid=False):
  forward = graph.inference_function(trained.model, trained.variables, mean=trained.mean, std=trained.std,
                                     sigmoid=sigmoid, layout="NCHW")
  return np.asarray(jax.jit(forward)(x_nchw))


def _batch(*images):
  return (np.stack(images)[:, None] / np.float32(255)).astype(np.float32)


def test_the_best_checkpoint_is_exported_by_default(run, trained):
  config, workdir = run
  assert trained.step == BEST_STEP and trained.checkpoint_dir.name == "checkpoints_best"
  assert trained.threshold == 0.42 and trained.halo == 16
  config = config.copy_and_resolve_references()
  config.export.checkpoint = "latest"
  assert exporting.load_trained(config, workdir).step == LATEST_STEP


def test_export_mode_through_main_writes_and_summarizes(run, tmp_path):
  from urisc_jax import main  # pylint: disable=g-import-not-at-top
  config, workdir = run
  config = config.copy_and_resolve_references()
  config.export.format, config.export.output = "torch", str(tmp_path / "weights.pt")
  summary = main.run(config, workdir, "export")
  assert summary["bytes"] == (tmp_path / "weights.pt").stat().st_size and summary["step"] == BEST_STEP
  tensors = torch_import.read_checkpoint(tmp_path / "weights.pt")  # torch.save's format, read without torch
  assert tensors["segmentation_head.0.bias"].shape == (1,)
  assert tensors["encoder.bn1.num_batches_tracked"].shape == () and summary["tensors"] == len(tensors)


def test_a_workdir_without_checkpoints_is_named(run, tmp_path):
  config = run[0].copy_and_resolve_references()
  with pytest.raises(FileNotFoundError, match="train first"):
    exporting.load_trained(config, tmp_path)


@pytest.fixture(scope="module")
def onnx_model(run, tmp_path_factory):
  path = tmp_path_factory.mktemp("onnx") / "model.onnx"
  summary = _export(run, "onnx", path)
  return path, summary


def test_onnx_matches_jax_on_synthetic_images_of_two_sizes(onnx_model, trained):
  path, summary = onnx_model
  assert summary["opset"] == onnx_graph.OPSET and summary["bytes"] == path.stat().st_size
  import onnx  # pylint: disable=g-import-not-at-top
  proto = onnx.load(str(path))
  dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
  assert dims == ["batch", 1, "height", "width"]
  assert {p.key: p.value for p in proto.metadata_props}["urisc_jax.step"] == str(BEST_STEP)
  for x in (_batch(_synthetic(96, 128, 1), _synthetic(96, 128, 2)), _batch(_synthetic(160, 64, 3))):
    _assert_close(onnx_graph.run(path, x), _jax_logits(trained, x))


def test_onnx_with_sigmoid_gives_probabilities(run, trained, tmp_path):
  summary = _export(run, "onnx", tmp_path / "probability.onnx", sigmoid=True)
  assert summary["output_tensor"].startswith("probability ") and summary["output"].endswith("probability.onnx")
  x = _batch(_synthetic(64, 64, 11))
  _assert_close(onnx_graph.run(tmp_path / "probability.onnx", x), _jax_logits(trained, x, sigmoid=True))


def test_onnx_matches_jax_on_a_real_isbi_slice(onnx_model, trained, shared_dir):
  slice_ = np.asarray(Image.open(shared_dir / "data" / "isbi2012" / "train" / "images" / "00.png").convert("L"))
  x = _batch(slice_)
  _assert_close(onnx_graph.run(onnx_model[0], x), _jax_logits(trained, x))


def test_stablehlo_module_serves_symbolic_batch_and_sizes(run, trained, tmp_path):
  summary = _export(run, "stablehlo", tmp_path / "model.stablehlo", sigmoid=True)
  assert set(summary["platforms"]) == {"cpu", "cuda", "tpu"}
  exported = stablehlo.load(tmp_path / "model.stablehlo")
  for x in (_batch(_synthetic(64, 96, 4)), _batch(*(_synthetic(128, 64, s) for s in (5, 6, 7)))):
    got = np.asarray(exported.call(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    _assert_close(got, _jax_logits(trained, x, sigmoid=True))


_spec = importlib.util.spec_from_file_location(
    "torch_reference", pathlib.Path(__file__).parent / "fixtures" / "models" / "torch_reference.py")


def test_torch_export_loads_strictly_into_the_torch_model_and_matches(run, trained, tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  torch_reference = importlib.util.module_from_spec(_spec)
  _spec.loader.exec_module(torch_reference)
  summary = _export(run, "torch", tmp_path / "model.safetensors")
  assert summary["layout"] == "segmentation_models_pytorch"
  config = run[0]
  reference = torch_reference.SegmentationModel("unet", config.model.encoder, in_channels=1, classes=1,
                                                width=config.model.width).eval()
  reference.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
  x = _batch(_synthetic(96, 64, 8))
  with torch.no_grad():
    got = reference(torch.from_numpy((x - trained.mean) / trained.std)).numpy()
  _assert_close(got, _jax_logits(trained, x))
  # The same tensors in torch.save's format, written without torch, read by torch's safe loader.
  _export(run, "torch", tmp_path / "model.pt")
  pth = torch.load(tmp_path / "model.pt", weights_only=True)
  safetensors = load_file(tmp_path / "model.safetensors")
  assert set(pth) == set(safetensors)
  assert all(torch.equal(pth[k], safetensors[k]) for k in pth)


def test_exported_programs_hold_plain_forms_only(trained):
  def trace():  # a new function each time: JAX caches a function's trace whatever context it was made in
    forward = graph.inference_function(trained.model, trained.variables, mean=trained.mean, std=trained.std)
    return str(jax.make_jaxpr(forward)(jax.ShapeDtypeStruct((1, 1, 64, 64), np.float32)))

  assert "platform_index" in trace()  # the normal trace chooses per backend
  with platforms.plain_forms():
    assert "platform_index" not in trace()
  with platforms.plain_forms(portable=True):
    jaxpr = trace()
  assert "platform_index" not in jaxpr and "reduce_window" not in jaxpr and "lhs_dilation=(2, 2)" not in jaxpr


def test_portable_forms_compute_the_same_function():
  x = np.random.default_rng(0).standard_normal((2, 12, 20, 3)).astype(np.float32)
  kernel = np.random.default_rng(1).standard_normal((4, 4, 3, 5)).astype(np.float32)
  _assert_close(layers.zero_inserted_conv_transpose2d(x, kernel, 2, 1),
                layers.dilated_conv_transpose2d(x, kernel, 2, 1))
  grouped = np.random.default_rng(2).standard_normal((16, 16, 1, 3)).astype(np.float32)
  _assert_close(layers.zero_inserted_conv_transpose2d(x, grouped, 8, 4, groups=3),
                layers.dilated_conv_transpose2d(x, grouped, 8, 4, groups=3))
  for window, padding in ((3, 1), (2, 0)):
    np.testing.assert_array_equal(layers.reshaped_max_pool2d(x, window, padding),
                                  jax.lax.reduce_window(x, -np.inf, jax.lax.max, (1, window, window, 1), (1, 2, 2, 1),
                                                        ((0, 0), (padding, padding), (padding, padding), (0, 0))))
  for factor in (2, 4, 8):
    _assert_close(layers.upsample_bilinear(x, factor), layers.resize_bilinear(x, 12 * factor, 20 * factor))


@pytest.mark.parametrize("name,overrides", [
    ("unet", {"encoder": "resnet50"}),
    ("linknet", {"encoder": "resnet18"}),
    ("casenet", {"encoder": "resnet152"}),
    ("casenet", {"encoder": "resnet18", "variant": "original", "num_classes": 2}),  # grouped deconvolutions
    ("plain_unet", {}),
])
def test_export_then_import_gives_identical_parameters(name, overrides):
  model = models.build(name, width=1 / 16, **overrides)
  abstract = models.abstract_variables(model, (1, 64, 64, 1))
  variables = models.random_variables(abstract, seed=1)
  variables = jax.tree.map(lambda v: v + np.random.default_rng(2).standard_normal(v.shape).astype(v.dtype) * 0.1,
                           variables)  # no two leaves alike, so a swapped key would show
  tensors = torch_state.state_dict(variables)
  loaded, info = torch_import.load_state_dict(abstract, tensors, strict=True)
  assert len(info.loaded) == len(jax.tree.leaves(abstract)) and not info.unexpected
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(variables), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=jax.tree_util.keystr(path))
  assert torch_state.layout(name) == ("segmentation_models_pytorch" if name in ("unet", "linknet") else "urisc_jax")


def test_smp_architecture_only_for_published_widths(trained):
  assert bioimageio_package.smp_architecture(trained) is None  # width 0.125: smp cannot build it
  wide = exporting.TrainedModel(**{**trained.__dict__, "model_config": {**trained.model_config, "width": 1.0,
                                                                       "encoder": "resnet50"}})
  assert bioimageio_package.smp_architecture(wide) == {
      "callable": "Unet", "import_from": "segmentation_models_pytorch",
      "kwargs": {"encoder_name": "resnet50", "encoder_weights": None, "in_channels": 1, "classes": 1}}


def test_bioimageio_package_validates_and_reproduces_its_test_tensors(run, trained, tmp_path):
  folder = tmp_path / "package"
  summary = _export(run, "bioimageio", folder)
  assert summary["validation"] in ("passed", "valid-format")
  assert {"rdf.yaml", "weights.onnx", "test_input.npy", "test_output.npy", "cover.png", "README.md"} <= set(
      summary["files"])
  import yaml  # pylint: disable=g-import-not-at-top
  rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
  assert rdf["cite"][0]["doi"] == "10.3389/fncom.2022.842760"
  assert [a.get("halo") for a in rdf["outputs"][0]["axes"][2:]] == [16, 16]
  assert rdf["inputs"][0]["preprocessing"][1]["kwargs"] == {"mean": trained.mean, "std": trained.std}
  test_input = np.load(folder / "test_input.npy")
  assert test_input.shape == (1, 1, 64, 64) and test_input.max() > 1  # raw gray values, as read
  # The package's own pipeline, by hand: preprocessing, the ONNX graph (no normalization inside), sigmoid.
  x = ((test_input / 255.0 - trained.mean) / trained.std).astype(np.float32)
  probability = 1 / (1 + np.exp(-onnx_graph.run(folder / "weights.onnx", x)))
  np.testing.assert_allclose(probability, np.load(folder / "test_output.npy"), atol=1e-4)
  core = pytest.importorskip("bioimageio.core")
  result = core.test_model(str(folder / "rdf.yaml"), weight_format="onnx")
  assert result.status == "passed", result.format() if hasattr(result, "format") else result
