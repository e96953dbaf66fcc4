"""Predicting whole images with a trained model, choosing the threshold, writing submissions, scoring them.

Outputs per image, under an output folder:
  <name>.tiff                 the submission: uint8, black (0) = membrane, white (255) = background
  probabilities/<name>.tif    float32 membrane probability
  overlays/<name>.png         the prediction drawn on the image (with ground truth: TP green, FP red, FN blue)
"""

import json
import pathlib

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from urisc_jax import checkpoint, inference, optim, outputs, state
from urisc_jax.data import sources
from urisc_jax.data.prepare import PreparedImage
from urisc_jax.evaluation import f1 as official
from urisc_jax.evaluation import threshold as thresholds

THRESHOLD_CANDIDATES = np.round(np.arange(0.02, 0.99, 0.02), 2)
THRESHOLD_FILE = "threshold.json"


def local_mesh() -> Mesh:
  """A data-parallel mesh of this host's devices, for prediction (each host predicts its own images)."""
  return Mesh(np.asarray(jax.local_devices()), ("data",))


def tile_forward(config, model, variables) -> inference.TileForward:
  """The jitted tile forward of `config.predict`, sharded over local devices when the tile batch divides evenly."""
  mesh = local_mesh()
  if config.predict.batch_size % mesh.size:
    mesh = None
  return inference.make_tile_forward(model, variables, mean=config.data.mean, std=config.data.std,
                                     tta=config.predict.tta, mesh=mesh)


def probabilities(forward: inference.TileForward, image: np.ndarray, predict_config) -> np.ndarray:
  """float32 [H, W] membrane probability of a gray uint8 [H, W] image by sliding window."""
  logits = inference.predict_logits(forward, image, tile=predict_config.tile, step=predict_config.step,
                                    blend=predict_config.blend, batch_size=predict_config.batch_size,
                                    halo=predict_config.get("halo"))
  return inference.probabilities(logits)


def ground_truth(image: PreparedImage, data_config) -> np.ndarray:
  """The ground truth the official scorer sees: the label file as read from disk, black = membrane.

  When the label needed another polarity or a threshold to decode, it is rebuilt from the decoded mask in the
  official polarity instead.
  """
  if data_config.membrane == "black" and data_config.label_threshold is None:
    return official.read_gray8(image.source_label)
  return inference.submission(np.asarray(image.label(), bool))


def choose_threshold(forward, images: list[PreparedImage], config) -> dict:
  """The probability threshold that maximises the mean official F1 on `images` (the validation split)."""
  scores = [probabilities(forward, np.asarray(im.image()), config.predict)
            for im in tqdm(images, desc="validate", unit="image", leave=False)]
  truths = [ground_truth(im, config.data) for im in images]
  best, mean_f1 = thresholds.select_threshold(scores, truths, THRESHOLD_CANDIDATES, gt_mode=config.eval.gt_mode)
  return {"threshold": best, "val_f1": mean_f1, "val_images": [im.name for im in images]}


def intensity_baseline(train_images: list[PreparedImage], test_images: list[PreparedImage], data_config, *,
                       gt_mode: str) -> dict:
  """The best global intensity threshold (membrane = gray <= t) chosen on the training images, scored on the test
  images: what a network has to beat."""
  def darkness(im):  # Higher = darker = more membrane-like, as the threshold sweep expects.
    return 255 - np.asarray(im.image(), np.int16)

  candidates = np.arange(256)  # darkness >= c  <=>  gray <= 255 - c
  level, train_f1 = thresholds.select_threshold([darkness(im) for im in train_images],
                                                [ground_truth(im, data_config) for im in train_images],
                                                candidates, gt_mode=gt_mode)
  gray_threshold = 255 - int(level)
  per_image = [score_submission(inference.submission(np.asarray(im.image()) <= gray_threshold),
                                ground_truth(im, data_config), gt_mode=gt_mode) for im in test_images]
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
                      out_dir: pathlib.Path) -> dict:
  """Predicts each labelled image, writes its outputs, and scores the written submission officially."""
  per_image = []
  for im in tqdm(images, desc="test", unit="image"):
    image = np.asarray(im.image())
    probability = probabilities(forward, image, config.predict)
    membrane = probability >= threshold
    gt = ground_truth(im, config.data)
    write_outputs(out_dir, im.name, image, probability, membrane, gt < 255)
    scores = score_submission(official.read_gray8(out_dir / f"{im.name}.tiff"), gt, gt_mode=config.eval.gt_mode)
    per_image.append({"name": im.name, **scores})
  mean, sem = official.mean_and_sem([r["f1"] for r in per_image])
  return {"f1": mean, "f1_sem": sem, "precision": float(np.mean([r["precision"] for r in per_image])),
          "recall": float(np.mean([r["recall"] for r in per_image])), "per_image": per_image}


def restore_variables(config, workdir: pathlib.Path, model) -> tuple[dict, int, dict]:
  """({"params", "batch_stats"}, step, meta) of the latest checkpoint in workdir/checkpoints, on the first device."""
  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints")
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}: train first (--mode=train) or pass the "
                            "--workdir of a trained run.")
  tx = optim.optimizer_from_config(config.optim, config.train.num_steps)
  abstract = jax.eval_shape(lambda rng: state.init_state(model, tx, rng, config.data.crop_size), jax.random.key(0))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  restored, _, meta = checkpointer.restore(step, target)
  checkpointer.close()
  return {"params": restored.params, "batch_stats": restored.batch_stats}, step, meta


def stored_threshold(workdir: pathlib.Path, step: int) -> float | None:
  """The threshold chosen on validation images for checkpoint `step`, if one was stored."""
  path = workdir / THRESHOLD_FILE
  if not path.exists():
    return None
  stored = json.loads(path.read_text())
  return stored["threshold"] if stored.get("step") == step else None


def predict_files(config, workdir: pathlib.Path) -> list[pathlib.Path]:
  """`--mode=predict`: the latest checkpoint predicts `config.predict.input` (an image or a folder of images)."""
  workdir = pathlib.Path(workdir)
  if not config.predict.input:
    raise ValueError("--mode=predict needs --config.predict.input=PATH (an image file or a folder of images).")
  model = state.build_model(config.model)
  variables, step, meta = restore_variables(config, workdir, model)
  if meta.get("normalization"):  # The input normalization the model was trained with.
    config.data.mean, config.data.std = meta["normalization"]["mean"], meta["normalization"]["std"]
  threshold = config.predict.threshold
  if threshold is None:
    threshold = stored_threshold(workdir, step)
  if threshold is None:
    threshold = 0.5
  forward = tile_forward(config, model, variables)
  out_dir = pathlib.Path(config.predict.output or workdir / "predictions")
  written = []
  for path in tqdm(sources.image_files(config.predict.input), desc="predict", unit="image"):
    image = sources.read_image(path)
    probability = probabilities(forward, image, config.predict)
    write_outputs(out_dir, path.stem, image, probability, probability >= threshold)
    written.append(out_dir / f"{path.stem}.tiff")
  return written
