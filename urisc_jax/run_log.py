"""Training metrics for people: metrics.jsonl, TensorBoard event files (written without TensorFlow), a curve PNG."""

import json
import pathlib

import numpy as np
from tensorboardX import SummaryWriter

from urisc_jax import outputs

VALIDATION_PREFIX = "val_"


class MetricsLogger:
  """Appends {"step": s, **scalars} lines to workdir/metrics.jsonl and the same scalars to TensorBoard.

  Only one process of a multi-host run should log: pass `enabled=False` on the others.
  """

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = outputs.open_log(workdir / "metrics.jsonl")
    self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(tensorboard_tag(name), float(value), int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def tensorboard_tag(name: str) -> str:
  """"val_f1" -> "val/f1", "loss" -> "train/loss": validation and training scalars in their own TensorBoard groups."""
  if name.startswith(VALIDATION_PREFIX):
    return f"val/{name[len(VALIDATION_PREFIX):]}"
  return f"train/{name}"


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  """The lines of a metrics.jsonl, one per step in step order; a step logged again after a resume keeps its last
  line (the resumed run recomputed it)."""
  by_step = {}
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  for number, line in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines) - 1:  # torn by a kill mid-write; the resumed run logs that step again
        break
      raise
    by_step[record["step"]] = record
  return [by_step[step] for step in sorted(by_step)]


def plot_curves(metrics_path: str | pathlib.Path, png_path: str | pathlib.Path) -> pathlib.Path:
  """Draws the training loss (log scale) and, where logged, the validation F1 against the step into a PNG.

  Returns:
    `png_path`, written atomically.
  """
  # The object-oriented Agg API writes files without touching pyplot's global backend.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  records = read_metrics(metrics_path)
  steps = np.array([r["step"] for r in records])
  loss = np.array([r.get("loss", np.nan) for r in records], float)
  figure = Figure(figsize=(6.4, 3.6), layout="constrained")
  FigureCanvasAgg(figure)
  axis = figure.subplots()
  axis.plot(steps, loss, color="C0", label="train loss")
  if np.all(loss[np.isfinite(loss)] > 0) and np.isfinite(loss).any():
    axis.set_yscale("log")
  axis.set_xlabel("step")
  axis.set_ylabel("train loss", color="C0")
  validated = [r for r in records if "val_f1" in r]
  if validated:
    f1_axis = axis.twinx()
    f1_axis.plot([r["step"] for r in validated], [r["val_f1"] for r in validated], "o-", color="C1",
                 label="validation F1")
    f1_axis.set_ylabel("validation F1 (official)", color="C1")
    f1_axis.set_ylim(0, 1)
  figure.suptitle(f"Training curve ({len(records)} logged steps)")
  png_path = pathlib.Path(png_path)
  with outputs.atomic_path(png_path) as tmp:
    figure.savefig(tmp, format="png", dpi=110)
  return png_path
