"""The paper's patch split: validation scores the held-out patches of the training images (never a training patch),
each on its window of the whole image's probability map, and chooses the threshold there."""

import types

import numpy as np
import pytest

from configs import tiny
from urisc_jax import predict, train
from urisc_jax.data import dataset, pipeline
from urisc_jax.evaluation import f1 as official


def _config():
  config = tiny.get_config()
  config.data.val_split = ""
  config.data.split.mode = "patch"
  config.data.split.stride = 32
  return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("patch_split")
  config = _config()
  return config, dataset.prepared_split(config.data, workdir, "train", progress=False)


def _probability(image: np.ndarray, label: np.ndarray) -> np.ndarray:
  """A fixed stand-in for the network: the label blurred toward the image's darkness, deterministic."""
  rng = np.random.default_rng(int(image.sum()) % 1000)
  return np.clip(0.6 * label + 0.4 * (1 - image / 255.0) + rng.normal(0, 0.1, image.shape), 0, 1)


def test_validation_scores_the_held_out_patches_and_chooses_the_threshold_there(prepared, monkeypatch):
  config, images = prepared
  maps = {id(im): _probability(np.asarray(im.image(), np.float64), np.asarray(im.label(), np.float64))
          for im in images}
  predicted = []

  def fake_probabilities(forward, image, predict_config):
    predicted.append(image.shape)
    [key] = [k for k, im in zip(maps, images) if np.array_equal(np.asarray(im.image()), image)]
    return maps[key]

  monkeypatch.setattr(predict, "probabilities", fake_probabilities)
  validation = train.validation_set(config, images, [])
  assert isinstance(validation, train.PatchValidation)
  train_patches = pipeline.train_patches(config.data, images, seed=config.seed)
  np.testing.assert_array_equal(validation.patches, pipeline.val_patches(config.data, images, seed=config.seed))
  assert not {tuple(p) for p in train_patches.tolist()} & {tuple(p) for p in validation.patches.tolist()}
  assert len(validation.patches) == round(2 / 7 * (len(train_patches) + len(validation.patches)))

  state = types.SimpleNamespace(params={}, batch_stats={})
  chosen = train.validate(config, (lambda variables: None, None), state, validation)
  assert len(predicted) == len(np.unique(validation.patches[:, 0]))  # each image predicted once, whole
  assert chosen["val_patches"] == len(validation.patches)

  # The independent reference: official F1 (no format check) of every validation patch's window, averaged.
  size = config.data.crop_size
  reference = []
  for threshold in predict.THRESHOLD_CANDIDATES:
    scores = []
    for index, row, col in validation.patches:
      window = np.s_[row:row + size, col:col + size]
      probability = maps[id(images[index])][window]
      gt = predict.ground_truth(images[index], config)[window]
      membrane, weight = probability >= threshold, 255 - gt.astype(np.int64)  # official: GT gray levels weigh R
      scores.append(official.precision_recall_f1(int(np.count_nonzero(membrane & (weight != 0))),
                                                 int(np.count_nonzero(membrane)), int(weight[membrane].sum()),
                                                 int(weight.sum()))[0])
    reference.append(np.mean(scores))
  best = int(np.argmax(reference))
  assert chosen["threshold"] == predict.THRESHOLD_CANDIDATES[best]
  np.testing.assert_allclose(chosen["val_f1"], reference[best], rtol=1e-9)


def test_patch_mode_refuses_a_validation_split_it_would_not_use(tmp_path):
  config = _config()
  config.data.val_split = "val"
  with pytest.raises(ValueError, match="split.mode='patch' validates on patches"):
    dataset.prepared_split(config.data, tmp_path, "train", progress=False)
