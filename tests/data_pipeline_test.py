"""The crop pipeline: deterministic by seed, the same with worker processes, exact resume from iterator state, per-host
shards, aligned labels, grid patches."""

import numpy as np
import pytest

from urisc_jax.data import augment, pipeline, splits
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


def _all_equal(batches, others):
  assert len(batches) == len(others)
  for a, b in zip(batches, others):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_worker_processes_give_the_same_batches_and_resume_exactly(tmp_path):
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags; outside absl.app.run they must be marked parsed.
  examples = pipeline.CropExamples(_prepared(tmp_path, shapes=((60, 80), (70, 50))), crop_size=16, seed=4,
                                   augment=augment.AugmentConfig.paper())
  ds = pipeline.train_dataset(examples, num_steps=6, global_batch_size=4)
  in_process = list(pipeline.iterator(ds, num_workers=0))
  it = pipeline.iterator(ds, num_workers=2)
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  rest = list(it)
  _all_equal(first + rest, in_process)
  resumed = pipeline.iterator(ds, num_workers=2)
  resumed.set_state(state)
  _all_equal(list(resumed), in_process[2:])


def test_patches_are_walked_once_per_epoch_in_a_seeded_order(tmp_path):
  images = _prepared(tmp_path, shapes=((40, 40), (48, 32)))
  patches = splits.grid_patches([im.shape for im in images], patch_size=16, stride=8)
  train, val = splits.split_patches(patches, seed=0, val_fraction=0.25)
  plain = augment.AugmentConfig(flip_p=0.0, rot90=False)
  examples = pipeline.CropExamples(images, crop_size=16, seed=1, augment=plain, patches=train)
  arrays = [np.load(im.image_path) for im in images]
  patch_of = {arrays[i][r:r + 16, c:c + 16].tobytes(): (i, r, c) for i, r, c in patches.tolist()}
  assert len(patch_of) == len(patches)  # random pixels: every window is distinct
  epochs = [[patch_of[examples(e * len(train) + k)["image"][..., 0].tobytes()] for k in range(len(train))]
            for e in range(2)]
  for seen in epochs:
    assert sorted(seen) == sorted(map(tuple, train.tolist()))  # every training patch once, never a validation one
  assert epochs[0] != epochs[1]  # a fresh order each epoch


def test_validation_patches_in_order(tmp_path):
  images = _prepared(tmp_path)
  patches = np.array([(0, 0, 0), (1, 34, 34), (0, 44, 64)])
  crops_ = pipeline.PatchCrops(images, patches, crop_size=16)
  batches = list(pipeline.iterator(pipeline.patch_dataset(crops_, batch_size=2)))
  assert [b["image"].shape[0] for b in batches] == [2, 1]
  source = np.load(images[0].image_path)
  np.testing.assert_array_equal(batches[1]["image"][0, ..., 0], source[44:60, 64:80])
  np.testing.assert_array_equal(batches[0]["label"], (batches[0]["image"] < 64).astype(np.uint8))
  with pytest.raises(ValueError, match="does not fit"):
    pipeline.PatchCrops(images, np.array([(1, 40, 40)]), crop_size=16)


def test_augment_settings_from_the_config(tmp_path):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  examples = pipeline.CropExamples(_prepared(tmp_path), crop_size=16, seed=0, augment=config.data.augment,
                                   patches=pipeline.train_patches(config.data, _prepared(tmp_path), seed=0))
  assert examples._augment == augment.AugmentConfig.from_config(config.data.augment)
  assert examples.patches is None
  config.data.augment.rotate_p = 2.0
  with pytest.raises(ValueError, match="rotate_p=2.0"):
    pipeline.CropExamples(_prepared(tmp_path), crop_size=16, seed=0, augment=config.data.augment)
  config.data.split.mode = "patch"
  config.data.crop_size = 16
  assert pipeline.train_patches(config.data, _prepared(tmp_path), seed=0).shape[1] == 3
