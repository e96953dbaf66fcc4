"""Resolution matching: a model sees every input at the pixel size it was trained at.

A membrane detector learns membranes a few pixels wide. Given an image recorded at another pixel size (ISBI 2012 at
4 nm for a model trained on U-RISC at 2.18 nm, or a downsampled copy), the same membranes are narrower or wider in
pixels and the model's response degrades. Matching resamples the input by p_input / p_train to the training pixel
size, predicts there, and resamples the probability map back to the input's grid (anti-aliased both ways:
`data/resample.py`), so the submission has the input's shape.

Pixel sizes: the training data's is `config.data.pixel_nm`; an input's is `config.predict.input_pixel_nm` or, when
that is unset, read from the file (`pixel_size_nm`: TIFF resolution tags or ImageJ metadata, OME-Zarr
multiscales), else taken to equal the training data's (no resampling).

A pixel size is a claim about the file, and a wrong one (a TIFF tag of 1 px/cm, a mistyped config value) would make
the resampled image gigabytes or a single pixel. `check_matched_shape` refuses both before any resampling: the
resampled image must fit the pixel cap of every read (config.data.max_image_pixels) and keep at least
MIN_MATCHED_SIDE pixels per side.
"""

import json
import math
import pathlib

import numpy as np

from urisc_jax import units
from urisc_jax.data import imageio, resample

# TIFF ResolutionUnit: 2 = inch, 3 = centimetre (1 = none: no physical size).
_TIFF_UNITS = {2: "inch", 3: "cm"}
# The smallest side an image may be resampled down to: below it the network sees no membrane of a few pixels' width
# in its context (a 1 x 1 image becomes one padded tile, a constant map). An image recorded that small is predicted
# as it is; only a resampling that shrinks it below this is refused.
MIN_MATCHED_SIDE = 32


class ResolutionError(imageio.DataError):
  """An input's pixel size would resample it beyond the pixel cap or below MIN_MATCHED_SIDE; names the fix."""


def to_nm(value: float, unit: str | None) -> float | None:
  """A pixel size `value` in `unit` (the unit names of TIFF, ImageJ and OME-NGFF) as nm; None when unknown."""
  return units.to_nm(value, unit)


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
    return to_nm(scales[0]["scale"][y], axes[y].get("unit") if isinstance(axes[y], dict) else None)
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
    if not denominator:
      raise imageio.DataError(
          f"{path} has a damaged resolution tag ({resolution.name} = {numerator}/{denominator}: a zero denominator), "
          "so its pixel size is unknown. Give the pixel size with --config.predict.input_pixel_nm=NM, or rewrite the "
          "file's resolution (e.g. in Fiji: Image > Properties).")
    per_unit = numerator / denominator  # pixels per unit
    imagej = tif.imagej_metadata or {}
    if imagej.get("unit"):
      return to_nm(1.0 / per_unit, str(imagej["unit"]))
    unit = _TIFF_UNITS.get(int(getattr(tags.get("ResolutionUnit"), "value", 1)))
    return None if unit is None else to_nm(1.0 / per_unit, unit)


def pixel_size_nm(path) -> float | None:
  """The pixel size in nm an image file or OME-Zarr folder records, or None when it records none."""
  path = pathlib.Path(path)
  if path.is_dir():
    return _ome_zarr_pixel_nm(path)
  if path.suffix.lower() in (".tif", ".tiff"):
    try:
      return _tiff_pixel_nm(path)
    except imageio.DataError:
      raise
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


def check_matched_shape(path, shape, factor: float, *, input_nm: float | None, train_nm: float | None,
                        origin: str, max_pixels: int | None = None) -> tuple[int, int]:
  """The shape `matched_probabilities` resamples an image of `shape` to, refused when it is unusable.

  Checked from the sizes alone, before anything is resampled: a pixel size is a claim about the file (or a config
  value) and a wrong one turns a 64 x 64 image into terabytes or into one pixel.

  Args:
    path: the image file, named in the error.
    shape: its (H, W).
    factor: `scale_factor(input_nm, train_nm)`.
    input_nm, train_nm: the two pixel sizes, for the message.
    origin: where input_nm came from ("config.predict.input_pixel_nm" or the file's metadata), for the message.
    max_pixels: the cap; None uses the one of every image read (config.data.max_image_pixels).

  Raises:
    ResolutionError: the resampled image would hold more pixels than the cap, or a side below MIN_MATCHED_SIDE
      (where the image's own side is not already below it).
  """
  height, width = (int(s) for s in shape[:2])
  if math.isclose(factor, 1.0, rel_tol=1e-6):
    return height, width
  cap = imageio.max_pixels() if max_pixels is None else int(max_pixels)
  claim = (f"{path}: its pixel size, {input_nm:g} nm ({origin}), is {factor:.4g} x the training data's {train_nm:g} "
           "nm (config.data.pixel_nm), so it is resampled for prediction")
  fix = ("If that pixel size is wrong, give the right one with --config.predict.input_pixel_nm=NM (or predict the "
         "image as it is with --config.predict.match_resolution=False)")
  sides = [s * factor for s in (height, width)]
  if not all(math.isfinite(s) for s in sides) or sides[0] * sides[1] > cap:
    new = f"{sides[1]:.3g} x {sides[0]:.3g}"  # width x height, as the image's size is given
    raise ResolutionError(
        f"{claim} from {width} x {height} to about {new} pixels ({sides[0] * sides[1]:.3g} pixels), more than the "
        f"limit of {cap:,} pixels of config.data.max_image_pixels; nothing was resampled. {fix}; if it is right, "
        f"raise --config.data.max_image_pixels to at least {math.ceil(sides[0] * sides[1])}.")
  new_height, new_width = resample.scaled_shape((height, width), factor)
  if min(new_height, new_width) < min(MIN_MATCHED_SIDE, height, width):
    raise ResolutionError(
        f"{claim} from {width} x {height} down to {new_width} x {new_height} pixels, below the {MIN_MATCHED_SIDE} "
        "pixels per side the network needs to see membranes (it would return a constant map). " + fix + ".")
  return new_height, new_width


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
  if shape[0] * shape[1] > imageio.max_pixels():  # callers check with the file's name first (check_matched_shape)
    raise ResolutionError(f"resampling a {image.shape[1]} x {image.shape[0]} image by {factor:.4g} would make "
                          f"{shape[1]} x {shape[0]} pixels, more than config.data.max_image_pixels="
                          f"{imageio.max_pixels()}; check the pixel size (config.predict.input_pixel_nm).")
  probability = predict_fn(resample.resize_gray(image, shape))
  return np.clip(resample.resize(probability, image.shape), 0.0, 1.0)
