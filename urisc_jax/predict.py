"""Predicting whole images with a trained model, choosing the threshold, writing submissions, scoring them.

The submitted mask is `probability >= threshold`, cleaned up by `config.predict.postprocess` (off by default); the
threshold is chosen on validation images for that cleaned-up mask and stored beside the checkpoint.

Outputs per image, under an output folder:
  <name>.tiff                 the submission: uint8, black (0) = membrane, white (255) = background
  probabilities/<name>.tif    float32 membrane probability
  overlays/<name>.png         the prediction drawn on the image (with ground truth: TP green, FP red, FN blue)
"""

import json
import logging
import pathlib

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from urisc_jax import (checkpoint, config_checks, inference, multihost, optim, outputs, postprocess, resolution,
                       sharding, state)
from urisc_jax.data import sources
from urisc_jax.data.prepare import PreparedImage
from urisc_jax.evaluation import f1 as official
from urisc_jax.evaluation import ground_truth as gt_lib
from urisc_jax.evaluation import threshold as thresholds

THRESHOLD_CANDIDATES = np.round(np.arange(0.02, 0.99, 0.02), 2)
THRESHOLD_FILE = "threshold.json"


def prediction_mesh(batch_size: int, *, local: bool = False) -> Mesh | None:
  """The data-parallel mesh a batch of `batch_size` tiles is split over; None for one device.

  One process, or `local`: the most of this process's devices that split the batch evenly (6 tiles on 8 devices:
  6 devices). Several processes (a multi-host run): the same number of devices from every process, the most that
  split each process's equal share of the batch, so that all hosts compute every image together.
  """
  processes = 1 if local else jax.process_count()
  if batch_size <= 0:
    raise ValueError(f"config.predict.batch_size must be positive, got {batch_size}.")
  if batch_size % processes:
    raise ValueError(f"config.predict.batch_size={batch_size} must be a multiple of the {processes} processes of "
                     "this run (each computes an equal share of every batch of tiles).")
  share = batch_size // processes
  per_process = max(n for n in range(1, min(jax.local_device_count(), share) + 1) if share % n == 0)
  if processes == 1:
    return None if per_process == 1 else Mesh(np.asarray(jax.local_devices()[:per_process]), ("data",))
  by_process = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  devices = [d for p in range(processes) for d in [d for d in by_process if d.process_index == p][:per_process]]
  return Mesh(np.asarray(devices), ("data",))


def tile_forward_binder(config, model, *, local: bool = False):
  """`bind(variables) -> TileForward` for `config.predict`, compiled once however many variables get bound; the
  batch of tiles is split over `prediction_mesh` (this process's devices only with `local`)."""
  batch = config_checks.local_predict_batch(config.predict) if local else config.predict.batch_size
  return inference.tile_forward_binder(model, mean=config.data.mean, std=config.data.std, tta=config.predict.tta,
                                       mesh=prediction_mesh(batch, local=local))


def tile_forward(config, model, variables, *, local: bool = False) -> inference.TileForward:
  """The jitted tile forward of `config.predict` with `variables` bound."""
  return tile_forward_binder(config, model, local=local)(variables)


def tile_size(image_shape: tuple[int, int], predict_config) -> int:
  """The tile for an image of `image_shape`: `config.predict.tile` when blending. In halo mode, `inference.halo_tile`:
  the configured tile, raised to 4 x halo if smaller, grown by up to half to cover the image with the fewest
  computed pixels."""
  halo = predict_config.get("halo")
  if halo is None:
    return predict_config.tile
  return inference.halo_tile(image_shape, predict_config.tile, halo)


def probabilities(forward: inference.TileForward, image: np.ndarray, predict_config) -> np.ndarray:
  """float32 [H, W] membrane probability of a gray uint8 [H, W] image by sliding window."""
  logits = inference.predict_logits(forward, image, tile=tile_size(image.shape, predict_config),
                                    step=predict_config.step, blend=predict_config.blend,
                                    batch_size=predict_config.batch_size, halo=predict_config.get("halo"))
  return inference.probabilities(logits, out=logits)


def membrane_mask(probability: np.ndarray, threshold: float, predict_config) -> np.ndarray:
  """The submitted membrane mask, bool [H, W]: probability >= threshold, then `config.predict.postprocess`."""
  membrane = probability >= threshold
  options = predict_config.get("postprocess")
  return postprocess.postprocess(membrane, options) if postprocess.is_enabled(options) else membrane


def ground_truth(image: PreparedImage, config=None) -> np.ndarray:
  """The ground truth the official scorer sees, uint8 [H, W], black = membrane.

  Without a config: `PreparedImage.official_label` (for a binary label file in the official polarity, the file byte
  for byte; a label that needed another polarity or a threshold comes back binarized). With the run's config: what
  `config.eval.gt_mode` scores (`evaluation.ground_truth.scored_ground_truth`): a thresholded label (Track 2) as
  released for "official", so that the name in metrics.json is true.
  """
  if config is None:
    return np.asarray(image.official_label())
  return gt_lib.scored_ground_truth(image, gt_mode=config.eval.gt_mode, label_threshold=config.data.label_threshold,
                                    membrane=config.data.membrane)


def f1_per_threshold(probability: np.ndarray, gt: np.ndarray, predict_config, *, gt_mode: str,
                     candidates: np.ndarray = THRESHOLD_CANDIDATES) -> np.ndarray:
  """Official F1 of the submitted mask (`membrane_mask`) at each candidate threshold, float64 [K].

  Without post-processing, one histogram pass scores all candidates; with it, each candidate's mask is
  post-processed and scored in turn (K passes), so that the threshold is chosen for the mask that is submitted.
  """
  if not postprocess.is_enabled(predict_config.get("postprocess")):
    return thresholds.f1_per_candidate(probability, gt, candidates, gt_mode=gt_mode)
  one = np.ones(1)  # a boolean mask scored as the score map `mask >= 1`
  return np.array([thresholds.f1_per_candidate(membrane_mask(probability, t, predict_config), gt, one,
                                               gt_mode=gt_mode)[0] for t in candidates])


def choose_threshold(forward, images: list[PreparedImage], config, *, local_forward=None) -> dict:
  """The probability threshold that maximises the mean official F1 on `images` (the validation split).

  Each image's F1 is computed for all candidates right after its prediction, so only one probability map is held
  at a time. The post-processing of `config.predict.postprocess` is applied as it will be at prediction, and
  recorded with the threshold. Ties go to the lowest threshold.

  In a multi-host run the processes share the work and the F1 curves are gathered, so that every process chooses
  the same threshold: with at least as many images as processes and a `local_forward` (this process's devices
  only), each process predicts and scores every P-th image alone, with no collective until the curves meet;
  otherwise all processes predict every image together with `forward` (over all hosts) and each scores every
  P-th one.
  """
  if not images:
    raise ValueError("choose_threshold needs at least one validation image; set config.predict.threshold instead.")
  processes, me = jax.process_count(), jax.process_index()
  alone = processes > 1 and local_forward is not None and len(images) >= processes
  local_predict = config.predict
  if alone and config_checks.local_predict_batch(config.predict) != config.predict.batch_size:
    # This process's own batch of tiles: config.predict.batch_size_per_device x its devices.
    local_predict = config.predict.copy_and_resolve_references()
    local_predict.batch_size = config_checks.local_predict_batch(config.predict)
  curves = {}
  for i, im in enumerate(tqdm(images, desc="validate", unit="image", leave=False, disable=not multihost.is_writer())):
    mine = i % processes == me
    if alone and not mine:
      continue
    probability = probabilities(local_forward if alone else forward, np.asarray(im.image()),
                                local_predict if alone else config.predict)
    if mine:
      curves[i] = f1_per_threshold(probability, ground_truth(im, config), config.predict,
                                     gt_mode=config.eval.gt_mode)
    del probability
  curves = {i: curve for share in multihost.gather_objects(curves) for i, curve in share.items()}
  mean_f1 = np.mean([curves[i] for i in range(len(images))], axis=0)
  return _best_threshold(mean_f1, config, val_images=[im.name for im in images])


def _best_threshold(mean_f1: np.ndarray, config, **validated) -> dict:
  """{"threshold", "val_f1", **validated, "postprocess"}: the candidate of THRESHOLD_CANDIDATES with the highest
  mean F1 (`mean_f1`, one per candidate; ties go to the lowest threshold) and the post-processing it was chosen with."""
  best = int(np.argmax(mean_f1))
  return {"threshold": float(THRESHOLD_CANDIDATES[best]), "val_f1": float(mean_f1[best]), **validated,
          "postprocess": postprocess.options_from(config.predict.get("postprocess"))}


def choose_threshold_on_patches(forward, images: list[PreparedImage], patches: np.ndarray, crop_size: int,
                                config) -> dict:
  """The threshold that maximises the mean official F1 over validation patches of the training images (the paper's
  split, config.data.split.mode="patch").

  Each image that holds validation patches is predicted whole (sliding window, as at test time), and every patch is
  scored on its own window of the probability map, so that a patch's prediction sees the same context as the image's.
  Every process predicts every image together (`forward` spans all hosts) and scores all patches alike.

  Args:
    forward: the tile forward over all devices.
    images: the training images the patches index.
    patches: int [N, 3] (image, row, col) from `pipeline.val_patches`.
    crop_size: the patch side.
    config: the run config (predict and eval settings).

  Returns:
    {"threshold", "val_f1" (mean over patches), "val_patches" (how many), "val_images" (names of the images they
    come from), "postprocess"}.
  """
  if not len(patches):
    raise ValueError("choose_threshold_on_patches needs at least one validation patch; raise "
                     "config.data.split.val_fraction or num_val, or set config.predict.threshold.")
  total = np.zeros(len(THRESHOLD_CANDIDATES))
  names = []
  for index in tqdm(np.unique(patches[:, 0]), desc="validate", unit="image", leave=False,
                    disable=not multihost.is_writer()):
    im = images[int(index)]
    names.append(im.name)
    probability = probabilities(forward, np.asarray(im.image()), config.predict)
    gt = ground_truth(im, config)
    for _, row, col in patches[patches[:, 0] == index]:
      window = np.s_[row:row + crop_size, col:col + crop_size]
      total += f1_per_threshold(probability[window], np.ascontiguousarray(gt[window]), config.predict,
                                gt_mode=config.eval.gt_mode)
    del probability
  return _best_threshold(total / len(patches), config, val_patches=int(len(patches)), val_images=names)


def intensity_baseline(train_images: list[PreparedImage], test_images: list[PreparedImage], config) -> dict:
  """The best global intensity threshold (membrane = gray <= t) chosen on the training images, scored on the test
  images: what a network has to beat."""

  def darkness(im):  # Higher = darker = more membrane-like, as the threshold sweep expects.
    return 255 - np.asarray(im.image(), np.int16)

  gt_mode = config.eval.gt_mode
  candidates = np.arange(256)  # darkness >= c  <=>  gray <= 255 - c
  level, train_f1 = thresholds.select_threshold([darkness(im) for im in train_images],
                                                [ground_truth(im, config) for im in train_images],
                                                candidates, gt_mode=gt_mode)
  gray_threshold = 255 - int(level)
  per_image = [score_submission(inference.submission(np.asarray(im.image()) <= gray_threshold),
                                ground_truth(im, config), gt_mode=gt_mode) for im in test_images]
  mean, sem = official.mean_and_sem([r["f1"] for r in per_image])
  return {"gray_threshold": gray_threshold, "train_f1": train_f1, "f1": mean, "f1_sem": sem,
          "precision": float(np.mean([r["precision"] for r in per_image])),
          "recall": float(np.mean([r["recall"] for r in per_image]))}


def score_submission(pred: np.ndarray, gt: np.ndarray, *, gt_mode: str) -> dict:
  """Official F1, precision and recall of a submission array; a format violation scores 0 and is reported."""
  try:
    f1, precision, recall = official.official_f1(pred, gt, gt_mode=gt_mode)
    return {"f1": f1, "precision": precision, "recall": recall}
  except official.SubmissionFormatError as error:
    return {"f1": 0.0, "precision": 0.0, "recall": 0.0, "rejected": str(error)}


def write_outputs(out_dir: pathlib.Path, name: str, image: np.ndarray, probability: np.ndarray,
                  membrane: np.ndarray, truth_membrane: np.ndarray | None = None) -> None:
  outputs.write_tiff(out_dir / f"{name}.tiff", inference.submission(membrane))
  outputs.write_tiff(out_dir / "probabilities" / f"{name}.tif", probability.astype(np.float32))
  outputs.write_png(out_dir / "overlays" / f"{name}.png", inference.overlay(image, membrane, truth_membrane))


def predict_and_score(forward, images: list[PreparedImage], config, *, threshold: float,
                      out_dir: pathlib.Path) -> dict | None:
  """Predicts each labelled image, writes its outputs, and scores the written submission officially.

  In a multi-host run every process predicts (each computes its share of the tiles) and process 0 writes and
  scores; the others return None.
  """
  writer = multihost.is_writer()
  per_image = []
  for im in tqdm(images, desc="test", unit="image", disable=not writer):
    image = np.asarray(im.image())
    probability = probabilities(forward, image, config.predict)
    if not writer:
      continue
    membrane = membrane_mask(probability, threshold, config.predict)
    gt = ground_truth(im, config)
    write_outputs(out_dir, im.name, image, probability, membrane, gt < 255)
    scores = score_submission(official.read_gray8(out_dir / f"{im.name}.tiff"), gt, gt_mode=config.eval.gt_mode)
    per_image.append({"name": im.name, **scores})
  if not writer:
    return None
  mean, sem = official.mean_and_sem([r["f1"] for r in per_image])
  return {"f1": mean, "f1_sem": sem, "precision": float(np.mean([r["precision"] for r in per_image])),
          "recall": float(np.mean([r["recall"] for r in per_image])), "per_image": per_image}


def restore_variables(config, workdir: pathlib.Path, model) -> tuple[dict, int, dict]:
  """({"params", "batch_stats"}, step, meta) of the latest checkpoint in workdir/checkpoints, on the first local
  device (in a multi-host run: replicated over every device, which all processes restore together)."""
  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", create=False)
  tx = optim.optimizer_from_config(config.optim, config.train.num_steps)
  abstract = jax.eval_shape(lambda rng: state.init_state(model, tx, rng, config.data.crop_size), jax.random.key(0))
  if jax.process_count() == 1:
    placement = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  else:
    placement = sharding.replicated(sharding.mesh_from_config((("data", -1),)))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), abstract)
  restored = checkpointer.restore_latest(target)
  checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}: train first (--mode=train) or pass the "
                            "--workdir of a trained run.")
  return {"params": restored.state.params, "batch_stats": restored.state.batch_stats}, restored.step, restored.meta


def stored_threshold(workdir: pathlib.Path, step: int) -> float | None:
  """The threshold chosen on validation images for checkpoint `step`, if one was stored."""
  path = workdir / THRESHOLD_FILE
  if not path.exists():
    return None
  stored = json.loads(path.read_text())
  return stored["threshold"] if stored.get("step") == step else None


def decision_threshold(config, workdir: pathlib.Path, step: int) -> float:
  """The probability threshold that turns checkpoint `step`'s output into membrane: config.predict.threshold if set,
  else the one chosen on validation images for that step, else 0.5."""
  if config.predict.threshold is not None:
    return float(config.predict.threshold)
  stored = stored_threshold(workdir, step)
  return 0.5 if stored is None else float(stored)


ERROR_REPORT = "prediction_errors.json"


def check_writable(folder: pathlib.Path) -> None:
  """Raises NotADirectoryError / PermissionError naming `folder` unless results can be written there: checked before
  the first image rather than found after a minute of prediction."""
  if folder.exists() and not folder.is_dir():
    raise NotADirectoryError(f"the output folder {folder} is a file; pass a folder (--config.predict.output=DIR).")
  try:
    folder.mkdir(parents=True, exist_ok=True)
    with outputs.atomic_path(folder / ".write-check"):
      pass
    (folder / ".write-check").unlink()
  except OSError as e:
    raise PermissionError(f"cannot write predictions to {folder} ({e.strerror}); pass a writable folder with "
                          "--config.predict.output=DIR.") from e


def input_scale_factor(config, path, shape=None) -> float:
  """How much `path` is enlarged before prediction (`resolution.scale_factor`): its pixel size,
  config.predict.input_pixel_nm or else what the file records, over config.data.pixel_nm (the training data's).
  1 when config.predict.match_resolution is off or either size is unknown. Given the image's `shape`, refuses a
  factor that would resample it beyond the pixel cap or below the network's minimum
  (`resolution.check_matched_shape`)."""
  if not config.predict.get("match_resolution", True):
    return 1.0
  input_nm, origin = config.predict.get("input_pixel_nm"), "config.predict.input_pixel_nm"
  if input_nm is None:
    input_nm, origin = resolution.pixel_size_nm(path), "from the file's resolution metadata"
  factor = resolution.scale_factor(input_nm, config.data.get("pixel_nm"))
  if shape is not None:
    resolution.check_matched_shape(path, shape, factor, input_nm=input_nm, train_nm=config.data.get("pixel_nm"),
                                   origin=origin)
  return factor


def predict_files(config, workdir: pathlib.Path) -> list[pathlib.Path]:
  """`--mode=predict`: the latest checkpoint predicts `config.predict.input` (an image or a folder of images).

  An image recorded at another pixel size than the training data's (config.predict.input_pixel_nm or the file's
  metadata against config.data.pixel_nm) is resampled to the training pixel size for prediction and its probability
  map back to the image's grid (config.predict.match_resolution, on by default; `resolution.py`).

  With config.predict.on_error="skip", an image that cannot be read is skipped and listed with its error in
  <output>/prediction_errors.json; with "stop" (the default) the run stops at it, naming it and what was written.
  Hidden files (names starting with ".") are not images of the folder; they are named in a warning.
  """
  workdir = pathlib.Path(workdir)
  if not config.predict.input:
    raise ValueError("--mode=predict needs --config.predict.input=PATH (an image file or a folder of images).")
  on_error = config.predict.get("on_error", "stop")
  paths = sources.image_files(config.predict.input)
  hidden = sources.hidden_files(config.predict.input)
  if hidden:
    logging.warning("not predicted, hidden files in %s: %s", config.predict.input, ", ".join(p.name for p in hidden))
  out_dir = pathlib.Path(config.predict.output or workdir / "predictions")
  writer = multihost.is_writer()  # every process predicts (its share of the tiles), process 0 writes
  if writer:
    check_writable(out_dir)
  model = state.build_model(config.model)
  variables, step, meta = restore_variables(config, workdir, model)
  if meta.get("normalization"):  # The input normalization the model was trained with.
    config.data.mean, config.data.std = meta["normalization"]["mean"], meta["normalization"]["std"]
  threshold = decision_threshold(config, workdir, step)
  forward = tile_forward(config, model, variables)
  written, failed, factors = [], [], {}
  for path in tqdm(paths, desc="predict", unit="image", disable=not writer):
    try:
      image = sources.read_image(path)
    except sources.DataError as e:
      if on_error != "skip":
        raise sources.DataError(f"{e} ({len(written)} of {len(paths)} images were predicted before it, into "
                                f"{out_dir}; --config.predict.on_error=skip skips such images and lists them)") from e
      failed.append({"file": str(path), "error": str(e)})
      continue
    factor = input_scale_factor(config, path, image.shape)
    factors[path.name] = factor
    probability = resolution.matched_probabilities(lambda gray: probabilities(forward, gray, config.predict), image,
                                                   factor)
    if writer:
      write_outputs(out_dir, path.stem, image, probability, membrane_mask(probability, threshold, config.predict))
      written.append(out_dir / f"{path.stem}.tiff")
  if writer and any(f != 1.0 for f in factors.values()):
    logging.info("resampled to the training pixel size (%s nm) by factors %s", config.data.get("pixel_nm"), factors)
  if writer and failed:
    outputs.write_json(out_dir / ERROR_REPORT, {"skipped": failed, "predicted": len(written)})
    logging.warning("%d of %d images could not be read and were skipped: %s", len(failed), len(paths),
                    out_dir / ERROR_REPORT)
  return written
