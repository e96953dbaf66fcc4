"""`--mode=attribute`: integrated gradients of a trained model's decisions, by outcome, and their attribution fields.

For each image of `config.attribution.split` the latest checkpoint predicts membrane as --mode=predict does (sliding
window, the run's threshold and post-processing); target pixels are drawn from its true positives, false positives
and false negatives against the ground truth; integrated gradients attribute each target's logit to the input
pixels (over a window holding the model's receptive field); and the attribution fields S_k summarize how much of the
image each decision draws on. The integrals are refined per target until the attributions add up to
config.attribution.tolerance (path_integral.py). config.attribution.protocol="paper" does all of this as the paper's
code did: on images resized to 512 x 512, with targets on a 10 px grid and S_k in the resized pixels' size.

Outputs under workdir/attribution/:
  stats.json            S_k statistics of the dataset over config.attribution.k_grid, overall and per outcome
  targets.json          one entry per target: image, y, x, outcome, logit, baseline_logit, completeness gaps, the
                        quadrature nodes it used and whether it met config.attribution.tolerance, S_k
  figure8_<image>.png   image, prediction, annotation and attribution maps of the image's targets
  figure7b_sk.png       mean S_k +- s.e. against k per outcome
"""

import dataclasses
import pathlib

import jax
import numpy as np
from tqdm import tqdm

from urisc_jax import multihost, outputs, predict, sharding, state
from urisc_jax.attribution import fields, figures, receptive_field
from urisc_jax.attribution import integrated_gradients as ig
from urisc_jax.data import dataset, resample

CROPS = ("receptive_field", "none")
# "native": images at their recorded resolution, targets anywhere. "paper": as the paper's code did, each image (and
# its label) resized to paper_size x paper_size, targets on a paper_grid px grid, S_k with the pixel size scaled.
PROTOCOLS = ("native", "paper")
SPLITS = ("train", "val", "test")
# Attribution maps drawn per outcome and image in a Figure-8 panel.
FIGURE_TARGETS_PER_OUTCOME = 2


def _split_name(config) -> str:
  split = config.attribution.split
  if split not in SPLITS:
    raise ValueError(f"config.attribution.split={split!r}: choose one of {', '.join(SPLITS)}.")
  return getattr(config.data, f"{split}_split")


@dataclasses.dataclass(frozen=True)
class _Resized:
  """An image and its label resampled to `shape` (anti-aliased; the label: membrane where half a pixel is)."""
  name: str
  gray: np.ndarray
  mask: np.ndarray
  source_shape: tuple[int, int]

  @property
  def shape(self) -> tuple[int, int]:
    return self.gray.shape

  def image(self) -> np.ndarray:
    return self.gray

  def label(self) -> np.ndarray:
    return self.mask


def protocol_images(images, cfg) -> tuple[list, float]:
  """The images the protocol attributes and the pixel size h (nm) of their pixels.

  "native": the images as they are, h = cfg.pixel_nm. "paper": each resized to paper_size x paper_size, h =
  pixel_nm x sqrt(H W) / paper_size (a pixel then covers (H / size) x (W / size) original pixels; U-RISC 9958 px ->
  512 px: 42.4 nm instead of 2.18 nm). All images of a split must share one size in that protocol, since S_k's
  pixel size is one number.
  """
  if cfg.protocol == "native":
    return list(images), float(cfg.pixel_nm)
  size = int(cfg.paper_size)
  shapes = {tuple(im.shape) for im in images}
  if len(shapes) != 1:
    raise ValueError(f"config.attribution.protocol='paper' resizes every image to {size} x {size} px, which needs "
                     f"one image size per split to give one pixel size; this split has {sorted(shapes)}.")
  [(height, width)] = shapes
  resized = [_Resized(im.name, resample.resize_gray(np.asarray(im.image()), (size, size)),
                      resample.resize_mask(np.asarray(im.label()) > 0, (size, size)).astype(np.uint8),
                      (height, width)) for im in images]
  return resized, float(cfg.pixel_nm) * float(np.sqrt(height * width)) / size


def _check_config(cfg) -> None:
  if cfg.protocol not in PROTOCOLS:
    raise ValueError(f"config.attribution.protocol={cfg.protocol!r}: choose one of {', '.join(PROTOCOLS)}.")
  if cfg.crop not in CROPS:
    raise ValueError(f"config.attribution.crop={cfg.crop!r}: choose one of {', '.join(CROPS)}.")
  if cfg.baseline not in ig.BASELINES:
    raise ValueError(f"config.attribution.baseline={cfg.baseline!r}: choose one of {', '.join(ig.BASELINES)}.")
  ig.quadrature(cfg.rule, cfg.steps)  # raises on a bad rule or node count
  if not cfg.max_nodes >= cfg.steps:
    raise ValueError(f"config.attribution.max_nodes={cfg.max_nodes} must be >= config.attribution.steps="
                     f"{cfg.steps}, the first pass's nodes.")
  if not cfg.num_targets > 0:
    raise ValueError(f"config.attribution.num_targets must be positive, got {cfg.num_targets}.")


def _completeness_summary(entries: list[dict], tolerance: float) -> dict:
  """How well the attributions add up: gaps, node counts and how many targets met the tolerance."""
  gaps = np.abs([e["completeness_gap"] for e in entries])
  relative = np.abs([e["completeness_gap_rel"] for e in entries], dtype=np.float64)
  finite = relative[np.isfinite(relative)]
  nodes = np.asarray([e["nodes"] for e in entries])
  evaluations = np.asarray([e["gradient_evaluations"] for e in entries])
  return {"tolerance": tolerance, "num_targets": len(entries),
          "met_tolerance": int(sum(e["met_tolerance"] for e in entries)),
          "max_abs_gap": float(gaps.max()), "mean_abs_gap": float(gaps.mean()),
          "max_abs_gap_rel": float(finite.max()) if finite.size else None,
          "median_abs_gap_rel": float(np.median(finite)) if finite.size else None,
          "nodes": {"min": int(nodes.min()), "median": float(np.median(nodes)), "max": int(nodes.max())},
          "gradient_evaluations": {"total": int(evaluations.sum()), "max": int(evaluations.max())}}


def _this_process_share(counts: list[int]) -> list[list[int]]:
  """For images with `counts` targets each, the indices of each image's targets this process attributes: every P-th
  target in image order, so that processes get equal shares."""
  position, shares = 0, []
  for count in counts:
    shares.append([k for k in range(count) if (position + k) % jax.process_count() == jax.process_index()])
    position += count
  return shares


def _figure_targets(targets) -> set[int]:
  """Indices of the targets a Figure-8 panel shows: the first FIGURE_TARGETS_PER_OUTCOME of each outcome."""
  chosen, drawn = set(), {o: 0 for o in fields.OUTCOMES}
  for k, target in enumerate(targets):
    if drawn[target.outcome] < FIGURE_TARGETS_PER_OUTCOME:
      drawn[target.outcome] += 1
      chosen.add(k)
  return chosen


def attribute(config, workdir: str | pathlib.Path) -> dict:
  """Runs the attribution study of a trained run and writes workdir/attribution/ (see the module docstring).

  Args:
    config: the run's config (config.attribution, config.data, config.model, config.predict).
    workdir: the trained run's folder (with checkpoints/).

  Returns:
    A summary: numbers of images and targets, the settings, mean S_k (nm^2) at each k, the completeness gaps and
    the output folder. The full statistics are in stats.json.
  """
  workdir = pathlib.Path(workdir)
  cfg = config.attribution
  _check_config(cfg)
  out_dir = workdir / "attribution"
  # float32 unless the config names a dtype: the completeness of integrated gradients is a sum over many gradient
  # evaluations, which bfloat16's rounding would swamp.
  model = state.build_model(config.model, auto_dtype=np.float32)
  variables, step, meta = predict.restore_variables(config, workdir, model)
  if meta.get("normalization"):  # The input normalization the model was trained with.
    config.data.mean, config.data.std = meta["normalization"]["mean"], meta["normalization"]["std"]
  mean, std = float(config.data.mean), float(config.data.std)
  split = _split_name(config)
  images = multihost.first_then_others(
      lambda: dataset.prepared_split(config.data, workdir, split, progress=multihost.is_writer()), "prepare data")
  if not images:
    raise ValueError(f"No images in split {split!r} of the configured dataset: nothing to attribute.")
  images, pixel_nm = protocol_images(images, cfg)
  grid = int(cfg.paper_grid) if cfg.protocol == "paper" else 1
  threshold = predict.decision_threshold(config, workdir, step)
  forward = predict.tile_forward(config, model, variables)
  logit_fn = ig.ModelLogits(model)
  radius = receptive_field.model_receptive_field_radius(model) if cfg.crop == "receptive_field" else None
  k_grid = [float(k) for k in cfg.k_grid]
  writer = multihost.is_writer()

  # Predict every image and draw its targets first, so that the progress bar knows the total. Only the targets and
  # the predicted mask (one bit per pixel) are kept: a U-RISC image is 100 Mpixel. In a multi-host run every
  # process predicts (its share of the tiles) and draws the same targets.
  plans = []
  for index, im in enumerate(tqdm(images, desc="predict", unit="image", leave=False, disable=not writer)):
    probability = predict.probabilities(forward, np.asarray(im.image()), config.predict)
    predicted = predict.membrane_mask(probability, threshold, config.predict)
    targets = fields.sample_targets(predicted, np.asarray(im.label()) > 0, cfg.num_targets, seed=(cfg.seed, index),
                                    border=cfg.border, grid=grid)
    plans.append((index, im, np.packbits(predicted), targets, [float(probability[t.row, t.col]) for t in targets]))
    del probability, predicted

  # Each process attributes every P-th target on its own first device; the results are gathered on every process.
  share = _this_process_share([len(plan[3]) for plan in plans])
  local_variables = sharding.local_replica(variables)
  entries, panels = [], []
  with tqdm(total=sum(len(mine) for mine in share), desc="attribute", unit="pixel", disable=not writer) as bar:
    for (index, im, _, targets, target_probabilities), mine in zip(plans, share):
      if not mine:
        continue
      order = {(targets[k].row, targets[k].col): k for k in mine}
      drawn = _figure_targets(targets)
      results = ig.iter_attributions(
          logit_fn, local_variables, im.image(), [(targets[k].row, targets[k].col) for k in mine], mean=mean,
          std=std, baseline=cfg.baseline, radius=radius, steps=cfg.steps, rule=cfg.rule,
          nodes_per_interval=cfg.nodes_per_interval, tolerance=cfg.tolerance, max_nodes=cfg.max_nodes, chunk_size=cfg.chunk_size, targets_per_pass=cfg.targets_per_pass, seed=(cfg.seed, index),
          blur_sigma=cfg.blur_sigma)
      for result in results:
        maps = result.maps
        target_areas = fields.field_areas(maps, k_grid, pixel_nm=pixel_nm)
        normalized = fields.normalize_attributions(maps)
        for i, (row, col) in enumerate(result.targets.tolist()):
          k = order[(row, col)]
          target = targets[k]
          entries.append(((index, k), {
              "image": im.name, "y": row, "x": col, "outcome": target.outcome,
              "probability": target_probabilities[k],
              "logit": float(result.logits[i]), "baseline_logit": float(result.baseline_logits[i]),
              "completeness_gap": float(result.completeness_gap[i]),
              "completeness_gap_rel": float(result.completeness_gap_rel[i]),
              "nodes": int(result.nodes[i]), "gradient_evaluations": int(result.evaluations[i]),
              "met_tolerance": bool(result.met_tolerance[i]),
              "s_k_nm2": target_areas[i].tolist(),
              "window": {"top": result.origin[0], "left": result.origin[1], "height": int(maps.shape[1]),
                         "width": int(maps.shape[2])}}))
          if k in drawn:
            panels.append(((index, k), {"row": row, "col": col, "outcome": target.outcome, "map": normalized[i],
                                        "origin": result.origin}))
        bar.update(len(result.targets))
  entries = [entry for _, entry in sorted(sum(multihost.gather_objects(entries), []), key=lambda e: e[0])]
  panels = sorted(sum(multihost.gather_objects(panels), []), key=lambda p: p[0])
  if not writer:
    return {}
  for index, im, packed_prediction, _, _ in plans:
    image_panels = [panel for (i, _), panel in panels if i == index]
    predicted = np.unpackbits(packed_prediction, count=int(np.prod(im.shape))).reshape(im.shape).astype(bool)
    figures.plot_figure8(out_dir / f"figure8_{im.name}.png", im.image(), predicted, np.asarray(im.label()) > 0,
                         sorted(image_panels, key=lambda p: fields.OUTCOMES.index(p["outcome"])),
                         title=f"{im.name}: integrated gradients ({cfg.rule}, {cfg.baseline} baseline)")
  areas = [np.asarray(e["s_k_nm2"]) for e in entries]

  # The U-RISC track only means something for release-layout sources.
  where = f"{config.data.track}/{split}" if config.data.source in ("synthetic", "urisc") else split
  dataset_name = f"{config.data.source}:{where}"
  if not entries:
    raise ValueError(f"No target pixels in {dataset_name}: the predictions and annotations have no true positive, "
                     "false positive or false negative pixels (away from config.attribution.border).")
  image_pixels = {im.name: int(np.prod(im.shape)) for im in images}
  stats = fields.field_statistics(np.stack(areas), [e["outcome"] for e in entries], k_grid, pixel_nm=pixel_nm,
                                  image_pixels=[image_pixels[e["image"]] for e in entries])
  stats.update({
      "dataset": dataset_name, "checkpoint_step": step, "num_images": len(images), "threshold": threshold,
      "steps": cfg.steps, "rule": cfg.rule, "nodes_per_interval": cfg.nodes_per_interval,
      "max_nodes": cfg.max_nodes, "baseline": cfg.baseline,
      "crop": cfg.crop, "receptive_field_radius": radius, "protocol": cfg.protocol,
      "input_shape": list(images[0].shape), "target_grid": grid,
      "completeness": _completeness_summary(entries, cfg.tolerance)})
  outputs.write_json(out_dir / "stats.json", stats)
  outputs.write_json(out_dir / "targets.json", {"dataset": dataset_name, "k_grid": k_grid, "targets": entries})
  series = {fields.OUTCOME_LABELS[o]: stats["outcomes"][o] for o in fields.OUTCOMES if o in stats["outcomes"]}
  colours = {fields.OUTCOME_LABELS[o]: figures.OUTCOME_COLOURS[o] for o in fields.OUTCOMES}
  figures.plot_field_curves(out_dir / "figure7b_sk.png", series, k_grid, colours=colours,
                            title=f"Attribution fields by outcome, {dataset_name}")
  overall = stats["outcomes"]["all"]
  return {
      "dataset": dataset_name, "protocol": cfg.protocol, "pixel_nm": pixel_nm, "num_images": len(images),
      "num_targets": len(entries), "steps": cfg.steps,
      "rule": cfg.rule, "baseline": cfg.baseline, "receptive_field_radius": radius,
      "mean_s_k_nm2": {f"k={k:g}": mean for k, mean in zip(k_grid, overall["mean_nm2"])},
      "completeness": stats["completeness"], "output_dir": str(out_dir),
  }
