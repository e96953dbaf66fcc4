"""Resolution matching: a model sees every input at the pixel size it was trained at.

A membrane detector learns membranes a few pixels wide. Given an image recorded at another pixel size (ISBI 2012 at
4 nm for a model trained on U-RISC at 2.18 nm, or a downsampled copy), the same membranes are narrower or wider in
pixels and the model's response degrades. Matching resamples the input by p_input / p_train to the training pixel
size, predicts there, and resamples the probability map back to the input's grid (anti-aliased both ways:
`data/resample.py`), so the submission has the input's shape.

Pixel sizes: the training data's is `config.data.pixel_nm`; an input's is `config.predict.input_pixel_nm` or, when
that is unset, read from the file (`pixel_size_nm`: TIFF resolution tags or ImageJ metadata, OME-Zarr
multiscales), else taken to equal the training data's (no resampling).
"""

import json
import math
import pathlib

import numpy as np

from urisc_jax.data import resample

# Nanometres per unit, for the unit names TIFF, ImageJ and OME-NGFF use.
_NM_PER_UNIT = {"nm": 1.0, "nanometer": 1.0, "um": 1e3, "µm": 1e3, "\\u00B5m": 1e3, "micron": 1e3,
                "micrometer": 1e3, "mm": 1e6, "millimeter": 1e6, "cm": 1e7, "centimeter": 1e7, "m": 1e9,
                "meter": 1e9, "inch": 2.54e7}
# TIFF ResolutionUnit: 2 = inch, 3 = centimetre (1 = none: no physical size).
_TIFF_UNITS = {2: "inch", 3: "cm"}


def _nm(value: float, unit: str | None) -> float | None:
  """`value` in `unit` as nanometres; None for an unknown unit or a non-positive value."""
  factor = _NM_PER_UNIT.get((unit or "").strip().lower())
  return None if factor is None or not value > 0 else float(value) * factor


def to_nm(value: float, unit: str | None) -> float | None:
  """A pixel size `value` in `unit` (the unit names of TIFF, ImageJ and OME-NGFF) as nm; None when unknown."""
  return _nm(value, unit)


def _ome_zarr_pixel_nm(folder: pathlib.Path) -> float | None:
  """Pixel size (nm) of the finest level of an OME-Zarr image (v0.4 .zattrs or v0.5 zarr.json), from its y axis."""
  for name in ("zarr.json", ".zattrs"):
    path = folder / name
    if not path.is_file():
      continue
    attributes = json.loads(path.read_text())
    attributes = attributes.get("attributes", attributes)  # v0.5 keeps them under "attributes" / "ome"
    attributes = attributes.get("ome", attributes)
    multiscales = attributes.get("multiscales") or [{}]
    axes = multiscales[0].get("axes", [])
    datasets = multiscales[0].get("datasets") or [{}]
    scales = [t for t in datasets[0].get("coordinateTransformations", []) if t.get("type") == "scale"]
    names = [a["name"] if isinstance(a, dict) else a for a in axes]
    if not scales or "y" not in names:
      return None
    y = names.index("y")
    return _nm(scales[0]["scale"][y], axes[y].get("unit") if isinstance(axes[y], dict) else None)
  return None


def _tiff_pixel_nm(path: pathlib.Path) -> float | None:
  """Pixel size (nm) from ImageJ metadata (unit + YResolution) or the TIFF resolution tags, if they give one."""
  import tifffile  # pylint: disable=g-import-not-at-top

  with tifffile.TiffFile(path) as tif:
    page = tif.pages[0]
    tags = page.tags
    resolution = tags.get("YResolution") or tags.get("XResolution")
    if resolution is None:
      return None
    numerator, denominator = resolution.value
    if not numerator:
      return None
    per_unit = numerator / denominator  # pixels per unit
    imagej = tif.imagej_metadata or {}
    if imagej.get("unit"):
      return _nm(1.0 / per_unit, str(imagej["unit"]))
    unit = _TIFF_UNITS.get(int(getattr(tags.get("ResolutionUnit"), "value", 1)))
    return None if unit is None else _nm(1.0 / per_unit, unit)


def pixel_size_nm(path) -> float | None:
  """The pixel size in nm an image file or OME-Zarr folder records, or None when it records none."""
  path = pathlib.Path(path)
  if path.is_dir():
    return _ome_zarr_pixel_nm(path)
  if path.suffix.lower() in (".tif", ".tiff"):
    try:
      return _tiff_pixel_nm(path)
    except (OSError, ValueError, KeyError, TypeError):
      return None
  return None


def scale_factor(input_pixel_nm: float | None, train_pixel_nm: float | None) -> float:
  """How much to enlarge an input to reach the training pixel size: input_pixel_nm / train_pixel_nm (1 if either is
  unknown)."""
  if input_pixel_nm is None or train_pixel_nm is None:
    return 1.0
  if not (input_pixel_nm > 0 and train_pixel_nm > 0):
    raise ValueError(f"Pixel sizes must be positive, got input {input_pixel_nm} nm and training {train_pixel_nm} nm.")
  return float(input_pixel_nm) / float(train_pixel_nm)


def matched_probabilities(predict_fn, image: np.ndarray, factor: float) -> np.ndarray:
  """float32 [H, W]: `predict_fn(image at the training pixel size)` resampled back to the image's grid.

  Args:
    predict_fn: gray uint8 [h, w] -> probability float32 [h, w] (e.g. sliding-window prediction).
    image: gray uint8 [H, W] at its own pixel size.
    factor: input pixel size / training pixel size (`scale_factor`); 1 predicts the image as it is.
  """
  if math.isclose(factor, 1.0, rel_tol=1e-6):
    return predict_fn(image)
  shape = resample.scaled_shape(image.shape, factor)
  probability = predict_fn(resample.resize_gray(image, shape))
  return np.clip(resample.resize(probability, image.shape), 0.0, 1.0)
