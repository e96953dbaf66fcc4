"""Numerical equivalence with an independent PyTorch implementation (skipped when torch is not installed).

The torch reference (tests/fixtures/models/torch_reference.py) has segmentation_models_pytorch's state-dict names;
its random weights travel through torch.save -> torch_import.read_checkpoint -> load_state_dict into the Flax model.
"""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from urisc_jax import models
from urisc_jax.models import torch_import

torch = pytest.importorskip("torch")

_spec = importlib.util.spec_from_file_location(
    "torch_reference", pathlib.Path(__file__).parent / "fixtures" / "models" / "torch_reference.py")
torch_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_reference)


def _relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def _torch_model(kind, encoder, width, classes, seed):
  torch.manual_seed(seed)
  reference = torch_reference.SegmentationModel(kind, encoder, in_channels=1, classes=classes, width=width)
  torch_reference.randomize_batchnorm(reference, torch.Generator().manual_seed(seed))
  return reference


@pytest.mark.parametrize("kind,encoder,width,classes", [
    ("unet", "resnet50", 1.0, 1),
    ("linknet", "resnet18", 1.0, 2),
])
def test_eval_logits_match_torch(tmp_path, kind, encoder, width, classes):
  reference = _torch_model(kind, encoder, width, classes, seed=0).eval()
  path = tmp_path / "weights.pth"
  torch.save(reference.state_dict(), path)
  x = torch.randn(2, 1, 64, 96, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = reference(x).permute(0, 2, 3, 1).numpy()

  model = models.build(kind, encoder=encoder, width=width, num_classes=classes)
  abstract = models.abstract_variables(model, (2, 64, 96, 1))
  variables, info = torch_import.load_state_dict(abstract, torch_import.read_checkpoint(path), source=str(path))
  assert len(info.loaded) == len(jax.tree.leaves(abstract))
  assert models.count_params(variables) == sum(p.numel() for p in reference.parameters())
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x.permute(0, 2, 3, 1).numpy())
  assert _relative_error(got, want) < 1e-4


def test_train_mode_logits_and_running_statistics_match_torch(tmp_path):
  reference = _torch_model("linknet", "resnet18", 0.25, 1, seed=3).train()
  path = tmp_path / "weights.pth"
  torch.save(reference.state_dict(), path)
  x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(4))
  want = reference(x).detach().permute(0, 2, 3, 1).numpy()
  model = models.build("linknet", encoder="resnet18", width=0.25)
  abstract = models.abstract_variables(model, (2, 64, 64, 1))
  variables, _ = torch_import.load_state_dict(abstract, torch_import.read_checkpoint(path))
  got, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x.permute(0, 2, 3, 1).numpy())
  assert _relative_error(got, want) < 1e-4
  # torch updated its running statistics in that forward pass (unbiased variance); so did the Flax BatchNorm.
  stats = updates["batch_stats"]["decoder"]["block0"]["deconv_bn"]
  bn = reference.decoder.blocks[0].block[1][1]
  np.testing.assert_allclose(stats["mean"], bn.running_mean.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["var"], bn.running_var.numpy(), rtol=1e-4, atol=1e-5)


def test_reader_rebuilds_views_and_dtypes(tmp_path):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  tensors = {
      "transposed": base.t(),                      # non-contiguous
      "offset_view": base[1:, 2:5],                # storage offset, shares storage with `base`
      "base": base,
      "bf16": torch.linspace(-2, 2, 7, dtype=torch.bfloat16),
      "half": torch.linspace(-2, 2, 5, dtype=torch.float16),
      "int64": torch.tensor([1, -2, 3], dtype=torch.int64),
      "bool": torch.tensor([True, False]),
      "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 3),
      "parameter": torch.nn.Parameter(torch.ones(2, 2)),
  }
  path = tmp_path / "tensors.pth"
  torch.save({"tensors": tensors, "meta": {"epoch": 7, "norms": [0.5, 0.25], "name": "x"}}, path)
  loaded = torch_import.read_checkpoint(path)
  assert loaded["meta"] == {"epoch": 7, "norms": [0.5, 0.25], "name": "x"}
  for name, tensor in tensors.items():
    want = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
    got = loaded["tensors"][name]
    assert got.shape == want.shape, name
    np.testing.assert_array_equal(np.asarray(got, want.dtype), want, err_msg=name)
