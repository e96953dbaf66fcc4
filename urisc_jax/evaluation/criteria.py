"""Image definition (sharpness) criteria, and the Track 1 -> Track 2 downsampling they were used to judge.

The U-RISC paper compares the definition of the original 9958 x 9959 images (Track 1) with their 1024 x 1024
downsampled versions (Track 2) using four classic focus measures. With f(x, y) the gray value at column x and row y
of an H x W image and mu its mean, each criterion here is the mean of its terms, so images of different sizes
compare (the raw sums grow with the pixel count):

  Brenner   = mean over H x (W - 2) terms of (f(x + 2, y) - f(x, y))^2
  SMD2      = mean over (H - 1) x (W - 1) terms of |f(x, y) - f(x + 1, y)| * |f(x, y) - f(x, y + 1)|
  Variance  = mean over H x W terms of (f(x, y) - mu)^2                       (population variance)
  Vollath   = mean over H x (W - 1) terms of f(x, y) * f(x + 1, y)  -  mu^2   (the sum form minus M N mu^2, per term)

Values are in the image's own gray units (0..255 for 8-bit images), accumulated in float64 over row blocks so a
full-size U-RISC image needs little extra memory; for 8-bit images every partial sum is an integer below 2^53, so
the sums are exact.

Downsampling uses Pillow's resampling filters ("area" = BOX, "bilinear", "bicubic", "lanczos"). Pillow widens each
filter by the reduction factor, so all four average over the source pixels they cover (antialiased), unlike
OpenCV's INTER_LINEAR, which samples the 2 x 2 nearest source pixels.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from urisc_jax.evaluation import f1 as f1_lib
from urisc_jax import outputs

CRITERIA = ("brenner", "smd2", "variance", "vollath")
METHODS = ("area", "bilinear", "bicubic", "lanczos")
TRACK2_SIZE = (1024, 1024)
# Rows per block when accumulating sums: bounds the float64 temporaries to a few hundred MB on 10k-wide images.
_BLOCK_ROWS = 1024


def _as_float_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3 and image.dtype == np.uint8:
    image = f1_lib.to_gray8(image, name="image")  # equal-channel RGB -> gray
  if image.ndim != 2:
    raise ValueError(f"expected a gray image [H, W], got shape {image.shape}")
  if image.shape[0] < 2 or image.shape[1] < 3:
    raise ValueError(f"the criteria need an image of at least 2 x 3 pixels, got {image.shape}")
  if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
    raise ValueError(f"expected integer or float gray values, got dtype {image.dtype}")
  return image


def _blocks(height: int, overlap: int) -> Iterable[tuple[int, int]]:
  """Row ranges [r0, r1) covering 0..height, each extended by `overlap` rows below (clipped)."""
  for r0 in range(0, height, _BLOCK_ROWS):
    yield r0, min(r0 + _BLOCK_ROWS + overlap, height)


def brenner(image: np.ndarray) -> float:
  """Brenner gradient per term: mean of (f(x + 2, y) - f(x, y))^2, x along columns. image: [H, W]."""
  image = _as_float_image(image)
  total = 0.0
  for r0, r1 in _blocks(image.shape[0], 0):
    block = image[r0:r1].astype(np.float64)
    diff = block[:, 2:] - block[:, :-2]
    total += float(np.sum(diff * diff))
  return total / (image.shape[0] * (image.shape[1] - 2))


def smd2(image: np.ndarray) -> float:
  """SMD2 per term: mean of |f(x, y) - f(x + 1, y)| * |f(x, y) - f(x, y + 1)|. image: [H, W]."""
  image = _as_float_image(image)
  height, width = image.shape
  total = 0.0
  for r0, r1 in _blocks(height, 1):
    block = image[r0:r1].astype(np.float64)
    rows = min(_BLOCK_ROWS, height - 1 - r0)  # terms need the row below
    if rows <= 0:
      break
    here = block[:rows, :-1]
    total += float(np.sum(np.abs(here - block[:rows, 1:]) * np.abs(here - block[1:rows + 1, :-1])))
  return total / ((height - 1) * (width - 1))


def _mean(image: np.ndarray) -> float:
  total = 0.0
  for r0, r1 in _blocks(image.shape[0], 0):
    total += float(np.sum(image[r0:r1], dtype=np.float64))
  return total / image.size


def variance(image: np.ndarray) -> float:
  """Population variance of the gray values (two passes, float64). image: [H, W]."""
  image = _as_float_image(image)
  mu = _mean(image)
  total = 0.0
  for r0, r1 in _blocks(image.shape[0], 0):
    centered = image[r0:r1].astype(np.float64) - mu
    total += float(np.sum(centered * centered))
  return total / image.size


def vollath(image: np.ndarray) -> float:
  """Vollath F5 per term: mean of f(x, y) * f(x + 1, y) minus mu^2. image: [H, W]."""
  image = _as_float_image(image)
  mu = _mean(image)
  total = 0.0
  for r0, r1 in _blocks(image.shape[0], 0):
    block = image[r0:r1].astype(np.float64)
    total += float(np.sum(block[:, :-1] * block[:, 1:]))
  return total / (image.shape[0] * (image.shape[1] - 1)) - mu * mu


def image_criteria(image: np.ndarray) -> dict[str, float]:
  """All four criteria of one gray image [H, W]: {"brenner", "smd2", "variance", "vollath"}."""
  return {"brenner": brenner(image), "smd2": smd2(image), "variance": variance(image), "vollath": vollath(image)}


def criteria_table(images: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
  """One row per named gray image: {"name", "height", "width", "brenner", "smd2", "variance", "vollath"}."""
  rows = []
  for name, image in images.items():
    image = np.asarray(image)
    rows.append({"name": name, "height": int(image.shape[0]), "width": int(image.shape[1]),
                 **image_criteria(image)})
  return rows


def downsample(image: np.ndarray, size: Sequence[int] = TRACK2_SIZE, method: str = "area") -> np.ndarray:
  """Resizes a gray image the way Track 2 images are made from Track 1 images.

  Args:
    image: uint8 [H, W] (or equal-channel [H, W, 3]) or float [H, W].
    size: output (height, width); Track 2 is (1024, 1024).
    method: "area" (Pillow BOX), "bilinear", "bicubic" or "lanczos" (Pillow filters, antialiased).

  Returns:
    [height, width] array, uint8 for uint8 input (rounded), float32 for float input.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  filters = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
  if method not in filters:
    raise ValueError(f"method must be one of {tuple(filters)}, got {method!r}")
  height, width = (int(s) for s in size)
  if height < 1 or width < 1:
    raise ValueError(f"size must be positive (height, width), got {tuple(size)}")
  image = np.asarray(image)
  if image.dtype == np.uint8:
    pil_image = Image.fromarray(f1_lib.to_gray8(image, name="image"))
  elif np.issubdtype(image.dtype, np.floating) and image.ndim == 2:
    pil_image = Image.fromarray(image.astype(np.float32))
  else:
    raise ValueError(f"expected a uint8 or float gray image [H, W], got dtype {image.dtype} shape {image.shape}")
  return np.asarray(pil_image.resize((width, height), resample=filters[method]))


def _markdown(rows: Sequence[Mapping[str, Any]], size: Sequence[int]) -> str:
  lines = [
      f"# Image definition: original vs downsampled to {size[0]} x {size[1]}",
      "",
      "Per-term means (see urisc_jax/evaluation/criteria.py); gray units 0..255.",
      "",
      "| image | version | size | Brenner | SMD2 | Variance | Vollath |",
      "|---|---|---|---:|---:|---:|---:|",
  ]
  for row in rows:
    lines.append(f"| {row['image']} | {row['version']} | {row['height']} x {row['width']} | {row['brenner']:.4f} | "
                 f"{row['smd2']:.4f} | {row['variance']:.4f} | {row['vollath']:.4f} |")
  return "\n".join(lines) + "\n"


def _figure(summary: Mapping[str, Mapping[str, Any]], path: pathlib.Path) -> None:
  # The object-oriented Agg API writes files without touching pyplot's global backend.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  versions = list(summary)
  figure = Figure(figsize=(3.2 * len(CRITERIA), 3.4), layout="constrained")
  FigureCanvasAgg(figure)
  for axis, criterion in zip(figure.subplots(1, len(CRITERIA)), CRITERIA):
    means = [summary[v][criterion]["mean"] for v in versions]
    sems = [summary[v][criterion]["sem"] for v in versions]
    axis.bar(range(len(versions)), means, yerr=[0.0 if np.isnan(s) else s for s in sems],
             color=["0.3"] + ["C0"] * (len(versions) - 1), capsize=3)
    axis.set_xticks(range(len(versions)), versions, rotation=45, ha="right")
    axis.set_title(criterion)
  figure.suptitle("Image definition (mean +- s.e. over images)")
  with outputs.atomic_path(path) as tmp:
    figure.savefig(tmp, format="png", dpi=120)


def _named_loader(item) -> tuple[str, str, Callable[[], np.ndarray]]:
  """A path or a (name, load) pair -> (name, path or "", load)."""
  if isinstance(item, tuple):
    name, load = item
    return str(name), "", load
  path = pathlib.Path(item)
  return path.stem, str(path), functools.partial(f1_lib.read_gray8, path)


def compare_original_and_downsampled(images: Iterable[str | pathlib.Path | tuple[str, Callable[[], np.ndarray]]],
                                     out_dir: str | pathlib.Path, *, size: Sequence[int] = TRACK2_SIZE,
                                     methods: Sequence[str] = METHODS) -> dict[str, Any]:
  """Definition criteria of original images and their downsampled versions, written as JSON, Markdown and a figure.

  Args:
    images: 8-bit gray PNG / TIFF files (e.g. Track 1 images; RGB with equal channels is fine), or (name, load)
      pairs whose `load()` returns a uint8 [H, W] array (e.g. prepared stack slices); loaded one at a time.
    out_dir: folder for criteria.json, criteria.md and criteria.png (created if needed).
    size: downsampled (height, width), (1024, 1024) for Track 2.
    methods: downsampling methods to compare, from "area", "bilinear", "bicubic", "lanczos".

  Returns:
    {"size", "methods", "rows": [{"image", "path", "version", "height", "width", <criteria>}], "summary": {version:
     {criterion: {"mean", "sem"}}}, "files": {"json", "markdown", "figure"}}; version is "original" or a method,
    path is "" for arrays.
  """
  named = [_named_loader(item) for item in images]
  if not named:
    raise ValueError("no images given")
  methods = list(methods)
  for method in methods:
    if method not in METHODS:
      raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
  size = [int(s) for s in size]
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)

  rows = []
  for name, path, load in named:
    image = np.asarray(load())
    versions = {"original": image, **{m: downsample(image, size, m) for m in methods}}
    for version, pixels in versions.items():
      rows.append({"image": name, "path": path, "version": version, "height": int(pixels.shape[0]),
                   "width": int(pixels.shape[1]), **image_criteria(pixels)})

  summary = {}
  for version in ["original", *methods]:
    chosen = [row for row in rows if row["version"] == version]
    summary[version] = {}
    for criterion in CRITERIA:
      mean, sem = f1_lib.mean_and_sem(row[criterion] for row in chosen)
      summary[version][criterion] = {"mean": mean, "sem": sem}

  files = {"json": str(out_dir / "criteria.json"), "markdown": str(out_dir / "criteria.md"),
           "figure": str(out_dir / "criteria.png")}
  result = {"size": size, "methods": methods, "rows": rows, "summary": summary, "files": files}
  outputs.write_json(files["json"], result)
  outputs.write_text(files["markdown"], _markdown(rows, size))
  _figure(summary, pathlib.Path(files["figure"]))
  return result
