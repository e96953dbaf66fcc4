"""Result files: written whole or not at all, readable like any new file, standard JSON."""

import json
import math
import os
import stat

import numpy as np
import pytest

from urisc_jax import outputs


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
  with pytest.raises(RuntimeError):
    with outputs.atomic_path(tmp_path / "result.json") as tmp:
      tmp.write_text("{half")
      raise RuntimeError("killed mid-write")
  assert list(tmp_path.iterdir()) == []


def test_results_get_the_permissions_of_any_new_file(tmp_path):
  previous = os.umask(0o022)
  try:
    outputs.write_json(tmp_path / "metrics.json", {"f1": 0.5})
    (tmp_path / "plain.txt").write_text("x")
  finally:
    os.umask(previous)
  mode = stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode)
  assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o644


def test_json_is_standard_even_with_numpy_and_non_finite_values(tmp_path):
  outputs.write_json(tmp_path / "m.json", {"f1": np.float32(0.25), "n": np.int64(3), "sem": math.nan,
                                           "rows": [{"x": np.float64(math.inf)}]})
  assert json.loads((tmp_path / "m.json").read_text()) == {"f1": 0.25, "n": 3, "sem": None, "rows": [{"x": None}]}
