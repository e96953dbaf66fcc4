"""benchmarks/accelerator.py on the CPU: every part runs (at the smoke scale the CPU gets) and prints the records a
GPU run is judged by."""

import json
import pathlib
import subprocess
import sys

import pytest

from benchmarks import accelerator

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def records():
  command = [sys.executable, "-m", "benchmarks.accelerator", "--models=linknet_resnet18", "--dtypes=float32",
             "--peak-tflops=1"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  return [json.loads(line) for line in result.stdout.splitlines()]


def _by(records, part, metric, **params):
  return [r for r in records if r["part"] == part and r["metric"] == metric
          and all(r.get(k) == v for k, v in params.items())]


def test_every_part_reports_at_the_labelled_smoke_scale(records):
  assert {r["part"] for r in records} == set(accelerator.PARTS)
  assert {(r["bench"], r["scale"], r["backend"]) for r in records} == {("accelerator", "smoke", "cpu")}


def test_the_default_run_ends_with_a_score_and_the_warm_cache_compiles_faster(records):
  for cache in ("cold", "warm"):
    [f1] = _by(records, "default_run", "test_f1", cache=cache)
    assert 0.0 <= f1["value"] <= 1.0 and f1["config"] == "configs/tiny.py"
  [cold] = _by(records, "compile", "train_step_compile_s", cache="cold")
  [warm] = _by(records, "compile", "train_step_compile_s", cache="warm")
  assert cold["cache_hits"] == 0 and warm["cache_hits"] >= 1


def test_speed_records_carry_flops_and_mfu(records):
  for part in ("train", "forward"):
    [rate] = _by(records, part, "mpix_per_s", model="linknet_resnet18", dtype="float32")
    [tflops] = _by(records, part, "tflops_per_s")
    [mfu] = _by(records, part, "mfu")
    assert rate["value"] > 0 and tflops["flops_per_call"] > 0
    assert mfu["value"] == pytest.approx(tflops["value"], rel=1e-2)  # against the 1 TFLOP/s peak given
  [seconds] = _by(records, "whole_image", "seconds")
  assert seconds["value"] > 0 and (seconds["height"], seconds["width"]) == (1024, 1024)


@pytest.mark.parametrize("kind,dtype,expected", [
    ("NVIDIA H200", "bfloat16", 989e12), ("NVIDIA H100 80GB HBM3", "float32", 495e12),
    ("TPU v5 lite", "bfloat16", 197e12), ("cpu", "float32", None)])
def test_peak_flops_by_device_kind(kind, dtype, expected):
  assert accelerator.peak_flops(kind, dtype, None) == expected
