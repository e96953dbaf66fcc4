"""Figures of attribution results, drawn with matplotlib's Agg canvas (no display, no pyplot state).

* `plot_figure8`: the paper's Figure 8 for one image: the image, the prediction and the annotation with each target
  pixel boxed in its outcome's colour, then the normalized attribution map of sampled targets (diverging colormap,
  symmetric limits [-1, 1] on a symmetric log scale, each map zoomed to where |w| > 0.01: red pushes the logit
  towards membrane, blue away from it).
* `plot_field_curves`: the paper's Figure 7B: mean S_k +- s.e. against k for several series (two datasets, or the
  outcomes of one).

Files are written atomically (a temporary name, then a rename).
"""

import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from urisc_jax import outputs
from urisc_jax.attribution.fields import OUTCOME_LABELS

# As the prediction overlays: true positives green, false positives red, false negatives blue.
OUTCOME_COLOURS = {"tp": "#00c000", "fp": "#ff2828", "fn": "#2878ff"}
ATTRIBUTION_CMAP = "RdBu_r"


def _save(fig: Figure, path: str | pathlib.Path, dpi: int) -> pathlib.Path:
  path = pathlib.Path(path)
  with outputs.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=dpi)
  return path


def _box(ax, row: float, col: float, size: float, outcome: str) -> None:
  ax.add_patch(Rectangle((col - size / 2, row - size / 2), size, size, fill=False, lw=1.2,
                         edgecolor=OUTCOME_COLOURS.get(outcome, "yellow")))


def _reduced(array: np.ndarray, step: int, *, any_of: bool) -> np.ndarray:
  """array [H, W] shrunk by `step` in blocks: the mean (gray) or any (masks, so thin membranes stay visible)."""
  if step == 1:
    return np.asarray(array)
  height, width = array.shape
  rows, cols = -(-height // step), -(-width // step)
  padded = np.zeros((rows * step, cols * step), np.float32)
  padded[:height, :width] = array
  blocks = padded.reshape(rows, step, cols, step)
  return blocks.max(axis=(1, 3)) if any_of else blocks.mean(axis=(1, 3))


# Most of a normalized field is far below 1: a symmetric log scale (linear within +-LINEAR_BELOW) shows where the
# weak but widespread attribution that S_k counts at small k lies.
LINEAR_BELOW = 0.01
_ATTRIBUTION_NORM = SymLogNorm(linthresh=LINEAR_BELOW, vmin=-1.0, vmax=1.0, base=10)


def zoom_window(field: np.ndarray, target: tuple[int, int], *, level: float = LINEAR_BELOW, margin: float = 0.25,
                min_size: int = 64) -> tuple[tuple[int, int], tuple[int, int]]:
  """The part of a heatmap worth showing: the box around the target that holds every |w| > `level`, grown by
  `margin` of its size, at least `min_size` px, clipped to the field.

  Returns:
    ((row_start, row_stop), (col_start, col_stop)) in the field's coordinates.
  """
  rows, cols = np.nonzero(np.abs(field) > level)
  spans = []
  for axis, (found, centre) in enumerate(((rows, target[0]), (cols, target[1]))):
    lo, hi = (min(found.min(), centre), max(found.max(), centre) + 1) if found.size else (centre, centre + 1)
    grow = max((hi - lo) * margin, (min_size - (hi - lo)) / 2, 0)
    lo, hi = int(max(0, np.floor(lo - grow))), int(min(field.shape[axis], np.ceil(hi + grow)))
    spans.append((lo, hi))
  return spans[0], spans[1]


def plot_figure8(path: str | pathlib.Path, image: np.ndarray, predicted: np.ndarray, truth: np.ndarray,
                 panels: Sequence[Mapping], *, title: str = "", columns: int = 3, dpi: int = 100,
                 max_display_px: int = 1024) -> pathlib.Path:
  """Writes a Figure-8-style PNG for one image.

  Args:
    path: the PNG to write.
    image: gray uint8 [H, W].
    predicted: bool [H, W], predicted membrane.
    truth: bool [H, W], annotated membrane.
    panels: one per target, each {"row", "col", "outcome", "map": normalized attribution float [h, w] in [-1, 1],
      "origin": (top, left) of the map in the image}, optionally "label" (a caption). Every target gets a box in the
      top row; each gets its own heatmap panel.
    title: figure title.
    columns: panels per row.
    dpi: resolution.
    max_display_px: larger images are shown shrunk by block means (image) and block maxima (masks).

  Returns:
    The path written.
  """
  height, width = np.shape(image)
  # Whole U-RISC images (10k px) are shown at display resolution; boxes and heatmaps keep image coordinates.
  step = max(1, -(-max(height, width) // max_display_px))
  heat_rows = math.ceil(len(panels) / columns)
  fig = Figure(figsize=(4 * columns, 4 * (1 + heat_rows)), layout="constrained")
  axes = np.atleast_2d(fig.subplots(1 + heat_rows, columns, squeeze=False))
  box = max(6.0, min(height, width) / 40)
  top_row = [("image", _reduced(image, step, any_of=False)),
             ("prediction", 255 - 255 * _reduced(predicted, step, any_of=True)),
             ("annotation", 255 - 255 * _reduced(truth, step, any_of=True))]
  for ax, (name, picture) in zip(axes[0], top_row):
    ax.imshow(picture, cmap="gray", vmin=0, vmax=255, interpolation="nearest",
              extent=(-0.5, picture.shape[1] * step - 0.5, picture.shape[0] * step - 0.5, -0.5))
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_title(name)
    for panel in panels:
      _box(ax, panel["row"], panel["col"], box, panel["outcome"])
  for ax in axes[0, len(top_row):]:
    ax.axis("off")
  heat_axes = axes[1:].ravel()
  mappable = None
  for ax, panel in zip(heat_axes, panels):
    field = np.asarray(panel["map"], np.float32)
    top, left = panel["origin"]
    extent = (left - 0.5, left + field.shape[1] - 0.5, top + field.shape[0] - 0.5, top - 0.5)
    mappable = ax.imshow(field, cmap=ATTRIBUTION_CMAP, norm=_ATTRIBUTION_NORM, extent=extent,
                         interpolation="nearest")
    (row_lo, row_hi), (col_lo, col_hi) = zoom_window(field, (panel["row"] - top, panel["col"] - left))
    ax.set_xlim(left + col_lo - 0.5, left + col_hi - 0.5)
    ax.set_ylim(top + row_hi - 0.5, top + row_lo - 0.5)
    _box(ax, panel["row"], panel["col"], max(3.0, (row_hi - row_lo) / 40), panel["outcome"])
    colour = OUTCOME_COLOURS.get(panel["outcome"], "black")
    for spine in ax.spines.values():
      spine.set_edgecolor(colour)
      spine.set_linewidth(2.5)
    caption = panel.get("label") or f"{OUTCOME_LABELS.get(panel['outcome'], panel['outcome'])} ({panel['row']}, " \
                                    f"{panel['col']})"
    ax.set_title(caption, fontsize=9, color=colour)
  for ax in heat_axes[len(panels):]:
    ax.axis("off")
  if mappable is not None:
    fig.colorbar(mappable, ax=list(heat_axes[:len(panels)]), shrink=0.8, label="normalized attribution (symmetric log scale)")
  if title:
    fig.suptitle(title)
  return _save(fig, path, dpi)


def plot_field_curves(path: str | pathlib.Path, series: Mapping[str, Mapping], k_grid: Sequence[float], *,
                      title: str = "Attribution field S_k", colours: Mapping[str, str] | None = None,
                      dpi: int = 100) -> pathlib.Path:
  """Writes a Figure-7B-style PNG: mean S_k +- s.e. (nm^2) against k, one line per series.

  Args:
    path: the PNG to write.
    series: label -> statistics with "mean_nm2" and "sem_nm2" lists indexed like k_grid (an entry of
      `fields.field_statistics(...)["outcomes"]`), e.g. {"U-RISC": ..., "ISBI 2012": ...}.
    k_grid: the levels k.
    title: plot title.
    colours: optional label -> matplotlib colour.
    dpi: resolution.

  Returns:
    The path written.
  """
  k = np.asarray(k_grid, np.float64)
  fig = Figure(figsize=(6, 4.5), layout="constrained")
  ax = fig.subplots()
  for label, stats in series.items():
    mean = np.asarray(stats["mean_nm2"], np.float64)
    sem = np.nan_to_num(np.asarray(stats["sem_nm2"], np.float64))
    ax.errorbar(k, mean, yerr=sem, marker="o", ms=4, capsize=3, label=f"{label} (n={stats.get('n', '?')})",
                color=(colours or {}).get(label))
  if np.all(k > 0):
    ax.set_xscale("log")
  ax.set_xlabel("k (normalized attribution threshold)")
  ax.set_ylabel("S_k (nm$^2$), mean $\\pm$ s.e.")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend()
  return _save(fig, path, dpi)


def plot_dataset_comparison(path: str | pathlib.Path, stats: Sequence[Mapping], *, outcome: str = "all",
                            dpi: int = 100) -> pathlib.Path:
  """Figure 7B across runs: S_k of one outcome for each dataset's stats.json contents (e.g. U-RISC vs ISBI 2012).

  Raises:
    ValueError: the runs used different k grids, or one has no target of `outcome`.
  """
  k_grid = stats[0]["k_grid"]
  series = {}
  for entry in stats:
    if list(entry["k_grid"]) != list(k_grid):
      raise ValueError(f"Cannot compare {entry.get('dataset')} (k_grid {entry['k_grid']}) with "
                       f"{stats[0].get('dataset')} (k_grid {k_grid}): rerun with the same config.attribution.k_grid.")
    if outcome not in entry["outcomes"]:
      raise ValueError(f"{entry.get('dataset')} has no {outcome!r} targets.")
    series[f"{entry.get('dataset')} ({entry['pixel_nm']:g} nm/px)"] = entry["outcomes"][outcome]
  return plot_field_curves(path, series, k_grid, title=f"Attribution fields ({OUTCOME_LABELS.get(outcome, outcome)})",
                           dpi=dpi)
