"""Tests of the torch checkpoint reader (no torch needed): refusal of code, the CEM500K fixture, key mapping."""

import os
import pathlib
import pickle
import zipfile

import jax
import numpy as np
import pytest

from urisc_jax import models
from urisc_jax.models import resnet
from urisc_jax.models import torch_import

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "models"
CHECKPOINT = FIXTURES / "cem500k_mocov2_tiny.pth.tar"
WIDTH = 1 / 32  # the fixture's ResNet-50 width


class _RunsShell:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _WritesFile:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


def _zip_with_pickle(path, payload):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
    archive.writestr("archive/version", "3\n")
  return path


@pytest.mark.parametrize("payload_cls,global_name", [(_RunsShell, "posix.system"),
                                                     (_WritesFile, "builtins.getattr")])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, payload_cls, global_name):
  marker = tmp_path / "was_run"
  evil = _zip_with_pickle(tmp_path / "evil.pth", {"state_dict": {"w": payload_cls(marker)}})
  with pytest.raises(torch_import.UnsafeCheckpointError, match=f"refusing to load the global {global_name}"):
    torch_import.read_checkpoint(evil)
  assert not marker.exists()
  # Sanity check of the test itself: the same pickle does run code when loaded without the allowlist.
  with zipfile.ZipFile(evil) as archive:
    pickle.loads(archive.read("archive/data.pkl"))
  assert marker.exists()


def test_non_zip_pickles_are_not_unpickled(tmp_path):
  marker = tmp_path / "was_run"
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(pickle.dumps(_RunsShell(marker)))
  with pytest.raises(torch_import.CheckpointError, match="not a torch zip checkpoint"):
    torch_import.read_checkpoint(legacy)
  assert not marker.exists()
  with pytest.raises(FileNotFoundError, match="does not exist"):
    torch_import.read_checkpoint(tmp_path / "absent.pth")


def test_reads_the_cem500k_layout():
  checkpoint = torch_import.read_checkpoint(CHECKPOINT)
  assert set(checkpoint) == {"epoch", "arch", "state_dict", "optimizer", "norms"}
  state = checkpoint["state_dict"]
  assert state["module.encoder_q.conv1.weight"].shape == (2, 1, 7, 7)
  assert state["module.encoder_q.conv1.weight"].dtype == np.float32
  assert state["module.queue_ptr"].dtype == np.int64
  # The key encoder was saved as a copy of the query encoder: the same values, separately stored.
  np.testing.assert_array_equal(state["module.encoder_k.layer4.2.bn3.running_var"],
                                state["module.encoder_q.layer4.2.bn3.running_var"])
  assert checkpoint["optimizer"]["param_groups"][0]["momentum"] == 0.9


@pytest.fixture(scope="module")
def encoder_and_variables():
  encoder = resnet.ResNet("resnet50", in_channels=1, width=WIDTH)
  x = jax.ShapeDtypeStruct((2, 64, 64, 1), np.float32)
  variables = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), x)
  return encoder, {"encoder": variables}


def _encoder_variables(variables):
  return {c: variables[c]["encoder"] for c in ("params", "batch_stats")}


def _features(encoder, variables, x):
  return jax.jit(lambda v, x: encoder.apply(v, x, train=False))(variables, x)


@pytest.mark.numerics
def test_cem500k_fixture_reproduces_torch_features(encoder_and_variables):
  encoder, abstract = encoder_and_variables
  wrapped = {c: {"encoder": abstract["encoder"][c]} for c in ("params", "batch_stats")}
  variables, info = torch_import.load_encoder_weights(wrapped, CHECKPOINT)
  assert not info.missing and not info.unexpected and not info.mismatched
  assert len(info.loaded) == len(jax.tree.leaves(wrapped))
  assert info.normalization == models.CEM500K_NORMALIZATION
  assert info.metadata == {"epoch": 200, "arch": "resnet50"}
  assert "module.queue" in info.ignored and "module.queue_ptr" in info.ignored
  assert "fc.2.weight" in info.ignored and "module.encoder_k.conv1.weight" in info.ignored
  expected = np.load(FIXTURES / "cem500k_mocov2_tiny_expected.npz")
  features = _features(encoder, _encoder_variables(variables), info.normalization(expected["x"]))
  for i, feature in enumerate(features):
    want = expected[f"feature{i}"]
    assert np.linalg.norm(feature - want) / np.linalg.norm(want) < 1e-5, f"feature{i}"


def test_rgb_first_conv_is_summed_for_gray_models(encoder_and_variables):
  encoder, abstract = encoder_and_variables
  wrapped = {c: {"encoder": abstract["encoder"][c]} for c in ("params", "batch_stats")}
  state, _ = torch_import.encoder_state_dict(torch_import.read_checkpoint(CHECKPOINT))
  gray = state["conv1.weight"]
  state["conv1.weight"] = np.concatenate([0.2 * gray, 0.3 * gray, 0.5 * gray], axis=1)  # [64, 3, 7, 7]
  variables, info = torch_import.load_state_dict(wrapped, state, module_key=torch_import.encoder_module_key,
                                                 scope=("encoder",))
  assert info.notes == ["conv1.weight: summed its RGB kernels into one input channel"]
  np.testing.assert_allclose(variables["params"]["encoder"]["conv1"]["kernel"],
                             gray.transpose(2, 3, 1, 0), rtol=1e-6)


def test_shape_and_name_problems_are_reported_by_name():
  model = models.build("unet", encoder="resnet50", width=1 / 16)  # wider than the checkpoint
  abstract = models.abstract_variables(model, (1, 64, 64, 1))
  mismatch = r"conv1.weight: checkpoint \(2, 1, 7, 7\) vs model \(7, 7, 1, 4\)"
  with pytest.raises(torch_import.CheckpointError, match=mismatch):
    torch_import.load_encoder_weights(abstract, CHECKPOINT)
  model = models.build("unet", encoder="resnet18", width=WIDTH)  # other depth
  abstract = models.abstract_variables(model, (1, 64, 64, 1))
  with pytest.raises(torch_import.CheckpointError, match=r"unexpected: .*layer1.0.conv3.weight"):
    torch_import.load_encoder_weights(abstract, CHECKPOINT)
  _, info = torch_import.load_encoder_weights(abstract, CHECKPOINT, strict=False)
  assert info.mismatched and info.unexpected and not info.missing


def test_loaded_unet_encoder_keeps_decoder_and_runs():
  model = models.build("unet", encoder="resnet50", width=WIDTH)
  # Constant stand-ins for initialized variables: the test is about which leaves change.
  variables = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), models.abstract_variables(model, (1, 64, 64, 1)))
  loaded, info = torch_import.load_encoder_weights(variables, CHECKPOINT)
  assert info.loaded and all(name.split("/")[1] == "encoder" for name in info.loaded)
  np.testing.assert_array_equal(loaded["params"]["decoder"]["block0"]["conv1"]["conv"]["kernel"],
                                variables["params"]["decoder"]["block0"]["conv1"]["conv"]["kernel"])
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(loaded, np.zeros((1, 64, 64, 1), np.float32))
  assert logits.shape == (1, 64, 64, 1) and np.isfinite(np.asarray(logits)).all()


def test_key_names():
  assert torch_import.encoder_module_key(("layer1", "block0", "downsample_conv")) == "layer1.0.downsample.0"
  assert torch_import.encoder_module_key(("stem_bn3",)) == "bn1"
  assert torch_import.smp_module_key(("encoder", "layer3", "block5", "bn2")) == "encoder.layer3.5.bn2"
  assert torch_import.smp_module_key(("decoder", "block2", "conv1", "bn")) == "decoder.blocks.2.conv1.1"
  assert torch_import.smp_module_key(("decoder", "block4", "deconv")) == "decoder.blocks.4.block.1.0"
  assert torch_import.smp_module_key(("head",)) == "segmentation_head.0"
