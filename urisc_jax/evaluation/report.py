"""Evaluation reports: score a folder of predictions, write evaluation.json and evaluation.md.

`evaluate_folders` is what `python -m urisc_jax.main --mode=evaluate` runs:

  binary predictions (pred_dir)   +  ground truth (gt_dir, same file stems)
      -> official U-RISC F1 / precision / recall per image, plain mean and mean +- s.e. over images;
  membrane probability maps (prob_dir, optional, same stems, float .npy / .tif in [0, 1])
      -> ISBI 2012 V_rand and V_info (best over thresholds 0.0 .. 1.0, averaged over images as slices).

For V_rand / V_info the ground truth is binarized with membrane = gray <= 122 whatever `gt_mode` is, since cells
need a binary membrane map.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from urisc_jax import outputs
from urisc_jax.data import imageio
from urisc_jax.evaluation import f1 as f1_lib
from urisc_jax.evaluation import isbi

PROBABILITY_SUFFIXES = (".npy", ".tif", ".tiff")


def read_probability(path: str | pathlib.Path) -> np.ndarray:
  """Reads a membrane probability map, float64 [H, W] in [0, 1], from .npy or .tif/.tiff.

  Raises one clear error naming the file for a missing, unreadable, non-float, non-2-D or out-of-range map.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such probability file")
  try:
    if path.suffix.lower() == ".npy":
      array = np.load(path, allow_pickle=False)
    else:
      import tifffile  # pylint: disable=g-import-not-at-top
      imageio.check_tiff_pages(path)
      imageio.check_tiff_tiles(path)
      with tifffile.TiffFile(path) as tif:
        shape = tif.series[0].shape
        imageio.check_pixels(path, int(shape[-1]), int(shape[-2]), what="probability map")
        array = tif.asarray()
  except imageio.DataError as e:
    raise f1_lib.ImageReadError(str(e)) from e
  except Exception as e:  # numpy / tifffile raise many types for damaged files.
    raise f1_lib.ImageReadError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
  while array.ndim > 2 and array.shape[0] == 1:
    array = array[0]
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim != 2:
    raise f1_lib.ImageReadError(f"{path}: expected one 2-D probability map [H, W], got shape {array.shape}")
  if not np.issubdtype(array.dtype, np.floating):
    raise f1_lib.ImageReadError(
        f"{path}: expected float membrane probabilities in [0, 1], got dtype {array.dtype}; save the model's "
        "sigmoid output as float32.")
  array = array.astype(np.float64)
  if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
    raise f1_lib.ImageReadError(f"{path}: probabilities must be finite and within [0, 1] "
                                f"(found {np.nanmin(array):.4g} .. {np.nanmax(array):.4g})")
  return array


def _probability_files(prob_dir: pathlib.Path, stems: Sequence[str]) -> dict[str, pathlib.Path]:
  if not prob_dir.is_dir():
    raise FileNotFoundError(f"{prob_dir}: no such folder")
  found: dict[str, pathlib.Path] = {}
  for path in sorted(prob_dir.iterdir()):
    if path.is_file() and path.suffix.lower() in PROBABILITY_SUFFIXES and path.stem in stems:
      if path.stem in found:
        raise f1_lib.PairingError(f"{prob_dir}: two probability maps named {path.stem!r}; keep one.")
      found[path.stem] = path
  missing = [stem for stem in stems if stem not in found]
  if missing:
    raise f1_lib.PairingError(f"no probability map (.npy/.tif/.tiff) in {prob_dir} for: {', '.join(missing)}")
  return found


def _isbi_section(rows: list[dict[str, Any]], prob_dir: pathlib.Path,
                  thresholds: Sequence[float]) -> dict[str, Any]:
  stems = [row["name"] for row in rows]
  prob_paths = _probability_files(prob_dir, stems)
  gt_membrane, membrane_prob = [], []
  for row in rows:
    gt = f1_lib.read_gray8(row["ground_truth"])
    prob = read_probability(prob_paths[row["name"]])
    if prob.shape != gt.shape:
      raise ValueError(f"{prob_paths[row['name']]}: shape {prob.shape} differs from ground truth "
                       f"{row['ground_truth']} {gt.shape}")
    gt_membrane.append(gt <= f1_lib.BINARIZE_LEVEL)
    membrane_prob.append(prob)
    row["probability"] = str(prob_paths[row["name"]])
  scores = isbi.isbi_scores(gt_membrane, membrane_prob, thresholds=tuple(thresholds))
  for row, slice_scores in zip(rows, scores["per_slice"]):
    row.update(slice_scores)
  return {key: scores[key] for key in ("v_rand", "v_rand_threshold", "v_info", "v_info_threshold",
                                       "per_threshold")}


def _fmt(value: float | None, digits: int = 4) -> str:
  return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _markdown(result: dict[str, Any]) -> str:
  has_isbi = "isbi" in result
  header = "| image | F1 | precision | recall |" + (" V_rand | V_info |" if has_isbi else "")
  rule = "|---|---:|---:|---:|" + ("---:|---:|" if has_isbi else "")
  lines = [
      "# Evaluation",
      "",
      f"Official U-RISC F1 (gt_mode = {result['gt_mode']}, bound_pix = {result['bound_pix']}): prediction "
      f"folder `{result['pred_dir']}`, ground truth `{result['gt_dir']}`.",
      "",
      header,
      rule,
  ]
  for row in result["images"]:
    name = f"{row['name']} (rejected: {row['rejected']})" if "rejected" in row else row["name"]
    line = f"| {name} | {_fmt(row['f1'])} | {_fmt(row['precision'])} | {_fmt(row['recall'])} |"
    if has_isbi:
      line += f" {_fmt(row['v_rand'])} | {_fmt(row['v_info'])} |"
    lines.append(line)
  sem = result["sem_f1"]
  lines += [
      "",
      f"**Mean F1 = {_fmt(result['mean_f1'])} +- {_fmt(sem)}** (mean +- s.e. over {result['num_images']} images; "
      "the dataset score is the plain mean of per-image F1).",
      f"Mean precision {_fmt(result['mean_precision'])}, mean recall {_fmt(result['mean_recall'])}.",
  ]
  if has_isbi:
    section = result["isbi"]
    lines += [
        "",
        f"ISBI 2012 protocol on membrane probabilities from `{result['prob_dir']}` (ground-truth membrane = gray "
        "<= 122): best over thresholds of the image-averaged score; per-image values at that threshold.",
        f"V_rand = {_fmt(section['v_rand'])} (interior threshold {section['v_rand_threshold']:.1f}), "
        f"V_info = {_fmt(section['v_info'])} (interior threshold {section['v_info_threshold']:.1f}).",
    ]
  return "\n".join(lines) + "\n"


def evaluate_folders(pred_dir: str | pathlib.Path, gt_dir: str | pathlib.Path, out_dir: str | pathlib.Path, *,
                     gt_mode: str = "official", prob_dir: str | pathlib.Path | None = None, bound_pix: int = 0,
                     thresholds: Sequence[float] = isbi.THRESHOLDS, strict: bool = True) -> dict[str, Any]:
  """Scores a prediction folder against ground truth and writes evaluation.json and evaluation.md to `out_dir`.

  Args:
    pred_dir: binary predictions (.png/.tif/.tiff; 0 = membrane, 255 = background), paired with `gt_dir` by stem.
    gt_dir: ground-truth membrane maps (black = membrane).
    out_dir: where the two report files go (created if needed).
    gt_mode: "official" (the published scorer) or "binarized" (competition: membrane = gray <= 122).
    prob_dir: optional folder of membrane probability maps with the same stems (float .npy / .tif in [0, 1]);
      when given, V_rand and V_info are added.
    bound_pix: boundary tolerance of the F1 in pixels (0 = official exact match).
    thresholds: interior thresholds for V_rand / V_info.
    strict: stop at a prediction the official format check rejects; False scores it 0 and says why in its row.

  Returns:
    The report as written to evaluation.json: {"images": [per-image rows], "num_images", "mean_f1", "sem_f1",
    "mean_precision", "mean_recall", "gt_mode", "bound_pix", "pred_dir", "gt_dir", optional "prob_dir" and
    "isbi": {"v_rand", "v_rand_threshold", "v_info", "v_info_threshold", "per_threshold"}, "files"}.
    A standard error that does not exist (one image) is NaN here and null in the JSON.
  """
  result = f1_lib.score_folders(pred_dir, gt_dir, gt_mode=gt_mode, bound_pix=bound_pix, strict=strict)
  result["pred_dir"], result["gt_dir"] = str(pred_dir), str(gt_dir)
  if prob_dir is not None:
    result["prob_dir"] = str(prob_dir)
    result["isbi"] = _isbi_section(result["images"], pathlib.Path(prob_dir), thresholds)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  result["files"] = {"json": str(out_dir / "evaluation.json"), "markdown": str(out_dir / "evaluation.md")}
  outputs.write_json(result["files"]["json"], result)
  outputs.write_text(result["files"]["markdown"], _markdown(result))
  return result
