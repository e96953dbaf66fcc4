"""The decode-once cache: content-keyed entries, no re-decode or re-hash on a re-run, atomic writes, TIFF stacks, and
the ground truth the official scorer sees."""

import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from urisc_jax.data import prepare, sources
from urisc_jax.evaluation import f1 as official


def _label(shape):
  label = np.full(shape, 255, np.uint8)
  label[::6] = 0
  label[:, ::5] = 0
  return label


def _pair(tmp_path, name="a", shape=(24, 32), seed=0):
  image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / f"{name}.png")
  Image.fromarray(_label(shape)).save(tmp_path / f"{name}.tiff")
  return sources.ImagePair(name, tmp_path / f"{name}.png", tmp_path / f"{name}.tiff"), image


def _age(*paths, seconds=3600):
  """Backdates the modification time of files or folders."""
  for path in paths:
    stamp = os.stat(path).st_mtime - seconds
    os.utime(path, (stamp, stamp))


def _entries(cache):
  return sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_entries_hold_the_decoded_image_and_mask(tmp_path):
  pair, image = _pair(tmp_path)
  [prepared] = prepare.prepare_pairs([pair], tmp_path / "cache", progress=False)
  np.testing.assert_array_equal(prepared.image(), image)
  np.testing.assert_array_equal(prepared.label(), (_label(image.shape) == 0).astype(np.uint8))
  assert prepared.shape == image.shape and prepared.name == "a" and prepared.source_label == str(pair.label_path)
  assert isinstance(prepared.image(), np.memmap)


def test_rerun_neither_decodes_nor_hashes(tmp_path, monkeypatch):
  pair, _ = _pair(tmp_path)
  cache = tmp_path / "cache"
  window = prepare._RACY_WINDOW_NS
  # Files are seconds old here; pretend the racy window has passed (touching them would reset their ctime).
  monkeypatch.setattr(prepare, "_RACY_WINDOW_NS", -1)
  first = prepare.prepare_pairs([pair], cache, progress=False)
  calls = {"decode": 0, "hash": 0}
  load_pair, hash_file = sources.load_pair, prepare._hash_file

  def counting_load(*args, **kwargs):
    calls["decode"] += 1
    return load_pair(*args, **kwargs)

  def counting_hash(path):
    calls["hash"] += 1
    return hash_file(path)

  monkeypatch.setattr(sources, "load_pair", counting_load)
  monkeypatch.setattr(prepare, "_hash_file", counting_hash)
  again = prepare.prepare_pairs([pair], cache, progress=False)
  assert again == first and calls == {"decode": 0, "hash": 0}
  # A file inside the racy window is hashed again (its digest was not remembered), but still not decoded.
  monkeypatch.setattr(prepare, "_RACY_WINDOW_NS", window)
  pair2, _ = _pair(tmp_path, name="b")
  prepare.prepare_pairs([pair2], cache, progress=False)
  calls.update(decode=0, hash=0)
  prepare.prepare_pairs([pair2], cache, progress=False)
  assert calls == {"decode": 0, "hash": 2}


def test_an_edited_source_file_gets_a_new_entry(tmp_path, monkeypatch):
  image = np.random.default_rng(0).integers(0, 256, (24, 32), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / "a.tif")  # uncompressed: an edit keeps the file size
  Image.fromarray(_label(image.shape)).save(tmp_path / "a.tiff")
  pair = sources.ImagePair("a", tmp_path / "a.tif", tmp_path / "a.tiff")
  _age(pair.image_path)
  monkeypatch.setattr(prepare, "_RACY_WINDOW_NS", -1)  # remember every digest: the index must not hide the edit
  cache = tmp_path / "cache"
  [before] = prepare.prepare_pairs([pair], cache, progress=False)
  size = pair.image_path.stat().st_size
  edited = 255 - image
  Image.fromarray(edited).save(pair.image_path)
  assert pair.image_path.stat().st_size == size
  [after] = prepare.prepare_pairs([pair], cache, progress=False)
  assert after.image_path != before.image_path and len(_entries(cache)) == 2
  np.testing.assert_array_equal(after.image(), edited)
  np.testing.assert_array_equal(before.image(), image)  # the old entry is left as it was
  # Other label settings are another entry too: a mask decoded under one setting is never reused for another.
  [thresholded] = prepare.prepare_pairs([pair], cache, threshold=122, progress=False)
  assert thresholded.image_path not in (before.image_path, after.image_path)


def test_a_crash_during_np_save_leaves_no_entry(tmp_path, monkeypatch):
  pair, image = _pair(tmp_path)
  cache = tmp_path / "cache"
  real_save = np.save
  saves = []

  def failing_save(file, array, *args, **kwargs):
    saves.append(array.shape)
    if len(saves) == 2:  # the image is written, the label fails half way
      file.write(b"\x93NUMPY partial")
      raise OSError("No space left on device")
    return real_save(file, array, *args, **kwargs)

  monkeypatch.setattr(np, "save", failing_save)
  with pytest.raises(OSError, match="No space left"):
    prepare.prepare_pairs([pair], cache, progress=False)
  leftovers = [p.name for p in cache.iterdir() if p.name != prepare.INDEX_FILE]
  assert leftovers == [] and len(saves) == 2
  monkeypatch.setattr(np, "save", real_save)
  [prepared] = prepare.prepare_pairs([pair], cache, progress=False)
  np.testing.assert_array_equal(prepared.image(), image)


def test_concurrent_writers_and_stale_temporaries(tmp_path):
  entry = tmp_path / "key"
  arrays = {prepare.IMAGE_FILE: np.zeros((4, 4), np.uint8)}
  prepare._write_entry(entry, arrays)
  prepare._write_entry(entry, {prepare.IMAGE_FILE: np.ones((4, 4), np.uint8)})  # another host got there first
  np.testing.assert_array_equal(np.load(entry / prepare.IMAGE_FILE), 0)
  assert [p.name for p in tmp_path.iterdir()] == ["key"]
  stale = tmp_path / ".other.abc.tmp"
  stale.mkdir()
  (stale / "image.npy").write_bytes(b"partial")
  assert prepare.remove_stale_temporaries(tmp_path) == 0  # fresh: may belong to a running writer
  _age(stale, seconds=2 * 24 * 3600)
  assert prepare.remove_stale_temporaries(tmp_path) == 1 and not stale.exists()


def test_a_damaged_index_only_costs_a_rehash(tmp_path):
  pair, image = _pair(tmp_path)
  cache = tmp_path / "cache"
  prepare.prepare_pairs([pair], cache, progress=False)
  (cache / prepare.INDEX_FILE).write_text("{not json")
  [prepared] = prepare.prepare_pairs([pair], cache, progress=False)
  np.testing.assert_array_equal(prepared.image(), image)


def _stack(tmp_path, depth=3, shape=(20, 24)):
  rng = np.random.default_rng(0)
  volume = rng.integers(0, 256, (depth, *shape), dtype=np.uint8)
  labels = np.stack([_label(shape)] * depth)
  labels[1, 3, :] = 0  # pages differ
  tifffile.imwrite(tmp_path / "train-volume.tif", volume)  # one shaped page
  with tifffile.TiffWriter(tmp_path / "train-labels.tif") as writer:  # one page per slice, as the challenge's
    for page in labels:
      writer.write(page, contiguous=False)
  tifffile.imwrite(tmp_path / "test-volume.tif", volume[:2], imagej=True)
  return volume, labels


def test_isbi_tiff_stacks_read_page_by_page_and_prepare(tmp_path):
  volume, labels = _stack(tmp_path)
  pairs = sources.isbi_stack_pairs(tmp_path)
  assert [(p.name, p.page) for p in pairs] == [("00", 0), ("01", 1), ("02", 2)]
  np.testing.assert_array_equal(sources.read_stack(pairs[0].image_path), volume)
  prepared = prepare.prepare_pairs(pairs, tmp_path / "cache", progress=False)
  assert len({p.image_path for p in prepared}) == 3
  for page, item in enumerate(prepared):
    np.testing.assert_array_equal(item.image(), volume[page])
    np.testing.assert_array_equal(item.label(), (labels[page] == 0).astype(np.uint8))
    assert item.source_page == page
  test = sources.isbi_stack_pairs(tmp_path, split="test")
  assert len(test) == 2 and all(p.label_path is None for p in test)
  np.testing.assert_array_equal(sources.load_stack_slice(test[1])[0], volume[1])


def test_stack_errors_name_the_file_and_the_fix(tmp_path):
  volume, _ = _stack(tmp_path)
  with pytest.raises(sources.MissingDataError, match="train-labels.tif does not exist"):
    (tmp_path / "train-labels.tif").rename(tmp_path / "elsewhere.tif")
    sources.isbi_stack_pairs(tmp_path)
  tifffile.imwrite(tmp_path / "train-labels.tif", np.stack([_label((20, 24))] * 2))
  with pytest.raises(sources.DataError, match="holds 3 slices .* holds 2"):
    sources.isbi_stack_pairs(tmp_path)
  tifffile.imwrite(tmp_path / "wide.tif", volume.astype(np.uint16))
  with pytest.raises(sources.DataError, match="uint16 pixels"):
    sources.stack_pairs(tmp_path / "wide.tif")
  (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
  with pytest.raises(sources.DataError, match="broken.tif"):
    sources.stack_pairs(tmp_path / "broken.tif")
  inverted = np.stack([255 - _label((20, 24))] * 3)
  tifffile.imwrite(tmp_path / "train-labels.tif", inverted)
  with pytest.raises(sources.DataError, match=r"page 0.*membrane='white'"):
    sources.load_stack_slice(sources.isbi_stack_pairs(tmp_path)[0])


def test_official_label_is_what_the_official_scorer_reads_from_the_label_file(tmp_path):
  pair, _ = _pair(tmp_path)
  [prepared] = prepare.prepare_pairs([pair], tmp_path / "cache", progress=False)
  truth = official.read_gray8(pair.label_path)  # the scorer's own reader
  np.testing.assert_array_equal(prepared.official_label(), truth)
  assert prepared.official_label().dtype == np.uint8
  # A label in the other polarity, or one binarized at a threshold, comes back in the official polarity.
  Image.fromarray(255 - _label((24, 32))).save(tmp_path / "white.tiff")
  white = sources.ImagePair("white", pair.image_path, tmp_path / "white.tiff")
  [prepared] = prepare.prepare_pairs([white], tmp_path / "cache", membrane="white", progress=False)
  np.testing.assert_array_equal(prepared.official_label(), truth)
  soft = _label((24, 32)).astype(np.int32)
  soft[1] = 100  # interpolated gray levels, as in U-RISC Track 2 labels
  soft[2] = 140
  Image.fromarray(soft.astype(np.uint8)).save(tmp_path / "soft.tiff")
  [prepared] = prepare.prepare_pairs([sources.ImagePair("soft", pair.image_path, tmp_path / "soft.tiff")],
                                     tmp_path / "cache", threshold=122, progress=False)
  np.testing.assert_array_equal(prepared.official_label(), np.where(soft <= 122, 0, 255))


def test_official_label_of_stack_slices(tmp_path):
  _, labels = _stack(tmp_path)
  prepared = prepare.prepare_pairs(sources.isbi_stack_pairs(tmp_path), tmp_path / "cache", progress=False)
  for page, item in enumerate(prepared):
    np.testing.assert_array_equal(item.official_label(), labels[page])
  with pytest.raises(ValueError, match="has no label"):
    prepare.prepare_pairs(sources.isbi_stack_pairs(tmp_path, split="test"), tmp_path / "cache",
                          progress=False)[0].official_label()


def test_official_label_equals_the_real_isbi_label_files(shared_dir, tmp_path):
  pairs = sources.isbi_pairs(shared_dir / "data" / "isbi2012")[::10]
  for item, pair in zip(prepare.prepare_pairs(pairs, tmp_path / "cache", progress=False), pairs):
    np.testing.assert_array_equal(item.official_label(), official.read_gray8(pair.label_path))
