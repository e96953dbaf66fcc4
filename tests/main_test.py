"""End to end through the command line: synthetic data -> training -> checkpoints -> prediction -> official F1."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from urisc_jax.evaluation import f1 as official

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(workdir, *flags):
  command = [sys.executable, "-m", "urisc_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}", *flags]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tiny")
  _main(workdir, "--config.train.num_steps=4", "--config.eval.two_class=True")
  return workdir


def test_run_writes_metrics_with_f1_and_baseline(tiny_run):
  metrics = json.loads((tiny_run / "metrics.json").read_text())
  for key in ("f1", "precision", "recall", "baseline_f1", "threshold"):
    assert 0.0 <= metrics[key] <= 1.0, key
  assert metrics["step"] == 4 and metrics["num_images"] == {"train": 2, "val": 1, "test": 1}


def test_the_run_keeps_its_compiled_programs_in_the_cache_folder(tiny_run, compilation_cache):
  metrics = json.loads((tiny_run / "metrics.json").read_text())
  assert metrics["train"]["compile_seconds"]["train_step"] > 0
  assert any(compilation_cache.iterdir())  # URISC_JAX_CACHE, as conftest set it for the run


def test_two_class_scores_are_reported_when_asked_for(tiny_run):
  metrics = json.loads((tiny_run / "metrics.json").read_text())
  scores = metrics["two_class"]
  assert scores["threshold"] == metrics["threshold"]
  for key in ("membrane_f1", "interior_f1", "pixel_error", "v_rand", "v_info"):
    assert 0.0 <= scores[key] <= 1.0, key
  assert [row["name"] for row in scores["per_image"]] == [row["name"] for row in metrics["per_image"]]


def test_predictions_are_valid_submissions_scored_as_reported(tiny_run):
  metrics = json.loads((tiny_run / "metrics.json").read_text())
  [entry] = metrics["per_image"]
  pred = official.read_gray8(tiny_run / "predictions" / f"{entry['name']}.tiff")
  assert set(np.unique(pred)) <= {0, 255}
  gt = official.read_gray8(next((tiny_run / "data" / "label" / "Track1" / "test").glob(f"{entry['name']}.*")))
  if "rejected" not in entry:
    official.check_prediction_format(pred)
    np.testing.assert_allclose(official.official_f1(pred, gt)[0], entry["f1"], rtol=1e-12)
  assert (tiny_run / "overlay.png").stat().st_size > 0
  assert (tiny_run / "predictions" / "probabilities" / f"{entry['name']}.tif").exists()


def test_run_logs_each_step_and_keeps_checkpoints(tiny_run):
  lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [1, 2, 3, 4]
  assert all(np.isfinite(line["loss"]) for line in lines)
  assert sorted(int(p.name) for p in (tiny_run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
  config = json.loads((tiny_run / "config.json").read_text())
  assert config["train"]["num_steps"] == 4  # the override reached the config


def test_validation_during_training_is_logged_and_keeps_the_best_state(tiny_run):
  lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
  validated = {line["step"]: line for line in lines if "val_f1" in line}
  assert sorted(validated) == [2, 4]  # tiny validates every 2 steps
  assert all(0.0 <= v["val_f1"] <= 1.0 and 0.0 < v["val_threshold"] < 1.0 for v in validated.values())
  metrics = json.loads((tiny_run / "metrics.json").read_text())
  # The threshold of the final validation is the one used on the test images.
  assert metrics["threshold"] == validated[4]["val_threshold"] and metrics["val_f1"] == validated[4]["val_f1"]
  best = metrics["train"]["best"]
  assert best["val_f1"] == max(v["val_f1"] for v in validated.values())
  assert [int(p.name) for p in (tiny_run / "checkpoints_best").iterdir() if p.name.isdigit()] == [best["step"]]
  assert (tiny_run / "loss_curve.png").stat().st_size > 0


def test_rerun_resumes_from_the_latest_checkpoint(tiny_run):
  result = _main(tiny_run, "--config.train.num_steps=6")
  metrics = json.loads((tiny_run / "metrics.json").read_text())
  assert metrics["train"]["resumed_from"] == 4 and metrics["step"] == 6
  steps = [json.loads(line)["step"] for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert '"f1"' in result.stdout


def test_unknown_config_key_is_refused(tmp_path):
  command = [sys.executable, "-m", "urisc_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
             "--config.train.num_stepz=3"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "num_stepz" in result.stderr


def test_predict_mode_writes_submissions_for_a_folder(tiny_run, tmp_path):
  images = tiny_run / "data" / "imgs" / "Track1" / "test"
  _main(tiny_run, "--mode=predict", f"--config.predict.input={images}", f"--config.predict.output={tmp_path}",
        "--config.predict.halo=16")
  for image in images.glob("*.png"):
    pred = official.read_gray8(tmp_path / f"{image.stem}.tiff")
    assert pred.shape == official.read_gray8(image).shape and set(np.unique(pred)) <= {0, 255}
    assert (tmp_path / "overlays" / f"{image.stem}.png").exists()


def test_evaluate_mode_scores_a_prediction_folder(tiny_run):
  gt_dir = tiny_run / "data" / "label" / "Track1" / "test"
  _main(tiny_run, "--mode=evaluate", f"--config.eval.pred_dir={tiny_run / 'predictions'}",
        f"--config.eval.gt_dir={gt_dir}")
  report = json.loads((tiny_run / "evaluation" / "evaluation.json").read_text())
  metrics = json.loads((tiny_run / "metrics.json").read_text())
  assert report["mean_f1"] == pytest.approx(metrics["f1"], abs=1e-12)
  assert (tiny_run / "evaluation" / "evaluation.md").exists()


def _losses_by_step(workdir):
  """The last logged loss of each step (a resumed run logs the steps it redoes again)."""
  losses = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    losses[record["step"]] = record["loss"]
  return losses


def test_a_run_killed_with_sigkill_and_resumed_repeats_the_uninterrupted_losses(tmp_path):
  import signal
  import time
  flags = ["--config.train.num_steps=12", "--config.data.root=" + str(tmp_path / "data")]
  _main(tmp_path / "whole", *flags)
  command = [sys.executable, "-m", "urisc_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'killed'}",
             *flags]
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  log, checkpoints = tmp_path / "killed" / "metrics.jsonl", tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline and process.poll() is None:
    # Kill once a checkpoint is complete (renamed into place) and the run has gone past it.
    saved = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()] if checkpoints.exists() else []
    if saved and log.exists() and len(log.read_text().splitlines()) > max(saved):
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
  _main(tmp_path / "killed", *flags)
  metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
  assert metrics["train"]["resumed_from"] >= 2
  whole, resumed = _losses_by_step(tmp_path / "whole"), _losses_by_step(tmp_path / "killed")
  assert sorted(resumed) == list(range(1, 13))
  assert resumed == whole  # bit-identical: same data, same state, same step function


def test_criteria_mode_compares_prepared_test_images_with_downsampled_versions(tiny_run):
  _main(tiny_run, "--mode=criteria", "--config.criteria.scale=0.5", "--config.criteria.methods=('area',)")
  result = json.loads((tiny_run / "criteria" / "criteria.json").read_text())
  metrics = json.loads((tiny_run / "metrics.json").read_text())
  assert {row["image"] for row in result["rows"]} == {row["name"] for row in metrics["per_image"]}
  assert sorted({(row["version"], row["height"], row["width"]) for row in result["rows"]}) == [
      ("area", 96, 80), ("original", 192, 160)]


def test_attribute_mode_writes_statistics_with_completeness_gaps(tiny_run):
  _main(tiny_run, "--mode=attribute", "--config.attribution.steps=16", "--config.attribution.max_nodes=16",
        "--config.attribution.num_targets=1")
  targets = json.loads((tiny_run / "attribution" / "targets.json").read_text())
  entries = targets if isinstance(targets, list) else targets["targets"]
  assert entries and all("completeness_gap" in e and "completeness_gap_rel" in e for e in entries)
  assert (tiny_run / "attribution" / "stats.json").exists()
  assert list((tiny_run / "attribution").glob("figure8_*.png"))


def test_export_mode_writes_the_best_checkpoint_as_a_state_dict(tiny_run, tmp_path):
  from urisc_jax.models import torch_import  # pylint: disable=g-import-not-at-top
  output = tmp_path / "model.pt"
  result = _main(tiny_run, "--mode=export", "--config.export.format=torch", f"--config.export.output={output}")
  summary = json.loads(result.stdout)
  best = json.loads((tiny_run / "metrics.json").read_text())["train"]["best"]
  assert summary["step"] == best["step"] and summary["checkpoint"].endswith("checkpoints_best")
  assert summary["layout"] == "segmentation_models_pytorch" and summary["bytes"] == output.stat().st_size
  assert "decoder.blocks.0.conv1.0.weight" in torch_import.read_checkpoint(output)
