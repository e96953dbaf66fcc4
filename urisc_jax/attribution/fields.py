"""Attribution fields: how much of the image one pixel's decision draws on, by outcome (the paper's S_k).

An attribution map w of a target pixel (integrated gradients of its logit) is normalized to [-1, 1] by its largest
magnitude, w_norm = w / max|w|. Its attribution field at level k is the area of the pixels that push the logit up by
more than k of the strongest one:

    S_k = count(w_norm > k) * h^2   [nm^2],   h = pixel size (2.18 nm U-RISC, 4 nm ISBI 2012)

The paper found mean S_k of about 46,000 nm^2 on U-RISC against 10,300 nm^2 on ISBI 2012: the finer the pixels, the
more context a decision needs. Targets are analysed by outcome against the ground truth: correctly found membrane
(true positive), false positive and false negative pixels.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from urisc_jax.evaluation.f1 import mean_and_sem

OUTCOMES = ("tp", "fp", "fn")
OUTCOME_LABELS = {"tp": "true positive (membrane)", "fp": "false positive", "fn": "false negative"}


@dataclasses.dataclass(frozen=True)
class Target:
  """A target pixel (row, col) of an image and its outcome: 'tp', 'fp' or 'fn'."""
  row: int
  col: int
  outcome: str


def outcome_masks(predicted: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
  """Boolean [H, W] masks of the outcomes of a membrane prediction against the ground truth (True = membrane)."""
  predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
  if predicted.shape != truth.shape:
    raise ValueError(f"The prediction has shape {predicted.shape} but the ground truth {truth.shape}: they must "
                     "describe the same image.")
  return {"tp": predicted & truth, "fp": predicted & ~truth, "fn": ~predicted & truth}


def sample_targets(predicted: np.ndarray, truth: np.ndarray, num_per_outcome: int, *,
                   seed: int | Sequence[int] = 0, border: int = 0, outcomes: Sequence[str] = OUTCOMES,
                   grid: int = 1) -> list[Target]:
  """Target pixels drawn uniformly, without replacement, from each outcome of a prediction.

  Args:
    predicted: bool [H, W], predicted membrane.
    truth: bool [H, W], ground-truth membrane.
    num_per_outcome: pixels per outcome; fewer when the outcome has fewer pixels (none when it has none).
    seed: an integer or a sequence of them (e.g. (seed, image index)); each outcome draws from its own stream, so
      asking for another outcome changes no other.
    border: pixels closer than this to the image border are never drawn.
    outcomes: which outcomes, from OUTCOMES.
    grid: only pixels whose row and column are multiples of `grid` are drawn (the paper's protocol: 10 px).

  Returns:
    Targets grouped by outcome in the order of `outcomes`.
  """
  unknown = sorted(set(outcomes) - set(OUTCOMES))
  if unknown:
    raise ValueError(f"Unknown outcome(s) {unknown}: choose from {', '.join(OUTCOMES)}.")
  masks = outcome_masks(predicted, truth)
  height, width = np.shape(predicted)
  inner = np.zeros((height, width), bool)
  inner[border:height - border, border:width - border] = True
  if grid > 1:
    on_grid = np.zeros_like(inner)
    on_grid[::grid, ::grid] = True
    inner &= on_grid
  targets = []
  for outcome in outcomes:
    candidates = np.flatnonzero(masks[outcome] & inner)
    rng = np.random.default_rng([*(int(s) for s in np.atleast_1d(seed)), OUTCOMES.index(outcome)])
    chosen = rng.choice(candidates, size=min(num_per_outcome, candidates.size), replace=False)
    targets += [Target(int(i // width), int(i % width), outcome) for i in chosen]
  return targets


def normalize_attributions(maps: np.ndarray) -> np.ndarray:
  """Attribution maps [..., H, W] divided by their own largest magnitude: values in [-1, 1]; all-zero maps stay 0."""
  maps = np.asarray(maps, np.float32)
  peak = np.abs(maps).max(axis=(-2, -1), keepdims=True)
  return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


def field_pixels(maps: np.ndarray, k_grid: Sequence[float]) -> np.ndarray:
  """count(w_norm > k) of each map [..., H, W] (normalized here) at each level k: int64 [..., K]."""
  normalized = normalize_attributions(maps)
  flat = normalized.reshape(normalized.shape[:-2] + (-1,))
  return np.stack([np.count_nonzero(flat > k, axis=-1) for k in k_grid], axis=-1).astype(np.int64)


def field_areas(maps: np.ndarray, k_grid: Sequence[float], *, pixel_nm: float) -> np.ndarray:
  """S_k = count(w_norm > k) * pixel_nm^2 of each map [..., H, W] at each level k: float64 [..., K] in nm^2."""
  if not pixel_nm > 0:
    raise ValueError(f"The pixel size must be positive (nm per pixel, e.g. 2.18 for U-RISC), got {pixel_nm}.")
  return field_pixels(maps, k_grid) * float(pixel_nm) ** 2


def _summary(areas: np.ndarray, fractions: np.ndarray) -> dict:
  """Statistics over targets (rows) at each level (columns)."""
  means, sems = zip(*(mean_and_sem(column) for column in areas.T))
  return {
      "n": int(areas.shape[0]),
      "mean_nm2": list(means),
      "sem_nm2": list(sems),
      "median_nm2": np.median(areas, axis=0).tolist(),
      "q25_nm2": np.quantile(areas, 0.25, axis=0).tolist(),
      "q75_nm2": np.quantile(areas, 0.75, axis=0).tolist(),
      "max_nm2": areas.max(axis=0).tolist(),
      "mean_fraction_of_image": fractions.mean(axis=0).tolist(),
  }


def field_statistics(areas: np.ndarray, outcomes: Sequence[str], k_grid: Sequence[float], *, pixel_nm: float,
                     image_pixels: Sequence[int]) -> dict:
  """S_k statistics of a dataset's targets, overall and per outcome.

  Args:
    areas: float [T, K], S_k of each target in nm^2 (see `field_areas`).
    outcomes: the outcome of each target.
    k_grid: the K levels.
    pixel_nm: pixel size h in nm.
    image_pixels: pixel count of each target's whole image, for the fraction of the image a field covers.

  Returns:
    {"k_grid", "pixel_nm", "outcomes": {"all" | "tp" | "fp" | "fn": {"n", "mean_nm2", "sem_nm2", "median_nm2",
    "q25_nm2", "q75_nm2", "max_nm2", "mean_fraction_of_image"}}}, every list indexed like k_grid; an outcome with
    no targets is left out, the s.e. of a single target is NaN.
  """
  areas = np.asarray(areas, np.float64).reshape(len(outcomes), len(k_grid))
  fractions = areas / (float(pixel_nm) ** 2 * np.asarray(image_pixels, np.float64)[:, None])
  outcomes = np.asarray(outcomes)
  groups = {"all": np.ones(len(outcomes), bool)}
  groups.update({o: outcomes == o for o in OUTCOMES})
  return {"k_grid": [float(k) for k in k_grid], "pixel_nm": float(pixel_nm),
          "outcomes": {name: _summary(areas[mask], fractions[mask]) for name, mask in groups.items() if mask.any()}}
