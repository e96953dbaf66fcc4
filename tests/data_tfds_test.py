"""The `urisc` and `isbi2012` TFDS builders: records equal the files they came from, read through tfds.data_source
without TensorFlow, and feed the crop pipeline through the decode-once cache."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tifffile

from urisc_jax.data import augment, pipeline, prepare, sources, synthetic, tfds_builders


def _records(source):
  return [source[i] for i in range(len(source))]


def test_urisc_builder_on_a_synthetic_release(tmp_path, monkeypatch):
  release = tmp_path / "release"
  synthetic.write_release(release, num_train=2, num_val=1, num_test=1, height=72, width=64, seed=5)
  tfds_builders.build("urisc/track1", manual_dir=release, data_dir=tmp_path / "tfds")
  for split in ("train", "val", "test"):
    source = tfds.data_source("urisc/track1", data_dir=tmp_path / "tfds", split=split)
    pairs = sources.urisc_pairs(release, split=split)
    records = _records(source)
    assert [r["name"].decode() for r in records] == [p.name for p in pairs]
    for record, pair in zip(records, pairs):
      image, mask = sources.load_pair(pair)
      np.testing.assert_array_equal(record["image"], image)
      np.testing.assert_array_equal(record["label"], mask.astype(np.uint8))
      assert record["has_label"]

  source = tfds.data_source("urisc/track1", data_dir=tmp_path / "tfds", split="train")
  images = tfds_builders.prepare_records(source, tmp_path / "cache", progress=False)
  assert [im.name for im in images] == ["train_000", "train_001"]
  np.testing.assert_array_equal(images[1].image(), source[1]["image"])
  # A re-run finds its entries from the serialized records: nothing is decoded again.
  monkeypatch.setattr(tfds_builders, "_arrays", lambda record: pytest.fail("decoded again"))
  assert tfds_builders.prepare_records(source, tmp_path / "cache", progress=False) == images
  # The pipeline gives the same batches from the records as from the release's files.
  from_files = prepare.prepare_pairs(sources.urisc_pairs(release), tmp_path / "cache", progress=False)
  batches = [list(pipeline.iterator(pipeline.train_dataset(
      pipeline.CropExamples(prepared, crop_size=32, seed=0, augment=augment.AugmentConfig.paper()), num_steps=3,
      global_batch_size=2))) for prepared in (images, from_files)]
  for a, b in zip(*batches):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_urisc_builder_needs_the_release(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "readme.txt").write_text("not the release")
  with pytest.raises(sources.MissingDataError, match="imgs"):
    tfds_builders.build("urisc/track2", manual_dir=tmp_path / "manual", data_dir=tmp_path / "tfds")


def test_isbi_builder_reads_stacks_like_slices(tmp_path):
  rng = np.random.default_rng(0)
  volume = rng.integers(0, 256, (3, 32, 40), dtype=np.uint8)
  labels = np.full((3, 32, 40), 255, np.uint8)
  labels[:, ::5] = 0
  tifffile.imwrite(tmp_path / "train-volume.tif", volume)
  tifffile.imwrite(tmp_path / "train-labels.tif", labels)
  tifffile.imwrite(tmp_path / "test-volume.tif", volume[:2])
  tfds_builders.build("isbi2012", manual_dir=tmp_path, data_dir=tmp_path / "tfds")
  train = _records(tfds.data_source("isbi2012", data_dir=tmp_path / "tfds", split="train"))
  assert [r["name"].decode() for r in train] == ["00", "01", "02"]
  np.testing.assert_array_equal(np.stack([r["image"] for r in train]), volume)
  np.testing.assert_array_equal(np.stack([r["label"] for r in train]), (labels == 0).astype(np.uint8))
  test = _records(tfds.data_source("isbi2012", data_dir=tmp_path / "tfds", split="test"))
  assert len(test) == 2 and not any(r["has_label"] for r in test) and test[0]["label"].shape == (0, 0)
  images = tfds_builders.prepare_records(tfds.data_source("isbi2012", data_dir=tmp_path / "tfds", split="test"),
                                         tmp_path / "cache", progress=False)
  assert all(im.label_path is None for im in images)


def test_isbi_builder_on_the_real_slices(shared_dir, tmp_path):
  root = shared_dir / "data" / "isbi2012"
  tfds_builders.build("isbi2012", manual_dir=root, data_dir=tmp_path / "tfds")
  source = tfds.data_source("isbi2012", data_dir=tmp_path / "tfds", split="train")
  pairs = sources.isbi_pairs(root)
  assert len(source) == len(pairs) == 30
  for index in (0, 17, 29):
    image, mask = sources.load_pair(pairs[index])
    record = source[index]
    assert record["name"].decode() == pairs[index].name
    np.testing.assert_array_equal(record["image"], image)
    np.testing.assert_array_equal(record["label"], mask.astype(np.uint8))
  fraction = np.mean([source[i]["label"].mean() for i in range(30)])
  assert fraction == pytest.approx(0.2196, abs=5e-4)  # README.txt of the data folder
  assert len(tfds.data_source("isbi2012", data_dir=tmp_path / "tfds", split="test")) == 30
  images = tfds_builders.prepare_records(source, tmp_path / "cache", progress=False)
  assert images[3].shape == (512, 512) and isinstance(images[3], prepare.PreparedImage)
