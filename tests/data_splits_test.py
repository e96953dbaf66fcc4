"""Train / validation splits never overlap (by image, by patch), cover what they split and follow the seed."""

import ml_collections
import numpy as np
import pytest

from urisc_jax.data import crops, splits

URISC_TRACK1 = (9959, 9958)  # rows x columns as stored


def _rows(array):
  return {tuple(int(v) for v in row) for row in array}


def test_image_split_is_disjoint_complete_and_seeded():
  train, val = splits.split_images(30, seed=0, num_val=10)
  assert len(val) == 10 and len(train) == 20
  assert not set(train) & set(val) and sorted(set(train) | set(val)) == list(range(30))
  again = splits.split_images(30, seed=0, num_val=10)
  np.testing.assert_array_equal(again[1], val)
  assert not np.array_equal(splits.split_images(30, seed=1, num_val=10)[1], val)
  assert len(splits.split_images(30, seed=0, val_fraction=0.2)[1]) == 6
  with pytest.raises(ValueError, match="still train"):
    splits.split_images(3, seed=0, num_val=3)
  with pytest.raises(ValueError, match="exactly one"):
    splits.split_images(3, seed=0)


def test_grid_patches_match_the_tile_grid():
  shapes = [(100, 90), (64, 64)]
  patches = splits.grid_patches(shapes, patch_size=32, stride=16)
  expected = [(i, r, c) for i, shape in enumerate(shapes) for r, c in crops.grid_origins(shape, 32, 16)]
  assert [tuple(p) for p in patches.tolist()] == expected
  assert patches[:, 1].max() == 100 - 32 and patches[:, 2].max() == 90 - 32  # flush with the border
  with pytest.raises(ValueError, match="crop_size"):
    splits.grid_patches([(20, 20)], patch_size=32, stride=16)


def test_the_papers_patch_split_of_track1_is_disjoint():
  """30 Track 1 images, 1024 px patches: the stride that gives 70,000 grid patches, split 50,000 / 20,000."""
  shapes = [URISC_TRACK1] * 30
  stride = splits.stride_for(70_000, shapes, 1024)
  grid = splits.grid_patches(shapes, patch_size=1024, stride=stride)
  assert len(grid) >= 70_000 and len(splits.grid_patches(shapes, patch_size=1024, stride=stride + 1)) < 70_000
  train, val = splits.split_patches(grid, seed=0, val_fraction=2 / 7, num_train=50_000, num_val=20_000)
  assert len(train) == 50_000 and len(val) == 20_000
  train_rows, val_rows = _rows(train), _rows(val)
  assert len(train_rows) == 50_000 and len(val_rows) == 20_000  # no patch twice within a side
  assert not train_rows & val_rows and (train_rows | val_rows) <= _rows(grid)
  again_train, again_val = splits.split_patches(grid, seed=0, val_fraction=2 / 7, num_train=50_000, num_val=20_000)
  np.testing.assert_array_equal(again_val, val)
  assert not np.array_equal(splits.split_patches(grid, seed=1, val_fraction=2 / 7, num_val=20_000)[1], val)


def test_patch_split_from_config():
  config = ml_collections.ConfigDict(dict(mode="patch", stride=0, num_train=0, num_val=0, val_fraction=0.25))
  train, val = splits.patch_split(config, [(96, 96), (64, 80)], crop_size=32, seed=3)
  grid = splits.grid_patches([(96, 96), (64, 80)], patch_size=32, stride=16)
  assert len(val) == round(0.25 * len(grid)) and len(train) + len(val) == len(grid)
  assert not _rows(train) & _rows(val)
  config.mode = "folders"
  assert splits.patch_split(config, [(96, 96)], crop_size=32, seed=3) is None
  config.update(mode="patch", num_train=500, num_val=200)
  with pytest.raises(ValueError, match=r"set config.data.split.stride=\d+"):
    splits.patch_split(config, [(96, 96)], crop_size=32, seed=3)
  config.mode = "pixels"
  with pytest.raises(ValueError, match="split.mode"):
    splits.patch_split(config, [(96, 96)], crop_size=32, seed=3)


def test_holdout_images_is_disjoint_complete_ordered_and_seeded():
  names = [f"{k:02d}" for k in range(20)]
  train, val = splits.holdout_images(names, seed=0, val_fraction=0.25)
  assert len(val) == 5 and len(train) == 15
  assert not set(train) & set(val) and sorted(train + val) == names
  assert train == sorted(train) and val == sorted(val)  # the order of the input is kept
  assert splits.holdout_images(names, seed=0, val_fraction=0.25) == (train, val)
  assert splits.holdout_images(names, seed=1, val_fraction=0.25)[1] != val
  assert len(splits.holdout_images(names[:3], seed=0, val_fraction=0.01)[1]) == 1  # at least one
  for bad in (0.0, 1.0):
    with pytest.raises(ValueError, match="val_fraction must be in"):
      splits.holdout_images(names, seed=0, val_fraction=bad)
  with pytest.raises(ValueError, match="at least 2 training images"):
    splits.holdout_images(names[:1], seed=0, val_fraction=0.5)


def test_images_mode_makes_no_patches():
  config = ml_collections.ConfigDict(dict(mode="images", stride=0, num_train=0, num_val=0, val_fraction=0.25))
  assert splits.patch_split(config, [(96, 96)], crop_size=32, seed=3) is None


def test_the_patch_config_cuts_19_by_19_patches_per_image_and_keeps_train_and_validation_apart():
  """configs/urisc_track1_unet_r50_patch.py: 1024 px patches at stride 512 over 9958 x 9959 images."""
  from configs import urisc_track1_unet_r50_patch  # pylint: disable=g-import-not-at-top
  config = urisc_track1_unet_r50_patch.get_config()
  assert config.data.split.mode == "patch" and config.data.val_split == ""
  shapes = [URISC_TRACK1] * 20
  grid = splits.grid_patches(shapes, patch_size=config.data.crop_size, stride=config.data.split.stride)
  assert len(grid) == 19 * 19 * 20 and np.all(np.bincount(grid[:, 0]) == 19 * 19)
  train, val = splits.patch_split(config.data.split, shapes, crop_size=config.data.crop_size, seed=config.seed)
  assert len(val) == round(2 / 7 * len(grid)) == 2063 and len(train) + len(val) == len(grid)
  assert not _rows(train) & _rows(val)  # no patch is in both
  overlap = splits.overlap_pixels(train, val, patch_size=1024, shapes=shapes)
  share = overlap["shared_pixels"] / overlap["val_pixels"]
  print(f"validation patches cover {overlap['val_pixels']} px, {100 * share:.2f} % of them inside a training patch")
  assert 0.95 < share <= 1.0  # half-overlapping neighbours: the validation pixels were trained on


def test_overlap_pixels_equals_a_pixel_mask():
  shapes = [(100, 90), (64, 80)]
  train, val = splits.patch_split(ml_collections.ConfigDict(dict(mode="patch", stride=12, num_train=0, num_val=0,
                                                                 val_fraction=0.4)), shapes, crop_size=32, seed=5)
  val_pixels = shared = 0
  for index, shape in enumerate(shapes):
    masks = {}
    for name, patches in (("train", train), ("val", val)):
      masks[name] = np.zeros(shape, bool)
      for _, row, col in patches[patches[:, 0] == index]:
        masks[name][row:row + 32, col:col + 32] = True
    val_pixels += int(masks["val"].sum())
    shared += int((masks["val"] & masks["train"]).sum())
  assert splits.overlap_pixels(train, val, patch_size=32, shapes=shapes) == {"val_pixels": val_pixels,
                                                                             "shared_pixels": shared}
  assert 0 < shared < val_pixels
