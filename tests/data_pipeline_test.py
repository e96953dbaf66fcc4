"""The crop pipeline: deterministic by seed, exact resume from iterator state, per-host shards, aligned labels."""

import numpy as np
import pytest

from urisc_jax.data import pipeline
from urisc_jax.data.prepare import PreparedImage


def _prepared(tmp_path, shapes=((60, 80), (50, 50))):
  """Images whose label is a function of the image (membrane = gray < 64), so alignment can be checked."""
  images = []
  for i, shape in enumerate(shapes):
    image = np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8)
    np.save(tmp_path / f"{i}.image.npy", image)
    np.save(tmp_path / f"{i}.label.npy", (image < 64).astype(np.uint8))
    images.append(PreparedImage(name=str(i), image_path=str(tmp_path / f"{i}.image.npy"),
                                label_path=str(tmp_path / f"{i}.label.npy"), shape=shape,
                                source_image=f"{i}.png", source_label=f"{i}.tiff"))
  return images


def _batches(images, *, seed=0, steps=5, batch=4, process_index=0, process_count=1):
  examples = pipeline.CropExamples(images, crop_size=16, seed=seed)
  ds = pipeline.train_dataset(examples, num_steps=steps, global_batch_size=batch, process_index=process_index,
                              process_count=process_count)
  return [b for b in pipeline.iterator(ds)]


def test_same_seed_same_batches_and_another_seed_differs(tmp_path):
  images = _prepared(tmp_path)
  first, again, other = _batches(images), _batches(images), _batches(images, seed=1)
  assert len(first) == 5
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not all(np.array_equal(a["image"], c["image"]) for a, c in zip(first, other))


def test_labels_stay_aligned_with_images_under_augmentation(tmp_path):
  for batch in _batches(_prepared(tmp_path), steps=20):
    assert batch["image"].shape == (4, 16, 16, 1) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["label"], (batch["image"] < 64).astype(np.uint8))


def test_augmentation_produces_flipped_and_rotated_crops(tmp_path):
  """Every crop is some dihedral transform of a window of its source image, and more than the identity occurs."""
  images = _prepared(tmp_path, shapes=((40, 40),))
  source = np.load(images[0].image_path)
  examples = pipeline.CropExamples(images, crop_size=40, seed=0)
  kinds = set()
  for i in range(40):
    crop = examples(i)["image"][..., 0]
    matches = [k for k in range(8) if np.array_equal(crop, np.rot90(source if k < 4 else source.T, k % 4))]
    assert matches, "crop is not a dihedral transform of the image"
    kinds.add(matches[0])
  assert len(kinds) >= 6


def test_restored_iterator_state_continues_with_the_exact_next_batch(tmp_path):
  images = _prepared(tmp_path)
  examples = pipeline.CropExamples(images, crop_size=16, seed=3)
  ds = pipeline.train_dataset(examples, num_steps=6, global_batch_size=4)
  it = pipeline.iterator(ds)
  next(it), next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = pipeline.iterator(ds)
  resumed.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(resumed)["image"], e["image"])


def test_hosts_split_the_global_batch_without_overlap(tmp_path):
  images = _prepared(tmp_path)
  whole = _batches(images, steps=3, batch=4)
  hosts = [_batches(images, steps=3, batch=4, process_index=p, process_count=2) for p in range(2)]
  for step in range(3):
    host_crops = np.concatenate([hosts[0][step]["image"], hosts[1][step]["image"]])
    assert host_crops.shape[0] == 4
    expected = {c.tobytes() for c in whole[step]["image"]}
    assert {c.tobytes() for c in host_crops} == expected


def test_clear_errors_for_unusable_training_sets(tmp_path):
  with pytest.raises(ValueError, match="No training images"):
    pipeline.CropExamples([], crop_size=16, seed=0)
  unlabelled = PreparedImage("a", str(tmp_path / "a.npy"), None, (32, 32), "a.png", None)
  with pytest.raises(ValueError, match="need labels"):
    pipeline.CropExamples([unlabelled], crop_size=16, seed=0)
  with pytest.raises(ValueError, match="divisible"):
    pipeline.train_dataset(pipeline.CropExamples(_prepared(tmp_path), crop_size=16, seed=0), num_steps=1,
                           global_batch_size=3, process_count=2)
