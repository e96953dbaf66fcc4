"""From `config.data` to prepared (decoded, cached, memory-mappable) images per split.

`config.data.source` says where the images come from; a split is what `config.data.{train,val,test}_split` names:
  - "synthetic": a U-RISC-layout release written by the package's generator under `config.data.root` (default
    workdir/data; reused when it exists), then read like a real release; a split is a folder name.
  - "urisc": a downloaded U-RISC release at `config.data.root` (imgs/ and label/); a split is a folder name.
  - "isbi": ISBI 2012 at `config.data.root`, as the challenge's TIFF stacks or as per-slice files; split `s` takes
    the slices `config.data.isbi.<s>` lists, e.g. "0-19" (see `parse_slices`).
  - "folders": any folders of images and labels: split `s` pairs `config.data.folders.<s>_images` with
    `config.data.folders.<s>_labels` by file stem ("" labels = unlabelled images).
  - "tfds": the `urisc/track1`, `urisc/track2` or `isbi2012` TFDS builder (`config.data.tfds.name`) read with
    `tfds.data_source`, no TensorFlow; a split is a TFDS split string such as "train" or "train[:20]". The dataset is
    built from `config.data.root` (its manual download folder) into `config.data.tfds.data_dir` the first time.
  - "tensorstore": chunked volumes read through TensorStore (`volume_source`): split `s` takes every section of
    `config.data.tensorstore.<s>.image` with its labels in `config.data.tensorstore.<s>.label`; crops read only
    their window, nothing is decoded up front.
Every split comes out as `prepare.PreparedImage`s (name, image(), label(), official_label()), so training, threshold
choice and scoring treat label files, stack slices and TFDS records alike. A split that names nothing ("" for a
split name, a slice list or an images folder) is empty.

With `config.data.split.mode = "images"`, for data without a validation split (the val split must then name nothing),
a seeded share of the training split's images becomes the validation split and the rest train: `split.val_fraction`
of them, picked with `split.seed` (not the run's seed, so runs with different seeds validate on the same images).
"""

import pathlib
import re

from urisc_jax.data import prepare, sources, splits, synthetic

SOURCES = ("synthetic", "urisc", "isbi", "folders", "tfds", "tensorstore")
TFDS_NAMES = ("urisc/track1", "urisc/track2", "isbi2012")
ROLES = ("train", "val", "test")


# ISBI 2012 slices are selected by index (config.data.isbi): "0-19" (inclusive), "0,2,5-9", "" (none); "test:0-29" reads the
# unlabelled test volume instead of the labelled training volume.
_RANGE_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")
SLICE_SYNTAX = ("slice indices such as '0-19' (both ends included), '0,2,5-9', '' for none, or with the prefix "
                "'test:' (e.g. 'test:0-29') for the unlabelled test volume")


def parse_slices(text: str, *, key: str = "slices") -> tuple[str, list[int]]:
  """Parses a slice selection such as "0-19", "0,2,5-9", "" or "test:0-29".

  Args:
    text: the selection.
    key: the config key it came from, named in errors.

  Returns:
    (volume, indices): volume "train" (labelled slices) or "test"; indices in the order written, no repeats.
  """
  if not isinstance(text, str):
    raise ValueError(f"{key}={text!r} must be a string of {SLICE_SYNTAX}.")
  volume, body = "train", text.strip()
  for prefix in ("train:", "test:"):
    if body.startswith(prefix):
      volume, body = prefix[:-1], body[len(prefix):].strip()
  indices, seen = [], set()
  for item in (part.strip() for part in body.split(",")) if body else ():
    match = _RANGE_ITEM.match(item)
    if not match:
      raise ValueError(f"{key}={text!r}: {item!r} is not a slice index or range; write {SLICE_SYNTAX}.")
    first = int(match.group(1))
    last = first if match.group(2) is None else int(match.group(2))
    if last < first:
      raise ValueError(f"{key}={text!r}: the range {item!r} runs backwards; write '{last}-{first}'.")
    for index in range(first, last + 1):
      if index in seen:
        raise ValueError(f"{key}={text!r} names slice {index} twice; list each slice once.")
      seen.add(index)
      indices.append(index)
  return volume, indices



def release_root(data_config, workdir: str | pathlib.Path) -> pathlib.Path:
  """The folder the source reads (`config.data.root`), generating the synthetic release first when asked for."""
  source = data_config.source
  if source == "synthetic":
    root = pathlib.Path(data_config.root or pathlib.Path(workdir) / "data")
    cfg = data_config.synthetic
    synthetic.write_release(root, num_train=cfg.num_train, num_val=cfg.num_val, num_test=cfg.num_test,
                            height=cfg.height, width=cfg.width, seed=cfg.seed, preset=cfg.preset)
    return root
  if source not in SOURCES:
    raise ValueError(f"Unknown config.data.source {source!r}: choose one of {SOURCES}.")
  if not data_config.root:
    what = {"urisc": "the release folder (the one that holds imgs/ and label/)",
            "isbi": "the ISBI 2012 folder (train-volume.tif and train-labels.tif, or train/images and train/labels)",
            "tfds": "the manual download folder to build the TFDS dataset from"}.get(source, "a folder")
    raise ValueError(f"config.data.source={source!r} needs {what}: pass --config.data.root=PATH.")
  return pathlib.Path(data_config.root)


def cache_dir(data_config, workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(data_config.cache_dir or pathlib.Path(workdir) / "cache")


def prepared_split(data_config, workdir: str | pathlib.Path, split: str, *,
                   progress: bool = True) -> list[prepare.PreparedImage]:
  """Decoded images (with labels where the source has them) of one split.

  Args:
    data_config: config.data.
    workdir: the run folder (default home of the synthetic release, the cache and built TFDS data).
    split: what one of config.data.{train,val,test}_split holds, e.g. "train", "val", "test" or "train[:20]".
    progress: show a progress bar while decoding.

  Returns:
    One PreparedImage per image, in the source's order.
  """
  check_splits(data_config)
  if _split_mode(data_config) == "images" and split in (data_config.train_split, data_config.val_split):
    split_config = data_config.split
    pool = _source_split(data_config, workdir, data_config.train_split, progress=progress)
    train, val = splits.holdout_images(pool, seed=split_config.get("seed", 0), val_fraction=split_config.val_fraction)
    return train if split == data_config.train_split else val
  return _source_split(data_config, workdir, split, progress=progress)


def check_splits(data_config) -> None:
  """Raises a ValueError naming the keys when the splits of `config.data` would leak images from one to another."""
  names = {role: data_config.get(f"{role}_split", "") for role in ROLES}
  mode = _split_mode(data_config)
  if mode not in splits.MODES:
    raise ValueError(f"Unknown config.data.split.mode {mode!r}: choose one of {splits.MODES}.")
  if mode == "images":
    if names["val"] in (names["train"], names["test"]):
      other = "train" if names["val"] == names["train"] else "test"
      fix = ("config.data.val_split='val' with an empty selection" if data_config.source in ("isbi", "folders")
             else f"config.data.{other}_split to the {other} split")
      raise ValueError(f"config.data.split.mode='images' tells the validation split from the others by its name, "
                       f"but config.data.val_split={names['val']!r} is also config.data.{other}_split: set {fix}.")
    if not _names_nothing(data_config, names["val"]):
      raise ValueError(f"config.data.split.mode='images' holds out validation images from the training split, but "
                       f"the validation split also names images: {_key(data_config, 'val', names['val'])}. Empty it "
                       f"({_empty_hint(data_config)}) or use config.data.split.mode='folders'.")
  if mode == "patch" and not _names_nothing(data_config, names["val"]):
    raise ValueError(f"config.data.split.mode='patch' validates on patches of the training images, but the "
                     f"validation split also names images: {_key(data_config, 'val', names['val'])}, which would "
                     f"not be used. Empty it ({_empty_hint(data_config)}) or use config.data.split.mode='folders'.")
  used = {}  # what a split selects -> (its role, its key)
  for role in ROLES:
    if _names_nothing(data_config, names[role]) or (role == "val" and _split_mode(data_config) == "images"):
      continue
    key = _key(data_config, role, names[role])
    for item in _selection(data_config, names[role]):
      other_role, other = used.setdefault(item, (role, key))
      if other_role != role:
        raise ValueError(f"{other} and {key} both select {_describe_item(item)}: images used by one split must not "
                         "appear in another (training images would be scored, or chosen thresholds overfit). Make "
                         "the splits disjoint; config.data.split.mode='images' holds out validation images from the "
                         "training split.")


def check_test_split(data_config) -> None:
  """Raises a ValueError naming the keys when the test split names no image: training ends by predicting and scoring
  it, so such a run would train fully and then fail."""
  split = data_config.get("test_split", "")
  if data_config.source == "synthetic" and data_config.synthetic.get("num_test", 1) < 1:
    raise ValueError(f"config.data.synthetic.num_test={data_config.synthetic.num_test}: training ends by scoring the "
                     "test images, so generate at least one (--config.data.synthetic.num_test=1).")
  if _names_nothing(data_config, split):
    raise ValueError(f"the test split names no images ({_key(data_config, 'test', split)}): training ends by "
                     "predicting and scoring the test images. Name a labelled test split.")


def _split_mode(data_config) -> str:
  split_config = data_config.get("split")
  return split_config.mode if split_config is not None else "folders"


def _source_split(data_config, workdir, split: str, *, progress: bool) -> list[prepare.PreparedImage]:
  """The prepared images `split` names in the configured source (no by-image holdout)."""
  if _names_nothing(data_config, split):
    return []
  if data_config.source == "tfds":
    return _tfds_split(data_config, workdir, split, progress=progress)
  if data_config.source == "tensorstore":
    from urisc_jax.data import volume_source  # pylint: disable=g-import-not-at-top
    image, label = _tensorstore(data_config, split)
    return volume_source.split_sections(image, label, split=split, membrane=data_config.membrane,
                                        threshold=data_config.label_threshold)
  root = release_root(data_config, workdir) if data_config.source != "folders" else None
  if data_config.source in ("synthetic", "urisc"):
    pairs = sources.urisc_pairs(root, track=data_config.track, split=split)
  elif data_config.source == "isbi":
    selection = _isbi_selection(data_config, split)
    volume, indices = parse_slices(selection, key=f"config.data.isbi.{split}")
    pairs = sources.isbi_slices(root, indices, volume=volume, key=f"config.data.isbi.{split}={selection!r}")
  else:
    images, labels = _folders(data_config, split)
    pairs = sources.folder_pairs(images, labels or None)
  return prepare.prepare_pairs(pairs, cache_dir(data_config, workdir), membrane=data_config.membrane,
                               threshold=data_config.label_threshold, progress=progress)


def _names_nothing(data_config, split: str) -> bool:
  if not split:
    return True
  if data_config.source == "isbi":
    return not parse_slices(_isbi_selection(data_config, split), key=f"config.data.isbi.{split}")[1]
  if data_config.source == "folders":
    return not _folders(data_config, split)[0]
  if data_config.source == "tensorstore":
    return not _tensorstore(data_config, split)[0]
  return False


def _key(data_config, role: str, split: str) -> str:
  """The config keys that say what the split of `role` selects, for messages."""
  name = f"config.data.{role}_split={split!r}"
  if data_config.source == "isbi":
    return f"{name} (config.data.isbi.{split}={_isbi_selection(data_config, split)!r})"
  if data_config.source == "folders":
    return f"{name} (config.data.folders.{split}_images={_folders(data_config, split)[0]!r})"
  if data_config.source == "tensorstore" and split:
    image, label = _tensorstore(data_config, split)
    return f"{name} (config.data.tensorstore.{split}.image={image!r}, .label={label!r})"
  return name


def _selection(data_config, split: str) -> list[tuple]:
  """Comparable items `split` selects: (volume, slice) for ISBI, the images folder or the split name otherwise."""
  if data_config.source == "isbi":
    volume, indices = parse_slices(_isbi_selection(data_config, split), key=f"config.data.isbi.{split}")
    return [("slice", volume, index) for index in indices]
  if data_config.source == "folders":
    return [("folder", str(pathlib.Path(_folders(data_config, split)[0]).resolve()))]
  if data_config.source == "tensorstore":
    return [("volume", _same_volume(_tensorstore(data_config, split)[0]))]
  return [("split", split)]


def _same_volume(text: str) -> str:
  """A volume's text as compared between splits: a local path (or file:// URL) resolved, so that "a.zarr",
  "./a.zarr" and "file:///abs/a.zarr" are one volume; URLs of other schemes and JSON specs as written."""
  text = str(text).strip()
  if text.startswith("{") or ("://" in text and not text.startswith("file://")):
    return text
  return str(pathlib.Path(text.removeprefix("file://")).expanduser().resolve())


def _describe_item(item: tuple) -> str:
  if item[0] == "slice":
    return f"{item[1]} slice {item[2]}"
  if item[0] == "volume":
    return f"the volume {item[1]}"
  return f"{item[0]} {item[1]}"


def _empty_hint(data_config) -> str:
  if data_config.source == "isbi":
    return f"config.data.isbi.{data_config.val_split}=''"
  if data_config.source == "folders":
    return f"config.data.folders.{data_config.val_split}_images=''"
  return "config.data.val_split=''"


def _isbi_selection(data_config, split: str) -> str:
  isbi = data_config.get("isbi")
  if isbi is None or split not in isbi:
    known = sorted(isbi.keys()) if isbi is not None else []
    raise ValueError(f"config.data.source='isbi' selects the slices of split {split!r} with config.data.isbi.{split}, "
                     f"which does not exist (keys: {known}). Name the splits after those keys, e.g. "
                     "config.data.train_split='train' with config.data.isbi.train='0-19'.")
  return isbi[split]


def _folders(data_config, split: str) -> tuple[str, str]:
  folders = data_config.get("folders")
  key = f"{split}_images"
  if folders is None or key not in folders:
    raise ValueError(f"config.data.source='folders' reads split {split!r} from config.data.folders.{key} (and "
                     f"{split}_labels), which does not exist. Name the splits train, val and test, or add the keys.")
  return folders[key], folders.get(f"{split}_labels", "")


def _tensorstore(data_config, split: str) -> tuple[str, str]:
  """(image volume, label volume) of a split of the "tensorstore" source."""
  volumes = data_config.get("tensorstore")
  if volumes is None or split not in volumes:
    raise ValueError(f"config.data.source='tensorstore' reads split {split!r} from config.data.tensorstore.{split}"
                     ".image (and .label), which does not exist. Name the splits train, val and test, or add the keys.")
  return volumes[split].image, volumes[split].get("label", "")


def _tfds_split(data_config, workdir, split: str, *, progress: bool) -> list[prepare.PreparedImage]:
  """Records of a TFDS split, built from config.data.root on first use, decoded into the prepare cache."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow import, only for this source
  from urisc_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top  # registers the builders

  name = data_config.tfds.name
  if name not in TFDS_NAMES:
    raise ValueError(f"Unknown config.data.tfds.name {name!r}: choose one of {TFDS_NAMES}.")
  data_dir = pathlib.Path(data_config.tfds.data_dir or pathlib.Path(workdir) / "tfds")
  if not tfds.builder(name, data_dir=str(data_dir)).is_prepared():
    if not data_config.root:
      raise sources.MissingDataError(
          f"TFDS dataset {name} is not built in {data_dir}: pass --config.data.root=PATH, its manual download folder "
          "(see urisc_jax/data/tfds_builders.py), to build it, or point config.data.tfds.data_dir at a built copy.")
    tfds_builders.build(name, manual_dir=data_config.root, data_dir=data_dir)
  try:
    source = tfds.data_source(name, data_dir=str(data_dir), split=split)
  except ValueError as e:
    raise ValueError(f"TFDS dataset {name} in {data_dir} cannot give split {split!r}: {e} Set config.data."
                     "{train,val,test}_split to TFDS split strings such as 'train', 'test' or 'train[:20]'.") from None
  return tfds_builders.prepare_records(source, cache_dir(data_config, workdir), progress=progress)
