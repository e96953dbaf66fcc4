"""The human annotation rounds of the U-RISC release: `Human_Annotation_Process/{1st,2nd,final}`.

Annotators labelled the images in three rounds; the paper scores the first two rounds against the final one (human
F1 0.92 and 0.99). Each round folder holds label images named like the images they annotate (black = membrane, like
the release's labels), directly or in subfolders (e.g. per track). `annotation_round_pairs` pairs a round's files
with the reference round's by relative path, so they can be scored with the official F1 like predictions.
"""

import dataclasses
import pathlib

from urisc_jax.data import sources
from urisc_jax.data.imageio import DataError, MissingDataError

FOLDER = "Human_Annotation_Process"
ROUNDS = ("1st", "2nd", "final")


@dataclasses.dataclass(frozen=True)
class AnnotationPair:
  """One image's label from an annotation round and from the reference round (usually "final")."""
  name: str
  annotation_path: pathlib.Path
  reference_path: pathlib.Path


def annotation_rounds(root) -> list[str]:
  """Names of the round folders under `root/Human_Annotation_Process`, known rounds first."""
  folder = _rounds_folder(root)
  found = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
  return [r for r in ROUNDS if r in found] + sorted(r for r in found if r not in ROUNDS)


def annotation_round_pairs(root, round_name: str = "1st", *, reference: str = "final") -> list[AnnotationPair]:
  """Pairs every label of one annotation round with the reference round's label of the same image.

  Args:
    root: the U-RISC release folder (holding Human_Annotation_Process/).
    round_name: the round to score, e.g. "1st" or "2nd".
    reference: the round taken as ground truth.

  Returns:
    Pairs sorted by name; the name is the file's path inside the round folder, without suffix (e.g. "0001" or
    "Track1/0001").
  """
  folder = _rounds_folder(root)
  annotations = _labels_by_key(_round_dir(folder, round_name))
  references = _labels_by_key(_round_dir(folder, reference))
  if not annotations:
    raise DataError(f"annotation round {folder / round_name} holds no label images "
                    f"({', '.join('*' + s for s in sources.LABEL_SUFFIXES)}).")
  missing = sorted(set(annotations) - set(references))
  if missing:
    raise DataError(f"{annotations[missing[0]]} has no counterpart in the reference round {folder / reference} "
                    f"(expected {folder / reference / missing[0]}.tiff or .png; {len(missing)} files lack one). Add "
                    "the reference labels or score against another round.")
  return [AnnotationPair(key, annotations[key], references[key]) for key in sorted(annotations)]


def _rounds_folder(root) -> pathlib.Path:
  root = pathlib.Path(root)
  folder = root / FOLDER
  if not folder.is_dir():
    raise MissingDataError(f"{folder} does not exist; the U-RISC release keeps its annotation rounds in "
                           f"{FOLDER}/{{{','.join(ROUNDS)}}} beside imgs/ and label/.")
  return folder


def _round_dir(folder: pathlib.Path, name: str) -> pathlib.Path:
  path = folder / name
  if not path.is_dir():
    found = [p.name for p in sorted(folder.iterdir()) if p.is_dir()]
    raise MissingDataError(f"annotation round folder {path} does not exist; rounds found in {folder}: "
                           f"{', '.join(found) or 'none'}.")
  return path


def _labels_by_key(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  found = {}
  for path in sorted(folder.rglob("*")):
    if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in sources.LABEL_SUFFIXES:
      continue
    key = path.relative_to(folder).with_suffix("").as_posix()
    if key in found:
      raise DataError(f"two labels share the name {key!r} in {folder}: {found[key]} and {path}; keep one.")
    found[key] = path
  return found
