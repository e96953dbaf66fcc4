"""The release's human annotation rounds pair with the final round by file name, with clear errors."""

import numpy as np
import pytest
from PIL import Image

from urisc_jax.data import annotation_rounds
from urisc_jax.data.imageio import DataError, MissingDataError


def _label(path):
  path.parent.mkdir(parents=True, exist_ok=True)
  label = np.full((8, 8), 255, np.uint8)
  label[::3] = 0
  Image.fromarray(label).save(path)


def test_rounds_pair_with_the_final_round(tmp_path):
  folder = tmp_path / annotation_rounds.FOLDER
  for name in ("0001", "0002"):
    _label(folder / "1st" / f"{name}.tiff")
    _label(folder / "final" / f"{name}.tiff")
  _label(folder / "final" / "0003.tiff")  # the reference may hold more images than a round
  _label(folder / "2nd" / "Track1" / "0002.png")
  _label(folder / "final" / "Track1" / "0002.tiff")
  assert annotation_rounds.annotation_rounds(tmp_path) == ["1st", "2nd", "final"]
  pairs = annotation_rounds.annotation_round_pairs(tmp_path, "1st")
  assert [(p.name, p.annotation_path.parent.name, p.reference_path.parent.name) for p in pairs] == [
      ("0001", "1st", "final"), ("0002", "1st", "final")]
  [nested] = annotation_rounds.annotation_round_pairs(tmp_path, "2nd")
  assert nested.name == "Track1/0002" and nested.reference_path == folder / "final" / "Track1" / "0002.tiff"


def test_round_errors_say_what_is_missing(tmp_path):
  with pytest.raises(MissingDataError, match="Human_Annotation_Process does not exist"):
    annotation_rounds.annotation_round_pairs(tmp_path)
  folder = tmp_path / annotation_rounds.FOLDER
  _label(folder / "1st" / "0001.tiff")
  with pytest.raises(MissingDataError, match="rounds found in .*: 1st"):
    annotation_rounds.annotation_round_pairs(tmp_path, "1st")
  _label(folder / "final" / "0002.tiff")
  with pytest.raises(DataError, match="0001.tiff has no counterpart"):
    annotation_rounds.annotation_round_pairs(tmp_path, "1st")
