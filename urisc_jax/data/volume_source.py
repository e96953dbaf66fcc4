"""Training data read from chunked volumes through TensorStore (`config.data.source = "tensorstore"`).

A split names an image volume and its label volume (`config.data.tensorstore.<split>.image` / `.label`: anything
`volumes.open_input` opens: a zarr / N5 / precomputed path, a file:// URL or a TensorStore JSON spec); every section
of the volume becomes one image of the split. Nothing is decoded up front: random and grid crops read just their
window through TensorStore (a bounded chunk cache per open volume, `volumes.INPUT_CACHE_BYTES`), in the same Grain
pipeline as cached images (`pipeline.CropExamples`: deterministic by seed, iterator state checkpointed).

Labels are decoded per window as label files are (`sources.membrane_mask_of`): 0/255 with `config.data.membrane`,
or gray levels with `config.data.label_threshold`.
"""

import dataclasses

import numpy as np

from urisc_jax import volumes
from urisc_jax.data import imageio, sources
from urisc_jax.data.windows import _mirror  # pylint: disable=protected-access


class TensorStoreWindows:
  """Reads windows of one section of a volume, with the interface of `windows.NpyWindows` (read, view, shape).

  Opens the volume lazily in the process that reads (picklable before first use: Grain workers open their own).
  """

  def __init__(self, volume: volumes.InputVolume, z: int, *, label: dict | None = None):
    self.volume, self.z, self.label = volume, z, label
    self._reader = None

  def __getstate__(self):
    return {"volume": self.volume, "z": self.z, "label": self.label, "_reader": None}

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.volume.shape[1:])

  def _read_inside(self, top: int, left: int, height: int, width: int) -> np.ndarray:
    if self._reader is None:
      self._reader = volumes.SectionReader(self.volume)
    gray = self._reader.read(self.z, slice(top, top + height), slice(left, left + width))
    if self.label is None:
      return gray
    return sources.membrane_mask_of(gray, f"{self.label['what']} (section {self.z})", membrane=self.label["membrane"],
                                    threshold=self.label["threshold"]).astype(np.uint8)

  def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
    """A copy of rows [top, top + height) x columns [left, left + width); parts outside mirror the section (as
    `NpyWindows.read`: row -1 is row 1)."""
    rows, cols = self.shape
    if 0 <= top and top + height <= rows and 0 <= left and left + width <= cols:
      return self._read_inside(top, left, height, width)
    row_index = _mirror(np.arange(top, top + height), rows)
    col_index = _mirror(np.arange(left, left + width), cols)
    r0, c0 = int(row_index.min()), int(col_index.min())
    box = self._read_inside(r0, c0, int(row_index.max()) + 1 - r0, int(col_index.max()) + 1 - c0)
    return box[(row_index - r0)[:, None], (col_index - c0)[None, :]]

  def view(self, top: int, left: int, height: int, width: int) -> np.ndarray:
    return self.read(top, left, height, width)


@dataclasses.dataclass(frozen=True)
class VolumeSection:
  """One section of a volume as an image of a split: the interface of `prepare.PreparedImage` (name, shape,
  image(), label(), official_label(), label_path None when unlabelled) plus `windows()` for the crop pipeline."""
  name: str
  shape: tuple[int, int]
  image_volume: volumes.InputVolume
  label_volume: volumes.InputVolume | None
  z: int
  source_image: str
  source_label: str | None
  membrane: str = "black"
  threshold: int | None = None
  source_page: int | None = None

  @property
  def image_path(self) -> str:
    return f"{self.source_image}#{self.z}"

  @property
  def label_path(self) -> str | None:
    return None if self.label_volume is None else f"{self.source_label}#{self.z}"

  def windows(self) -> tuple[TensorStoreWindows, TensorStoreWindows | None]:
    image = TensorStoreWindows(self.image_volume, self.z)
    if self.label_volume is None:
      return image, None
    decode = {"what": self.source_label, "membrane": self.membrane, "threshold": self.threshold}
    return image, TensorStoreWindows(self.label_volume, self.z, label=decode)

  def _check_whole(self, source: str, volume: volumes.InputVolume) -> None:
    """Refuses, before reading, a section above the pixel cap of every image read (config.data.max_image_pixels):
    a volume's declared shape costs nothing to write (a sparse 40000^2 volume is a few KB) and a whole read
    allocates all of it."""
    imageio.check_pixels(f"the volume {source} of shape {tuple(volume.shape)} (sections, rows, columns)",
                         self.shape[1], self.shape[0], what=f"section (section {self.z}, read whole to be predicted)")

  def image(self) -> np.ndarray:
    """uint8 [H, W]: the whole section (validation and test images are predicted whole)."""
    self._check_whole(self.source_image, self.image_volume)
    return self.windows()[0].read(0, 0, *self.shape)

  def label(self) -> np.ndarray:
    """uint8 [H, W], 1 = membrane."""
    if self.label_volume is None:
      raise ValueError(f"Section {self.z} of {self.source_image} has no label volume.")
    self._check_whole(self.source_label, self.label_volume)
    return self.windows()[1].read(0, 0, *self.shape)

  def official_label(self) -> np.ndarray:
    """uint8 [H, W] as the official scorer reads it: 0 = membrane, 255 = background."""
    return np.where(self.label() != 0, np.uint8(0), np.uint8(255))


def split_sections(image_text: str, label_text: str, *, split: str, membrane: str = "black",
                   threshold: int | None = None) -> list[VolumeSection]:
  """The sections of an image volume (and its label volume, "" = unlabelled) as the images of `split`."""
  image = volumes.open_input(image_text)
  label = volumes.open_input(label_text) if label_text else None
  if label is not None and label.shape != image.shape:
    raise volumes.VolumeError(f"config.data.tensorstore.{split}: the image volume {image_text} is {image.shape} "
                              f"(sections, rows, columns) but the label volume {label_text} is {label.shape}; they "
                              "must match.")
  return [VolumeSection(name=f"{split}_{z:04d}", shape=tuple(image.shape[1:]), image_volume=image,
                        label_volume=label, z=z, source_image=str(image_text),
                        source_label=str(label_text) if label_text else None, membrane=membrane,
                        threshold=threshold, source_page=z)
          for z in range(image.shape[0])]
