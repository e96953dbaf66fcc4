"""tensorflow-datasets builders `urisc` and `isbi2012`: array_record files read with `tfds.data_source`, no TensorFlow.

Neither dataset can be downloaded by a script (U-RISC sits behind Google Drive / MEGA / Baidu links, ISBI 2012 behind
the challenge's registration), so both builders read a folder the user filled by hand (the manual download folder):
  - `urisc/track1`, `urisc/track2`: the unpacked U-RISC release (imgs/ and label/); Track 2 labels are binarized at
    gray <= 122 like the competitors did. Splits: whichever of train / val / test the release holds.
  - `isbi2012`: the challenge's stacks (train-volume.tif, train-labels.tif, test-volume.tif) or the per-slice layout
    (train/images, train/labels, test/images). Splits: train and test.
One record per image: {"name": the file stem, "image": uint8 [H, W], "label": uint8 [H, W] with 1 = membrane (empty
[0, 0] for unlabelled test images), "has_label": bool}; pixel arrays are zlib-compressed. Building needs only numpy
and Pillow; `tfds.load` / `as_dataset` would need TensorFlow, so read with `tfds.data_source`:

    from urisc_jax.data import tfds_builders
    tfds_builders.build("urisc/track1", manual_dir=RELEASE, data_dir=DATA_DIR)
    source = tfds.data_source("urisc/track1", data_dir=DATA_DIR, split="train")
    images = tfds_builders.prepare_records(source, cache_dir)  # -> pipeline.CropExamples(images, ...)
"""

import dataclasses
import hashlib
import inspect
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm import tqdm

from urisc_jax.data import prepare, sources

_RECORD_KEY_VERSION = "1"


def _features() -> tfds.features.FeaturesDict:
  pixels = dict(shape=(None, None), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB)
  return tfds.features.FeaturesDict({
      "name": tfds.features.Text(),
      "image": tfds.features.Tensor(**pixels),
      "label": tfds.features.Tensor(**pixels),
      "has_label": tfds.features.Tensor(shape=(), dtype=np.bool_),
  })


def _record(name: str, image: np.ndarray, mask: np.ndarray | None) -> dict:
  label = np.zeros((0, 0), np.uint8) if mask is None else np.asarray(mask, np.uint8)
  return {"name": name, "image": np.asarray(image, np.uint8), "label": label, "has_label": mask is not None}


class _ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common ground: array_record files by default, records in file order."""

  def __init__(self, *, file_format: str | None = None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup imports the optional `importlib_resources` package for builders outside its tree.
    return epath.Path(inspect.getfile(cls))

  def _dataset_info(self, description: str) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=description, features=_features(),
                                 disable_shuffling=True)

  def _manual_root(self, dl_manager) -> pathlib.Path:
    return pathlib.Path(os.fspath(dl_manager.manual_dir))


@dataclasses.dataclass(eq=False)
class UriscConfig(tfds.core.BuilderConfig):
  """Which U-RISC track to read, and how to binarize its labels (None = binary labels only)."""
  track: str = "Track1"
  threshold: int | None = None


class Urisc(_ManualBuilder):
  """U-RISC (Shi et al. 2022): 9958 x 9959 px (Track 1) or 1024 x 1024 px (Track 2) EM images with membrane labels."""

  name = "urisc"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Track 1 and Track 2 of the release, labels as membrane masks."}
  BUILDER_CONFIGS = [
      UriscConfig(name="track1", track="Track1", threshold=None,
                  description="Track 1: original-size images, binary labels."),
      UriscConfig(name="track2", track="Track2", threshold=sources.TRACK2_THRESHOLD,
                  description="Track 2: 1024 x 1024 images; interpolated labels binarized at gray <= 122."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the U-RISC release (links in the README of github.com/EmmaSRH/U-RISC-Data-Code), unpack it and pass the
  folder that holds imgs/ and label/ as the manual download folder (DownloadConfig(manual_dir=...)).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self._dataset_info("U-RISC: annotated ultra-high-resolution EM images of the rabbit retina (RC1), cell "
                              "membranes labelled (1 = membrane).")

  def _split_generators(self, dl_manager):
    root = self._manual_root(dl_manager)
    track_dir = root / "imgs" / self.builder_config.track
    if not track_dir.is_dir():
      # Let the reader raise its message naming what is missing.
      sources.urisc_pairs(root, track=self.builder_config.track, split=None)
    splits = [s for s in ("train", "val", "test") if (track_dir / s).is_dir()]
    if not splits:
      return {"train": self._generate_examples(root, None)}
    return {split: self._generate_examples(root, split) for split in splits}

  def _generate_examples(self, root: pathlib.Path, split: str | None):
    pairs = sources.urisc_pairs(root, track=self.builder_config.track, split=split, require_labels=split == "train")
    for pair in pairs:
      image, mask = sources.load_pair(pair, threshold=self.builder_config.threshold)
      yield pair.name, _record(pair.name, image, mask)


class Isbi2012(_ManualBuilder):
  """ISBI 2012 EM segmentation challenge: 30 + 30 slices of 512 x 512 px (Drosophila VNC, ssTEM)."""

  name = "isbi2012"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Training slices with membrane masks, unlabelled test slices."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Pass as the manual download folder either the challenge's stacks (train-volume.tif, train-labels.tif,
  test-volume.tif) or per-slice files (train/images/NN.png, train/labels/NN.png, test/images/NN.png).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self._dataset_info("ISBI 2012: serial-section TEM of the Drosophila first-instar larva ventral nerve cord, "
                              "membranes labelled (1 = membrane).")

  def _split_generators(self, dl_manager):
    root = self._manual_root(dl_manager)
    stacks = (root / sources.ISBI_STACKS["train"][0]).is_file()
    present = [s for s in ("train", "test")
               if (root / sources.ISBI_STACKS[s][0]).is_file() or (root / s / "images").is_dir()]
    if "train" not in present:
      raise sources.MissingDataError(
          f"{root} holds neither train-volume.tif nor train/images/; see the manual download instructions.")
    return {split: self._generate_examples(root, split, stacks) for split in present}

  def _generate_examples(self, root: pathlib.Path, split: str, stacks: bool):
    if stacks:
      for pair in sources.isbi_stack_pairs(root, split=split):
        image, mask = sources.load_stack_slice(pair)
        yield pair.name, _record(pair.name, image, mask)
    else:
      for pair in sources.isbi_pairs(root, split=split):
        image, mask = sources.load_pair(pair)
        yield pair.name, _record(pair.name, image, mask)


def build(name: str, *, manual_dir: str | os.PathLike, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
  """Builds dataset `name` ("urisc/track1", "urisc/track2" or "isbi2012") from a manual download folder.

  Returns:
    The builder; its data is then readable with tfds.data_source(name, data_dir=data_dir, split=...).
  """
  builder = tfds.builder(name, data_dir=os.fspath(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return builder


def prepare_records(source, cache_dir: str | os.PathLike, *, progress: bool = True) -> list[prepare.PreparedImage]:
  """Decodes the records of a `tfds.data_source` into the decode-once cache, for `pipeline.CropExamples`.

  An entry is keyed by the record's serialized bytes, so a re-run finds its entries without decompressing the pixels.

  Args:
    source: what tfds.data_source(...) returned for one split.
    cache_dir: the prepare cache folder.
    progress: show a progress bar.

  Returns:
    One PreparedImage per record, in record order.
  """
  cache_dir = pathlib.Path(cache_dir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  info = source.dataset_info
  where = f"tfds:{info.full_name}/{source.split}"
  raw_records = getattr(source, "data_source", None)
  prepared = []
  for index in tqdm(range(len(source)), desc="prepare", unit="record", disable=not progress or len(source) < 2):
    digest = hashlib.sha256(f"{_RECORD_KEY_VERSION}|{info.full_name}".encode())
    if raw_records is not None:
      digest.update(raw_records[index])
      record = None
    else:
      record = source[index]
      for field in ("image", "label"):
        digest.update(np.ascontiguousarray(record[field]).tobytes())
    key = digest.hexdigest()[:32]
    metadata = prepare.entry_metadata(cache_dir, key)
    if metadata is None:
      record = record if record is not None else source[index]
      metadata = {"name": _text(record["name"]), "has_label": bool(record["has_label"])}
    decode = lambda record=record, index=index: _arrays(record if record is not None else source[index])
    prepared.append(prepare.cached_entry(
        cache_dir, key, decode, name=metadata["name"], source_image=f"{where}[{index}]",
        source_label=f"{where}[{index}]" if metadata["has_label"] else None, metadata=metadata))
  return prepared


def _arrays(record: dict) -> tuple[np.ndarray, np.ndarray | None]:
  image = np.asarray(record["image"], np.uint8)
  return image, (np.asarray(record["label"]).astype(bool) if bool(record["has_label"]) else None)


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)
