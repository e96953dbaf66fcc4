"""Tests for dataset readers: pairing, image and label checks, and the errors a user gets for bad data."""

import re

import numpy as np
import pytest
import tifffile
from PIL import Image

from urisc_jax.data import imageio
from urisc_jax.data import sources
from urisc_jax.data import synthetic


def _gray(path, array, mode="L", **save_kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).convert(mode).save(path, **save_kwargs)
  return path


def _label(shape=(20, 30)):
  label = np.full(shape, 255, np.uint8)
  label[::7, :] = 0  # thin black membranes: a minority
  label[:, ::9] = 0
  return label


def _urisc_tree(root, stems=("0001", "0002"), track="Track1", split="train", shape=(20, 30)):
  for stem in stems:
    _gray(root / "imgs" / track / split / f"{stem}.png", np.full(shape, 100, np.uint8), mode="RGB")
    _gray(root / "label" / track / split / f"{stem}.tiff", _label(shape))
  return root


def test_urisc_pairs_reads_the_release_layout(tmp_path):
  _urisc_tree(tmp_path, stems=("10", "9", "0001"))
  pairs = sources.urisc_pairs(tmp_path)
  assert [p.name for p in pairs] == ["0001", "9", "10"]
  assert pairs[0].label_path == tmp_path / "label/Track1/train/0001.tiff"
  image, membrane = sources.load_pair(pairs[0])
  assert image.dtype == np.uint8 and image.shape == (20, 30) and np.all(image == 100)
  np.testing.assert_array_equal(membrane, _label() == 0)


def test_urisc_track2_without_split_folders(tmp_path):
  _urisc_tree(tmp_path, track="Track2", split="")
  pairs = sources.urisc_pairs(tmp_path, track="Track2", split=None)
  assert [p.name for p in pairs] == ["0001", "0002"]
  with pytest.raises(sources.MissingDataError, match="split=None"):
    sources.urisc_pairs(tmp_path, track="Track2", split="train")
  # Images split into folders, labels of all splits side by side.
  _gray(tmp_path / "imgs/Track2/test/0002.png", np.zeros((20, 30), np.uint8))
  (tmp_path / "imgs/Track2/0001.png").unlink()
  (tmp_path / "imgs/Track2/0002.png").unlink()
  pairs = sources.urisc_pairs(tmp_path, track="Track2", split="test")
  assert [(p.name, p.label_path.name) for p in pairs] == [("0002", "0002.tiff")]


def test_urisc_errors_name_what_is_missing(tmp_path):
  with pytest.raises(sources.MissingDataError, match="does not exist"):
    sources.urisc_pairs(tmp_path / "nowhere")
  _urisc_tree(tmp_path)
  with pytest.raises(sources.MissingDataError, match=r"Splits found in .*: train/"):
    sources.urisc_pairs(tmp_path, split="val")
  with pytest.raises(sources.MissingDataError, match=r"Tracks found in .*: Track1/"):
    sources.urisc_pairs(tmp_path, track="Track3")
  _gray(tmp_path / "imgs/Track1/test/0005.png", np.zeros((4, 4), np.uint8))
  with pytest.raises(sources.MissingDataError, match=r"label/Track1/test does not exist"):
    sources.urisc_pairs(tmp_path, split="test")
  unlabelled = sources.urisc_pairs(tmp_path, split="test", require_labels=False)
  assert [(p.name, p.label_path) for p in unlabelled] == [("0005", None)]
  assert sources.load_pair(unlabelled[0])[1] is None


def test_image_without_label_and_label_without_image(tmp_path):
  _urisc_tree(tmp_path)
  (tmp_path / "label/Track1/train/0002.tiff").unlink()
  with pytest.raises(sources.DataError, match=r"imgs/Track1/train/0002.png has no label: expected .*"
                                              r"label/Track1/train/0002.tiff or"):
    sources.urisc_pairs(tmp_path)
  (tmp_path / "imgs/Track1/train/0002.png").unlink()
  _gray(tmp_path / "label/Track1/train/0003.tif", _label())
  with pytest.raises(sources.DataError, match=r"label .*0003.tif has no image: expected .*0003.png"):
    sources.urisc_pairs(tmp_path)


def test_folder_pairs_rejects_duplicate_stems(tmp_path):
  _gray(tmp_path / "images/a.png", np.zeros((4, 4), np.uint8))
  _gray(tmp_path / "labels/a.png", _label((4, 4)))
  _gray(tmp_path / "labels/a.tiff", _label((4, 4)))
  with pytest.raises(sources.DataError, match="share the name 'a'"):
    sources.folder_pairs(tmp_path / "images", tmp_path / "labels")


def test_size_mismatch_names_both_files(tmp_path):
  _gray(tmp_path / "images/a.png", np.zeros((20, 30), np.uint8))
  _gray(tmp_path / "labels/a.png", _label((30, 20)))
  (pair,) = sources.folder_pairs(tmp_path / "images", tmp_path / "labels")
  with pytest.raises(sources.DataError, match=r"images/a.png is 20 x 30 .*labels/a.png is 30 x 20 \(transposed\?\)"):
    sources.load_pair(pair)


def test_corrupt_and_truncated_files(tmp_path):
  noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # incompressible: data to cut
  good = _gray(tmp_path / "good.png", noise)
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(good.read_bytes()[:2000])
  for path in (garbage, truncated):
    with pytest.raises(sources.DataError, match=f"cannot read {re.escape(str(path))}.*corrupt"):
      sources.read_image(path)
  bad_tiff = tmp_path / "bad.tiff"
  bad_tiff.write_bytes(b"II*\x00" + b"\x00" * 20)
  with pytest.raises(sources.DataError, match="bad.tiff"):
    sources.read_label(bad_tiff)
  with pytest.raises(sources.MissingDataError, match="does not exist"):
    sources.read_image(tmp_path / "absent.png")


def test_colour_16_bit_and_transparent_images_are_refused(tmp_path):
  rgb = np.zeros((8, 8, 3), np.uint8)
  rgb[..., 1] = 5
  colour = tmp_path / "colour.png"
  Image.fromarray(rgb).save(colour)
  with pytest.raises(sources.DataError, match="colour.png is a colour image.*must be grayscale"):
    sources.read_image(colour)
  deep = tmp_path / "deep.png"
  Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(deep)
  with pytest.raises(sources.DataError, match="deep.png is a 16-bit image.*8-bit"):
    sources.read_image(deep)
  deep_tiff = tmp_path / "deep.tiff"
  Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(deep_tiff)
  with pytest.raises(sources.DataError, match="deep.tiff"):
    sources.read_image(deep_tiff)
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 3] = 128
  clear = tmp_path / "clear.png"
  Image.fromarray(rgba).save(clear)
  with pytest.raises(sources.DataError, match="transparent"):
    sources.read_image(clear)


def test_gray_in_other_containers_reads_the_same(tmp_path):
  gray = np.random.default_rng(0).integers(0, 256, (9, 13), dtype=np.uint8)
  for name, mode in [("one.png", "L"), ("three.png", "RGB"), ("four.png", "RGBA"), ("palette.png", "P"),
                     ("page.tiff", "L"), ("three.tif", "RGB")]:
    np.testing.assert_array_equal(sources.read_image(_gray(tmp_path / name, gray, mode=mode)), gray)
  bilevel = _gray(tmp_path / "bilevel.png", (gray > 128).astype(np.uint8) * 255, mode="1")
  np.testing.assert_array_equal(sources.read_image(bilevel), np.where(gray > 128, 255, 0))


def test_label_polarity_and_threshold(tmp_path):
  label = _label()
  black = _gray(tmp_path / "black.png", label)
  white = _gray(tmp_path / "white.png", 255 - label)
  np.testing.assert_array_equal(sources.read_label(black), label == 0)
  np.testing.assert_array_equal(sources.read_label(white, membrane="white"), label == 0)
  with pytest.raises(sources.DataError, match=r"covers 7\d\.\d % .*polarity is probably inverted.*membrane='white'"):
    sources.read_label(white)
  with pytest.raises(ValueError, match="'black' or 'white'"):
    sources.read_label(black, membrane="dark")
  # Interpolated labels (U-RISC Track 2) are not binary: refuse, and say which threshold binarizes them.
  soft = label.astype(np.int32)
  soft[1, :] = 100
  soft[2, :] = 130
  soft = _gray(tmp_path / "soft.png", soft.astype(np.uint8))
  with pytest.raises(sources.DataError, match="not binary.*threshold=122"):
    sources.read_label(soft)
  mask = sources.read_label(soft, threshold=122)
  np.testing.assert_array_equal(mask[1], True)
  np.testing.assert_array_equal(mask[2], False)
  np.testing.assert_array_equal(mask[3:], label[3:] == 0)


def test_isbi_reader_on_real_data(shared_dir):
  root = shared_dir / "data" / "isbi2012"
  pairs = sources.isbi_pairs(root)
  assert [p.name for p in pairs] == [f"{i:02d}" for i in range(30)]
  fractions = []
  for pair in pairs:
    image, membrane = sources.load_pair(pair)
    assert image.shape == membrane.shape == (512, 512) and image.dtype == np.uint8
    fractions.append(membrane.mean())
  assert abs(np.mean(fractions) - 0.2196) < 0.001  # the README's figure
  test = sources.isbi_pairs(root, split="test")
  assert len(test) == 30 and all(p.label_path is None for p in test)
  with pytest.raises(sources.MissingDataError, match="Found in"):
    sources.isbi_pairs(root, split="val")


def test_urisc_example_ground_truth_needs_a_threshold(shared_dir):
  """The official scorer's sample GT is RGB with gray levels 0..7 and 248..255 (compression noise)."""
  path = shared_dir / "data" / "urisc_eval_examples" / "gt.png"
  with pytest.raises(sources.DataError, match="threshold=122"):
    sources.read_label(path)
  assert 0.03 < sources.read_label(path, threshold=122).mean() < 0.06


def test_synthetic_release_reads_back_identically(tmp_path):
  synthetic.write_release(tmp_path, num_train=2, num_val=1, num_test=0, height=70, width=90, seed=9)
  config = synthetic.urisc_like(70, 90)
  for split, count in (("train", 2), ("val", 1)):
    pairs = sources.urisc_pairs(tmp_path, split=split)
    assert [p.name for p in pairs] == [f"{split}_{i:03d}" for i in range(count)]
    for i, pair in enumerate(pairs):
      image, membrane = sources.load_pair(pair)
      expected_image, expected_label = synthetic.render(config, synthetic.image_seed(9, split, i))
      np.testing.assert_array_equal(image, expected_image)
      np.testing.assert_array_equal(membrane, expected_label == synthetic.MEMBRANE)


def test_writers_are_atomic(tmp_path, monkeypatch):
  target = tmp_path / "out.png"
  imageio.write_png(target, np.zeros((4, 4), np.uint8))
  before = target.read_bytes()

  def failing_save(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(Image.Image, "save", failing_save)
  with pytest.raises(OSError, match="disk full"):
    imageio.write_png(target, np.ones((4, 4), np.uint8))
  assert target.read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_image_files_lists_a_file_or_a_folder(tmp_path):
  for name in ("b10.png", "b9.tif", "notes.txt", ".hidden.png"):
    (tmp_path / name).write_bytes(b"")
  assert [p.name for p in sources.image_files(tmp_path)] == ["b9.tif", "b10.png"]
  assert sources.image_files(tmp_path / "b10.png") == [tmp_path / "b10.png"]
  with pytest.raises(sources.MissingDataError, match="does not exist"):
    sources.image_files(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  with pytest.raises(sources.DataError, match="no images"):
    sources.image_files(tmp_path / "empty")


def _isbi_volume(depth=5, shape=(24, 28), seed=0):
  """A small ISBI-like volume and its labels (black membranes on white, each slice different)."""
  rng = np.random.default_rng(seed)
  volume = rng.integers(0, 256, (depth, *shape), dtype=np.uint8)
  labels = np.stack([np.roll(_label(shape), k, axis=1) for k in range(depth)])
  return volume, labels


def _write_isbi_stacks(root, volume, labels, test_depth=2):
  root.mkdir(parents=True, exist_ok=True)
  tifffile.imwrite(root / "train-volume.tif", volume)
  tifffile.imwrite(root / "train-labels.tif", labels)
  tifffile.imwrite(root / "test-volume.tif", volume[:test_depth])
  return root


def _write_isbi_slices(root, volume, labels, test_depth=2):
  for k, (image, label) in enumerate(zip(volume, labels)):
    _gray(root / "train" / "images" / f"{k:02d}.png", image)
    _gray(root / "train" / "labels" / f"{k:02d}.png", label)
  for k in range(test_depth):
    _gray(root / "test" / "images" / f"{k:02d}.png", volume[k])
  return root


def test_isbi_slices_read_stacks_and_slice_folders_alike(tmp_path):
  volume, labels = _isbi_volume()
  stacks = _write_isbi_stacks(tmp_path / "stacks", volume, labels)
  slices = _write_isbi_slices(tmp_path / "slices", volume, labels)
  for root in (stacks, slices):
    chosen = sources.isbi_slices(root, [3, 0, 1])
    assert [p.name for p in chosen] == ["03", "00", "01"]
    for pair, k in zip(chosen, (3, 0, 1)):
      load = sources.load_stack_slice if isinstance(pair, sources.StackSlice) else sources.load_pair
      image, mask = load(pair)
      np.testing.assert_array_equal(image, volume[k])
      np.testing.assert_array_equal(mask, labels[k] == 0)
    test = sources.isbi_slices(root, [1], volume="test")
    assert [p.name for p in test] == ["01"] and test[0].label_path is None
    assert sources.isbi_slices(root, []) == []
    with pytest.raises(ValueError, match=r"config.data.isbi.test names slice 5, but the train volume .* holds 5 "
                                         r"slices \(0-4\)"):
      sources.isbi_slices(root, [2, 3, 4, 5], key="config.data.isbi.test")
  assert isinstance(sources.isbi_slices(stacks, [0])[0], sources.StackSlice)
  with pytest.raises(sources.MissingDataError, match="holds neither train-volume.tif nor train/images"):
    sources.isbi_slices(tmp_path, [0])
  with pytest.raises(sources.MissingDataError, match="does not exist"):
    sources.isbi_slices(tmp_path / "absent", [0])


@pytest.mark.parametrize("layout", ["shaped", "pages", "imagej"])
def test_one_page_of_a_stack_equals_the_whole_stack_read(tmp_path, layout):
  volume, _ = _isbi_volume(depth=4)
  path = tmp_path / "volume.tif"
  if layout == "pages":
    with tifffile.TiffWriter(path) as writer:
      for page in volume:
        writer.write(page, contiguous=False)
  else:
    tifffile.imwrite(path, volume, imagej=layout == "imagej")
  for page in range(4):
    np.testing.assert_array_equal(sources.read_stack_page(path, page), sources.read_stack(path)[page])
  with pytest.raises(sources.DataError, match=r"holds 4 slices \(0-3\); slice 4 does not exist"):
    sources.read_stack_page(path, 4)


def test_isbi_slices_on_real_data(shared_dir):
  root = shared_dir / "data" / "isbi2012"
  chosen = sources.isbi_slices(root, range(20, 30))
  assert [p.name for p in chosen] == [f"{k}" for k in range(20, 30)]
  assert all(p.label_path == root / "train" / "labels" / f"{p.name}.png" for p in chosen)
  assert len(sources.isbi_slices(root, range(30), volume="test")) == 30
  with pytest.raises(ValueError, match="holds 30 slices"):
    sources.isbi_slices(root, range(25, 31))
