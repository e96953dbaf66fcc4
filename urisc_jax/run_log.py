"""Training metrics for people: metrics.jsonl and TensorBoard event files (written without TensorFlow)."""

import json
import pathlib

from tensorboardX import SummaryWriter


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
    self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
    self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(f"train/{name}", float(value), int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
