"""Training: model and optimizer from config, a jitted, donated, sharded step, and the loop with resume.

The step is one pure function `train_step(state, batch, rng) -> (state, metrics)` compiled with `jax.jit` over a
`Mesh`: the batch is split over the `data` axis, parameters are replicated, and because the computation is written
for the global batch, BatchNorm statistics and gradients are those of the whole batch (XLA inserts the
all-reduces). The loop restores the latest checkpoint (model, optimizer, step and data iterator) before it starts.
"""

import dataclasses
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from urisc_jax import checkpoint, losses, models, multihost, optim, outputs, predict, run_log, sharding
from urisc_jax.data import dataset, pipeline
from urisc_jax.data.normalize import normalize
from urisc_jax.data.prepare import PreparedImage
from urisc_jax.evaluation import ground_truth, report, two_class
from urisc_jax.state import TrainState, build_model, create_state, load_pretrained_encoder


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, loss_fn, *, mean: float, std: float,
                    deep_supervision: bool = False):
  """Returns train_step(state, batch, rng) -> (state, metrics) for uint8 batches {"image", "label"} [N, S, S, 1].

  With `deep_supervision` the loss also supervises the side logits the model sows (CASENet), see
  `losses.deeply_supervised`. Gradient accumulation lives in `tx` (optax.MultiSteps): every call is one micro-step.
  """
  collections = ["batch_stats", "intermediates"] if deep_supervision else ["batch_stats"]

  def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    images = normalize(batch["image"], mean=mean, std=std)
    labels = batch["label"].astype(jnp.float32)

    def loss_of(params):
      logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                    mutable=collections, rngs={"dropout": jax.random.fold_in(rng, state.step)})
      if deep_supervision:
        loss = losses.deeply_supervised(loss_fn, logits, labels, losses.side_logits(updates))
      else:
        loss = loss_fn(logits, labels)
      return loss, (updates.get("batch_stats", {}), logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    predicted = logits >= 0
    truth = labels > 0.5
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "pixel_accuracy": jnp.mean(predicted == truth),
        "membrane_fraction_predicted": jnp.mean(predicted),
    }
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return train_step


def compile_train_step(train_step, state: TrainState, state_shardings, mesh, global_batch: int, crop_size: int,
                       rng: jax.Array):
  """Compiles `train_step` for global batches [global_batch, crop, crop, 1] before the first batch arrives.

  Ahead of time, so that compilation is timed on its own (and read from the persistent compilation cache when a
  rerun or a resume has compiled the same program before, see `platforms.enable_compilation_cache`).

  Returns:
    (compiled step, seconds it took).
  """
  jitted = jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh), None),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))
  shape = (global_batch, crop_size, crop_size, 1)
  batch = {key: jax.ShapeDtypeStruct(shape, np.uint8, sharding=sharding.batch_sharding(mesh))
           for key in ("image", "label")}
  started = time.perf_counter()
  compiled = jitted.lower(state, batch, rng).compile()
  return compiled, time.perf_counter() - started


class NonFiniteLossError(FloatingPointError):
  pass


def _config_normalization(config) -> dict[str, float]:
  return {"mean": float(config.data.mean), "std": float(config.data.std)}


@dataclasses.dataclass(frozen=True)
class PatchValidation:
  """The paper's validation set: patches of the training images that training never draws (split.mode="patch")."""
  images: list[PreparedImage]
  patches: np.ndarray  # int [N, 3] (image, row, col)


def validation_set(config, train_images: list[PreparedImage],
                   val_images: list[PreparedImage] | None) -> "list[PreparedImage] | PatchValidation | None":
  """What validation scores: the validation patches in patch mode, else the validation images (None or [] = none)."""
  patches = pipeline.val_patches(config.data, train_images, seed=config.seed)
  if patches is None:
    return val_images
  return PatchValidation(train_images, patches)


def validate(config, binders, state: TrainState, val_images: "list[PreparedImage] | PatchValidation") -> dict:
  """Official-scorer F1 of the current state on the validation images at the threshold that maximizes it there.

  Args:
    config: the run config (its predict and eval settings are used).
    binders: `prediction_binders(config, model)`, compiled once for every validation of a run.
    state: the state to score.
    val_images: prepared, labelled validation images, or the validation patches of the training images.

  Returns:
    {"threshold", "val_f1", "val_images", "postprocess"} as `predict.choose_threshold` gives them; in a multi-host
    run (the processes share the images or the tiles) process 0's, so that every process decides alike on it.
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  bind_global, bind_local = binders
  forward = bind_global(variables)
  if isinstance(val_images, PatchValidation):
    return multihost.broadcast_object(predict.choose_threshold_on_patches(
        forward, val_images.images, val_images.patches, config.data.crop_size, config))
  local_forward = bind_local(variables) if bind_local else None
  return multihost.broadcast_object(predict.choose_threshold(forward, val_images, config, local_forward=local_forward))


def prediction_binders(config, model) -> tuple:
  """(bind over every host's devices, bind over this process's devices or None): the tile forwards validation and
  the test prediction use, compiled on first use. The second exists in multi-host runs only, where each process
  validates its share of the images alone (`predict.choose_threshold`)."""
  bind_local = predict.tile_forward_binder(config, model, local=True) if jax.process_count() > 1 else None
  return predict.tile_forward_binder(config, model), bind_local


def check_transfer(config) -> None:
  """Raises a ValueError when the config asks for pretrained encoder weights (transfer.required) but names none."""
  if config.transfer.get("required", False) and not config.transfer.checkpoint:
    raise ValueError("this config starts the encoder from pretrained weights: pass "
                     "--config.transfer.checkpoint=PATH/TO/cem500k_mocov2_resnet50_200ep.pth.tar (CEM500K MoCoV2, "
                     "Zenodo record 6453140) or another torchvision-style ResNet checkpoint")


def train(config, workdir: str | pathlib.Path, train_images: list[PreparedImage],
          val_images: "list[PreparedImage] | PatchValidation | None" = None, *, progress: bool = True) -> tuple[nn.Module, TrainState, dict]:
  """Trains for `config.train.num_steps` steps, resuming from `workdir/checkpoints` when a checkpoint exists.

  Every `config.train.eval_every` steps (and at the last step) the state is scored on `val_images` with the official
  F1 at the best threshold; the scores are logged as val_f1 / val_threshold, and the best-scoring state is kept in
  `workdir/checkpoints_best` beside the last `config.train.keep_checkpoints` ones.

  Args:
    config: the full run config.
    workdir: run folder; receives checkpoints/, checkpoints_best/, metrics.jsonl, tensorboard/ and loss_curve.png.
    train_images: prepared, labelled training images.
    val_images: prepared, labelled validation images, or the validation patches of the training images
      (`validation_set`); None or [] skips validation during training.
    progress: show a progress bar.

  Returns:
    (model, final state, summary dict with steps, seconds, throughput, and the last and best validation results).
  """
  workdir = pathlib.Path(workdir)
  check_transfer(config)
  mesh = sharding.mesh_from_config(config.mesh)
  sharding.check_spatial_axis_within_hosts(mesh)
  sharding.check_spatial_split(mesh, config.data.crop_size, stride=models.input_multiple(config.model.name))
  num_steps = config.train.num_steps
  global_batch = config.train.batch_size
  if global_batch % sharding.data_parallel_size(mesh):
    raise ValueError(f"config.train.batch_size={global_batch} must be divisible by the mesh's data axis "
                     f"({sharding.data_parallel_size(mesh)} devices): change the batch size or config.mesh.")
  model = build_model(config.model)
  tx = optim.optimizer_from_config(config.optim, num_steps)
  learning_rate = optim.schedule_from_config(config.optim, num_steps)  # for logging only
  loss_fn = losses.from_config(config.loss)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  state, state_shardings = create_state(model, tx, mesh, init_rng, config.data.crop_size)

  examples = pipeline.CropExamples(train_images, crop_size=config.data.crop_size, seed=config.seed,
                                   augment=config.data.get("augment"),
                                   patches=pipeline.train_patches(config.data, train_images, seed=config.seed))
  dataset = pipeline.train_dataset(examples, num_steps=num_steps, global_batch_size=global_batch,
                                   process_index=jax.process_index(), process_count=jax.process_count())
  data_iter = pipeline.iterator(dataset, num_workers=config.data.num_workers)

  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints)
  restored = checkpointer.restore_latest(state)
  start_step = restored.step if restored else 0
  if restored:
    if restored.skipped:  # Written again as training passes them; the damaged files are kept aside.
      checkpointer.set_aside(restored.skipped)
    state = restored.state
    data_iter.set_state(restored.data)
    normalization = restored.meta.get("normalization") or _config_normalization(config)
  else:
    normalization = _config_normalization(config)
    if config.transfer.checkpoint:
      state, info = load_pretrained_encoder(state, config.transfer.checkpoint, state_shardings)
      if info.normalization is not None:
        normalization = {"mean": info.normalization.mean, "std": info.normalization.std}
  meta = {"normalization": normalization}

  step_fn, compile_seconds = compile_train_step(
      make_train_step(model, tx, loss_fn, deep_supervision=config.loss.get("deep_supervision", False),
                      **normalization),
      state, state_shardings, mesh, global_batch, config.data.crop_size, step_rng)
  logger = run_log.MetricsLogger(workdir, enabled=multihost.is_writer())
  eval_every = config.train.get("eval_every", 0) if val_images else 0
  best = checkpoint.BestCheckpoint(workdir / "checkpoints_best") if eval_every else None
  binders = prediction_binders(config, model) if eval_every else None
  validation = None
  pending, started, images_seen, validation_seconds = [], None, 0, []
  step = start_step
  with multihost.StopRequest() as stop, tqdm(total=num_steps, initial=start_step, desc="train", unit="step",
                                             disable=not progress or not multihost.is_writer()) as bar:
    while step < num_steps:
      batch = sharding.global_batch_from_local(mesh, next(data_iter))
      state, metrics = step_fn(state, batch, step_rng)
      step += 1
      if pending:
        # Wait for the previous step only, so the progress bar and ETA are true while the device stays busy.
        jax.block_until_ready(pending[-1])
      pending.append(metrics)
      if started is None:  # Do not count the first step (buffers allocated, data workers warming up).
        jax.block_until_ready(metrics)
        started = time.perf_counter()
      else:
        images_seen += global_batch
      final = step == num_steps
      evaluate = bool(eval_every) and (step % eval_every == 0 or final)
      if step % config.train.log_every == 0 or final or evaluate:
        averaged = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
        pending = []
        if not np.isfinite(averaged["loss"]):
          raise NonFiniteLossError(
              f"Loss became {averaged['loss']} by step {step}; the last good checkpoint is kept in "
              f"{checkpointer.directory} (step {checkpointer.latest_step()}). Lower config.optim.learning_rate or "
              "check the data.")
        averaged["learning_rate"] = float(learning_rate(step - 1))
        if evaluate:
          validation_started = time.perf_counter()
          validation = {"step": step, **validate(config, binders, state, val_images)}
          validation_seconds.append(time.perf_counter() - validation_started)
          averaged.update(val_f1=validation["val_f1"], val_threshold=validation["threshold"])
          best.offer(step, state, validation["val_f1"], meta={"threshold": validation["threshold"], **meta})
        logger.write(step, averaged)
        bar.set_postfix(loss=f"{averaged['loss']:.4f}",
                        **({"val_f1": f"{validation['val_f1']:.4f}"} if validation else {}))
      bar.update(1)
      stopping = stop.should_stop(step)  # the same answer on every process, at the same step
      if final or stopping or step % config.train.checkpoint_every == 0:
        checkpointer.save(step, state, data=data_iter.get_state(), meta={"step": step, **meta})
      if stopping and not final:
        checkpointer.close()
        if best:
          best.close()
        logger.close()
        raise multihost.Preempted(f"SIGTERM received: saved step {step} to {checkpointer.directory}; rerun the "
                                  "same command to resume.")
  checkpointer.close()
  if best:
    best.close()
  logger.close()
  if multihost.is_writer() and (workdir / "metrics.jsonl").exists():
    run_log.plot_curves(workdir / "metrics.jsonl", workdir / "loss_curve.png")
  elapsed = time.perf_counter() - started if started else 0.0
  summary = {"steps": num_steps, "resumed_from": start_step, "train_seconds": elapsed,
             "compile_seconds": {"train_step": compile_seconds}, "validation_seconds": validation_seconds,
             "images_per_second": images_seen / elapsed if elapsed else None, "validation": validation,
             "best": {"step": best.best_step, "val_f1": best.best_score} if best else None, **meta}
  return model, state, summary



def two_class_scores(images: list[PreparedImage], predictions_dir: pathlib.Path, *, threshold: float) -> dict:
  """`evaluation.two_class.dataset_scores` of the probability maps written under `predictions_dir` (thresholded as
  they are, before any config.predict.postprocess)."""
  probabilities = [report.read_probability(predictions_dir / "probabilities" / f"{im.name}.tif") for im in images]
  return two_class.dataset_scores(probabilities, [np.asarray(im.label(), bool) for im in images],
                                  threshold=threshold, names=[im.name for im in images])


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict:
  """The whole pipeline: data -> training (resumable) -> threshold on validation -> test prediction -> official F1.

  Writes workdir/metrics.json (test F1 with precision, recall and s.e., the intensity-threshold baseline F1, the
  threshold, timings) and workdir/predictions/ (submission TIFFs, probabilities, overlays); workdir/overlay.png is the
  first test image's overlay.

  Returns:
    The metrics dict written to metrics.json.
  """
  workdir = pathlib.Path(workdir)
  check_transfer(config)
  started = time.perf_counter()
  # In a multi-host run process 0 writes the dataset and the decode cache first; the others then read them.
  splits = multihost.first_then_others(
      lambda: {name: dataset.prepared_split(config.data, workdir, getattr(config.data, f"{name}_split"),
                                            progress=multihost.is_writer())
               for name in ("train", "val", "test")}, "prepare data")
  validation_data = validation_set(config, splits["train"], splits["val"])
  model, state, train_summary = train(config, workdir, splits["train"], validation_data)
  # Predict with the normalization the model was trained with (a transfer checkpoint may have set it).
  config.data.mean, config.data.std = train_summary["normalization"]["mean"], train_summary["normalization"]["std"]
  # Every process predicts (each computes its share of every batch of tiles); process 0 writes and scores.
  binders = prediction_binders(config, model)
  forward = binders[0]({"params": state.params, "batch_stats": state.batch_stats})
  step = int(state.step)
  last_validation = train_summary["validation"]
  if config.predict.threshold is not None:
    chosen = {"threshold": float(config.predict.threshold), "val_f1": None, "val_images": []}
  elif last_validation and last_validation["step"] == step:  # Validated at the last step while training.
    chosen = {k: v for k, v in last_validation.items() if k != "step"}
  elif validation_data:
    chosen = validate(config, binders, state, validation_data)
  else:
    chosen = {"threshold": 0.5, "val_f1": None, "val_images": []}
  test = predict.predict_and_score(forward, splits["test"], config, threshold=chosen["threshold"],
                                   out_dir=workdir / "predictions")
  if not multihost.is_writer():
    return {}
  outputs.write_json(workdir / predict.THRESHOLD_FILE, {"step": step, **chosen})
  baseline = predict.intensity_baseline(splits["train"], splits["test"], config)
  if splits["test"]:
    first = workdir / "predictions" / "overlays" / f"{splits['test'][0].name}.png"
    (workdir / "overlay.png").write_bytes(first.read_bytes())
  if config.eval.two_class and splits["test"]:
    test["two_class"] = two_class_scores(splits["test"], workdir / "predictions", threshold=chosen["threshold"])
  metrics = {
      "f1": test["f1"], "f1_sem": test["f1_sem"], "precision": test["precision"], "recall": test["recall"],
      "baseline_f1": baseline["f1"], "baseline_f1_sem": baseline["f1_sem"], "baseline": baseline,
      "threshold": chosen["threshold"], "val_f1": chosen["val_f1"],
      # Validation patches of the training images (split.mode="patch"); None when validation is by image.
      "val_patches": chosen.get("val_patches"),
      # What the scorer saw: "official" (labels as released) or "binarized@122" (evaluation/ground_truth.py).
      "gt_mode": ground_truth.describe(config.eval.gt_mode),
      # Submissions the official scorer refused (scored 0), e.g. ISBI-like membrane fractions; see two_class.
      "rejected_by_official_scorer": sum("rejected" in row for row in test["per_image"]),
      "per_image": test["per_image"], "two_class": test.get("two_class"), "step": step, "train": train_summary,
      "num_images": {name: len(images) for name, images in splits.items()},
      "wall_seconds": time.perf_counter() - started,
  }
  outputs.write_json(workdir / "metrics.json", metrics)
  return metrics
