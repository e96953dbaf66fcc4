"""Training from chunked volumes: sections of a TensorStore volume give the same crops, labels and Grain pipeline
(deterministic, resumable from its iterator state) as the same images decoded into the .npy cache."""

import numpy as np
import pytest
import tensorstore as ts

from configs import default
from urisc_jax.data import dataset, pipeline
from urisc_jax.data.prepare import PreparedImage
from urisc_jax.data.windows import NpyWindows
from urisc_jax.volumes import VolumeError

SHAPE = (2, 200, 230)


def _write(path, data):
  store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
                   "metadata": {"shape": list(data.shape), "chunks": [1, 64, 64], "dtype": "|u1"}},
                  create=True).result()
  store.write(data).result()


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
  """(config.data reading train/val volumes, images [Z, H, W], membrane masks [Z, H, W], the folder)."""
  root = tmp_path_factory.mktemp("volumes")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, SHAPE, dtype=np.uint8)
  masks = rng.random(SHAPE) < 0.1
  _write(root / "train.zarr", images)
  _write(root / "train_labels.zarr", np.where(masks, 0, 255).astype(np.uint8))  # black = membrane
  _write(root / "val.zarr", images[:1])
  _write(root / "val_labels.zarr", np.where(masks[:1], 0, 255).astype(np.uint8))
  config = default.get_config()
  config.data.source = "tensorstore"
  for split in ("train", "val"):
    config.data.tensorstore[split].image = str(root / f"{split}.zarr")
    config.data.tensorstore[split].label = str(root / f"{split}_labels.zarr")
  config.data.test_split = ""
  return config.data, images, masks, root


def _npy_images(images, masks, root) -> list[PreparedImage]:
  """The same sections as decoded cache entries: the reference implementation of the crops."""
  prepared = []
  for z in range(len(images)):
    np.save(root / f"image{z}.npy", images[z])
    np.save(root / f"label{z}.npy", masks[z].astype(np.uint8))
    prepared.append(PreparedImage(name=f"s{z}", image_path=str(root / f"image{z}.npy"),
                                  label_path=str(root / f"label{z}.npy"), shape=images.shape[1:],
                                  source_image=f"s{z}", source_label=f"l{z}"))
  return prepared


def test_sections_are_the_images_of_a_split(volumes, tmp_path):
  data_config, images, masks, _ = volumes
  train = dataset.prepared_split(data_config, tmp_path, "train")
  assert [im.name for im in train] == ["train_0000", "train_0001"] and train[1].shape == SHAPE[1:]
  np.testing.assert_array_equal(train[1].image(), images[1])
  np.testing.assert_array_equal(train[1].label(), masks[1])
  np.testing.assert_array_equal(train[0].official_label(), np.where(masks[0], 0, 255))
  assert len(dataset.prepared_split(data_config, tmp_path, "val")) == 1
  assert dataset.prepared_split(data_config, tmp_path, "") == []


def test_augmented_crops_equal_those_of_the_decoded_cache(volumes, tmp_path):
  data_config, images, masks, _ = volumes
  sections = dataset.prepared_split(data_config, tmp_path, "train")
  reference = _npy_images(images, masks, tmp_path)
  kwargs = dict(crop_size=64, seed=3, augment=dict(data_config.augment))
  ours, theirs = pipeline.CropExamples(sections, **kwargs), pipeline.CropExamples(reference, **kwargs)
  for index in range(24):
    a, b = ours(index), theirs(index)
    np.testing.assert_array_equal(a["image"], b["image"], err_msg=f"example {index}")
    np.testing.assert_array_equal(a["label"], b["label"], err_msg=f"example {index}")
  # Windows that leave the section mirror it as the cache's reader does.
  window, npy = sections[0].windows()[0], NpyWindows(reference[0].image_path)
  np.testing.assert_array_equal(window.read(-5, 200, 40, 50), npy.read(-5, 200, 40, 50))


def test_the_grain_pipeline_resumes_from_its_state(volumes, tmp_path):
  data_config, _, _, _ = volumes
  sections = dataset.prepared_split(data_config, tmp_path, "train")
  examples = pipeline.CropExamples(sections, crop_size=64, seed=0, augment=dict(data_config.augment))
  data = pipeline.train_dataset(examples, num_steps=4, global_batch_size=2)
  first = pipeline.iterator(data)
  next(first), next(first)
  state = first.get_state()
  expected = next(first)
  resumed = pipeline.iterator(data)
  resumed.set_state(state)
  got = next(resumed)
  np.testing.assert_array_equal(got["image"], expected["image"])
  np.testing.assert_array_equal(got["label"], expected["label"])
  assert got["image"].shape == (2, 64, 64, 1)


def test_a_label_volume_of_another_shape_is_refused(volumes, tmp_path):
  data_config, _, _, root = volumes
  data_config = data_config.copy_and_resolve_references()
  data_config.tensorstore.train.label = str(root / "val_labels.zarr")
  with pytest.raises(VolumeError, match="must match"):
    dataset.prepared_split(data_config, tmp_path, "train")
