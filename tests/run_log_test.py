"""Training logs: metrics.jsonl lines, TensorBoard tags, and the loss-curve figure."""

import json

import numpy as np
from PIL import Image

from urisc_jax import run_log


def test_logger_appends_one_line_per_step(tmp_path):
  logger = run_log.MetricsLogger(tmp_path)
  logger.write(1, {"loss": np.float32(0.5)})
  logger.write(2, {"loss": 0.25, "val_f1": 0.7})
  logger.close()
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "val_f1": 0.7}]
  assert any((tmp_path / "tensorboard").iterdir())


def test_validation_scalars_get_their_own_tensorboard_group():
  assert run_log.tensorboard_tag("val_f1") == "val/f1"
  assert run_log.tensorboard_tag("loss") == "train/loss"


def test_a_step_logged_again_after_a_resume_keeps_its_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  steps_and_losses = [(1, 0.9), (2, 0.8), (3, 0.7), (2, 0.85), (3, 0.75), (4, 0.6)]  # killed after 3, resumed from 1
  path.write_text("".join(json.dumps({"step": s, "loss": l}) + "\n" for s, l in steps_and_losses))
  assert [(r["step"], r["loss"]) for r in run_log.read_metrics(path)] == [(1, 0.9), (2, 0.85), (3, 0.75), (4, 0.6)]


def test_curve_png_is_written_with_and_without_validation(tmp_path):
  path = tmp_path / "metrics.jsonl"
  records = [{"step": s, "loss": 1.0 / s} for s in range(1, 11)]
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  plain = run_log.plot_curves(path, tmp_path / "plain.png")
  records[4]["val_f1"], records[9]["val_f1"] = 0.6, 0.8
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  with_validation = run_log.plot_curves(path, tmp_path / "curve.png")
  for png in (plain, with_validation):
    with Image.open(png) as image:
      assert image.format == "PNG" and image.width > 100 and image.height > 100
  assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind
  # The validation axis draws something the plain figure does not have.
  assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(with_validation)))
