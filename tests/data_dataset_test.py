"""config.data -> prepared splits for every source: ISBI stacks and slice folders, generic folders and TFDS records
come out alike (names, pixels, labels, the official ground truth), splits never share images, and the by-image
validation holdout is disjoint, complete and seeded."""

import re

import numpy as np
import pytest
import tifffile
from PIL import Image

from configs import default
from urisc_jax.data import dataset, pipeline, sources
from urisc_jax.evaluation import f1 as official


def _volume(depth=6, shape=(40, 36), seed=0):
  """An ISBI-like volume with labels: black membranes on white, a different label on every slice."""
  rng = np.random.default_rng(seed)
  volume = rng.integers(0, 256, (depth, *shape), dtype=np.uint8)
  labels = np.full((depth, *shape), 255, np.uint8)
  for k in range(depth):
    labels[k, k::9] = 0
    labels[k, :, ::11] = 0
  return volume, labels


def _stacks(root, volume, labels):
  root.mkdir(parents=True, exist_ok=True)
  tifffile.imwrite(root / "train-volume.tif", volume)
  with tifffile.TiffWriter(root / "train-labels.tif") as writer:  # one page per slice, like the challenge's files
    for page in labels:
      writer.write(page, contiguous=False)
  tifffile.imwrite(root / "test-volume.tif", volume[:2])
  return root


def _data_config(source, root="", **overrides):
  data = default.get_config().data
  data.source = source
  data.root = str(root)
  for key, value in overrides.items():
    target = data
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return data


def _splits(data, workdir):
  return {role: dataset.prepared_split(data, workdir, data[f"{role}_split"], progress=False)
          for role in ("train", "val", "test")}


def _names(images):
  return [im.name for im in images]


def test_slice_selection_syntax():
  assert dataset.parse_slices("0-3, 7,9-10") == ("train", [0, 1, 2, 3, 7, 9, 10])
  assert dataset.parse_slices("") == ("train", [])
  assert dataset.parse_slices("  ") == ("train", [])
  assert dataset.parse_slices("5") == ("train", [5])
  assert dataset.parse_slices("test:0-2") == ("test", [0, 1, 2])
  assert dataset.parse_slices("train:4,2") == ("train", [4, 2])
  for text, message in (("9-3", "runs backwards; write '3-9'"), ("1-", "'1-' is not a slice index"),
                        ("-2", "'-2' is not a slice index"), ("a", "'a' is not"), ("0-4,3", "slice 3 twice"),
                        ("1,,2", "'' is not"), ("0..4", "'0..4' is not"), ("val:1", "'val:1' is not")):
    with pytest.raises(ValueError, match=f"config.data.isbi.train='{re.escape(text)}'.*{re.escape(message)}"):
      dataset.parse_slices(text, key="config.data.isbi.train")
  with pytest.raises(ValueError, match="must be a string"):
    dataset.parse_slices(3, key="config.data.isbi.train")


def test_isbi_source_on_a_tiff_stack(tmp_path):
  volume, labels = _volume()
  data = _data_config("isbi", _stacks(tmp_path / "isbi", volume, labels), **{"isbi.train": "0-3", "isbi.val": "",
                                                                               "isbi.test": "4,5"})
  split = _splits(data, tmp_path / "run")
  assert _names(split["train"]) == ["00", "01", "02", "03"] and split["val"] == []
  assert _names(split["test"]) == ["04", "05"]
  for k, image in zip((0, 1, 2, 3, 4, 5), split["train"] + split["test"]):
    assert image.source_page == k
    np.testing.assert_array_equal(image.image(), volume[k])
    np.testing.assert_array_equal(image.label(), labels[k] == 0)
    np.testing.assert_array_equal(image.official_label(), labels[k])
  # Training reads stack slices like any other prepared image.
  batch = pipeline.CropExamples(split["train"], crop_size=16, seed=0)(0)
  assert batch["image"].shape == (16, 16, 1) and set(np.unique(batch["label"])) <= {0, 1}
  # The unlabelled test volume.
  data.isbi.test = "test:0-1"
  test = dataset.prepared_split(data, tmp_path / "run", "test", progress=False)
  assert _names(test) == ["00", "01"] and all(im.label_path is None for im in test)
  np.testing.assert_array_equal(test[1].image(), volume[1])


def test_images_mode_holds_out_training_images(tmp_path):
  volume, labels = _volume()
  root = _stacks(tmp_path / "isbi", volume, labels)
  data = _data_config("isbi", root, **{"isbi.train": "0-4", "isbi.val": "", "isbi.test": "5", "split.mode": "images",
                                       "split.val_fraction": 0.4})
  split = _splits(data, tmp_path / "run")
  train, val = _names(split["train"]), _names(split["val"])
  assert len(val) == 2 and len(train) == 3
  assert not set(train) & set(val) and sorted(train + val) == ["00", "01", "02", "03", "04"]
  assert _names(split["test"]) == ["05"]
  assert _names(_splits(data, tmp_path / "run")["val"]) == val  # the same seed holds out the same images
  held_out = set()
  for seed in range(6):
    data.split.seed = seed
    held_out.add(tuple(_names(dataset.prepared_split(data, tmp_path / "run", "val", progress=False))))
  assert len(held_out) > 1
  data.isbi.val = "4"
  with pytest.raises(ValueError, match=r"validation split also names images.*config.data.isbi.val=''"):
    dataset.prepared_split(data, tmp_path / "run", "train", progress=False)
  # Any source: the release's val folder must be emptied, and the holdout comes from the train folder.
  synthetic = _data_config("synthetic", tmp_path / "release", **{"split.mode": "images", "split.val_fraction": 0.5,
                                                                  "synthetic.num_train": 2, "synthetic.height": 48,
                                                                  "synthetic.width": 40})
  with pytest.raises(ValueError, match=r"config.data.val_split=''"):
    dataset.prepared_split(synthetic, tmp_path / "run", "train", progress=False)
  synthetic.val_split = ""
  split = _splits(synthetic, tmp_path / "run")
  assert sorted(_names(split["train"]) + _names(split["val"])) == ["train_000", "train_001"]
  assert len(split["val"]) == 1
  synthetic.test_split = ""
  with pytest.raises(ValueError, match="also config.data.test_split"):
    dataset.prepared_split(synthetic, tmp_path / "run", "train", progress=False)


def test_splits_that_share_images_or_bad_keys_raise(tmp_path):
  volume, labels = _volume()
  root = _stacks(tmp_path / "isbi", volume, labels)
  data = _data_config("isbi", root, **{"isbi.train": "0-3", "isbi.val": "", "isbi.test": "3-5"})
  with pytest.raises(ValueError, match=r"config.data.isbi.train='0-3'.*config.data.isbi.test='3-5'.*train slice 3"):
    dataset.prepared_split(data, tmp_path / "run", "train", progress=False)
  data.isbi.test = "4-x"
  with pytest.raises(ValueError, match=r"config.data.isbi.test='4-x': '4-x' is not a slice index"):
    dataset.prepared_split(data, tmp_path / "run", "train", progress=False)
  data.isbi.test = "4-9"
  with pytest.raises(ValueError, match=r"config.data.isbi.test='4-9' names slice 9.*holds 6 slices"):
    dataset.prepared_split(data, tmp_path / "run", "test", progress=False)
  data.isbi.test = "4-5"
  data.train_split = "training"
  with pytest.raises(ValueError, match=r"config.data.isbi.training, which does not exist"):
    dataset.prepared_split(data, tmp_path / "run", "training", progress=False)
  data.train_split = "train"
  data.split.mode = "pixels"
  with pytest.raises(ValueError, match="split.mode"):
    dataset.prepared_split(data, tmp_path / "run", "train", progress=False)
  with pytest.raises(ValueError, match=r"needs the ISBI 2012 folder.*--config.data.root"):
    dataset.prepared_split(_data_config("isbi"), tmp_path / "run", "train", progress=False)
  with pytest.raises(ValueError, match="Unknown config.data.source 'kaggle'"):
    dataset.prepared_split(_data_config("kaggle", root), tmp_path / "run", "train", progress=False)


def test_isbi_source_on_the_real_data_in_both_layouts(shared_dir, tmp_path):
  root = shared_dir / "data" / "isbi2012"
  data = _data_config("isbi", root)  # the defaults: train 0-19, no validation, test 20-29
  split = _splits(data, tmp_path / "run")
  assert _names(split["train"]) == [f"{k:02d}" for k in range(20)] and split["val"] == []
  assert _names(split["test"]) == [f"{k}" for k in range(20, 30)]
  for image in split["test"][::3]:
    np.testing.assert_array_equal(image.image(), sources.read_image(image.source_image))
    np.testing.assert_array_equal(image.official_label(), official.read_gray8(image.source_label))
  # The challenge's stacks, rebuilt from the slices, give the same splits pixel for pixel.
  pairs = sources.isbi_pairs(root)
  volume = np.stack([sources.read_image(p.image_path) for p in pairs])
  labels = np.stack([official.read_gray8(p.label_path) for p in pairs])
  data.root = str(_stacks(tmp_path / "stacks", volume, labels))
  from_stacks = _splits(data, tmp_path / "run")
  for role in ("train", "test"):
    assert _names(from_stacks[role]) == _names(split[role])
    for a, b in zip(from_stacks[role], split[role]):
      np.testing.assert_array_equal(a.image(), b.image())
      np.testing.assert_array_equal(a.official_label(), b.official_label())
  membrane = np.mean([im.label().mean() for im in from_stacks["train"] + from_stacks["test"]])
  assert membrane == pytest.approx(0.2196, abs=5e-4)  # README.txt of the data folder


def test_folders_source(tmp_path):
  volume, labels = _volume(depth=4)
  for k in range(4):
    split = "train" if k < 3 else "test"
    _save(tmp_path / "images" / split / f"{k}.png", volume[k])
    _save(tmp_path / "labels" / split / f"{k}.tiff", labels[k])
  data = _data_config("folders", **{"folders.train_images": str(tmp_path / "images" / "train"),
                                    "folders.train_labels": str(tmp_path / "labels" / "train"),
                                    "folders.test_images": str(tmp_path / "images" / "test")})
  split = _splits(data, tmp_path / "run")
  assert _names(split["train"]) == ["0", "1", "2"] and split["val"] == [] and _names(split["test"]) == ["3"]
  np.testing.assert_array_equal(split["train"][2].image(), volume[2])
  np.testing.assert_array_equal(split["train"][2].official_label(), labels[2])
  assert split["test"][0].label_path is None  # no test labels given
  data.folders.test_images = str(tmp_path / "images" / "train" / ".")
  with pytest.raises(ValueError, match="folders.train_images=.*folders.test_images=.*both select folder"):
    dataset.prepared_split(data, tmp_path / "run", "train", progress=False)


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def test_tfds_source_gives_the_stack_slices(tmp_path):
  volume, labels = _volume()
  root = _stacks(tmp_path / "isbi", volume, labels)
  data = _data_config("tfds", root, train_split="train[:4]", val_split="", test_split="train[4:]",
                      **{"tfds.name": "isbi2012"})
  split = _splits(data, tmp_path / "run")  # builds the dataset into workdir/tfds first
  assert (tmp_path / "run" / "tfds" / "isbi2012").is_dir()
  assert _names(split["train"]) == ["00", "01", "02", "03"] and _names(split["test"]) == ["04", "05"]
  stacks = _splits(_data_config("isbi", root, **{"isbi.train": "0-3", "isbi.val": "", "isbi.test": "4-5"}),
                   tmp_path / "run")
  for a, b in zip(split["train"] + split["test"], stacks["train"] + stacks["test"]):
    np.testing.assert_array_equal(a.image(), b.image())
    np.testing.assert_array_equal(a.label(), b.label())
    np.testing.assert_array_equal(a.official_label(), b.official_label())
  data.test_split = "validation"
  with pytest.raises(ValueError, match=r"cannot give split 'validation'.*Should be one of \['train', 'test'\]"):
    dataset.prepared_split(data, tmp_path / "run", "validation", progress=False)
  data.root = ""
  data.tfds.data_dir = str(tmp_path / "elsewhere")
  with pytest.raises(sources.MissingDataError, match="is not built in .*elsewhere.*--config.data.root"):
    dataset.prepared_split(data, tmp_path / "run", "train[:4]", progress=False)
  data.tfds.name = "mnist"
  with pytest.raises(ValueError, match="Unknown config.data.tfds.name 'mnist'"):
    dataset.prepared_split(data, tmp_path / "run", "train[:4]", progress=False)
