"""Resumability fuzz: a volume prediction whose chunks and block markers are damaged at random ends, after a rerun,
equal to a clean run, at every pyramid level of the probability and the mask.

Each round copies a clean output, damages a few random chunk files (deleted, truncated, emptied, overwritten with
random bytes of the same size) and markers (deleted, truncated, emptied, garbled), reruns the prediction into it and
compares. Rounds at CI scale by default; URISC_FUZZ_VOLUME_ROUNDS=N runs N (a long run), URISC_FUZZ_SEED the seed.
"""

import os
import pathlib
import shutil

import numpy as np

from tests.volume_predict_test import _config, _write_volume, run  # noqa: F401  pylint: disable=unused-import
from urisc_jax import volume_predict, volumes

ROUNDS = int(os.environ.get("URISC_FUZZ_VOLUME_ROUNDS", "3"))
SEED = int(os.environ.get("URISC_FUZZ_SEED", "0"))
SHAPE = (2, 512, 768)  # 12 blocks of 256 x 256, 2 pyramid levels


def _small_config(input_path, output_path):
  config = _config(input_path, output_path)
  config.predict.volume.block = 256
  config.predict.volume.chunk = 128
  return config


def _arrays(out: pathlib.Path) -> list[np.ndarray]:
  return [volumes.open_level(out, level, labels=labels) for level in range(2) for labels in (False, True)]


def _damage_file(path: pathlib.Path, rng: np.random.Generator) -> str:
  size = path.stat().st_size
  how = rng.choice(["delete", "truncate", "empty", "garble"])
  if how == "delete":
    path.unlink()
  elif how == "truncate":
    path.write_bytes(path.read_bytes()[:int(rng.integers(0, max(1, size)))])
  elif how == "empty":
    path.write_bytes(b"")
  else:
    path.write_bytes(rng.integers(0, 256, max(1, size), np.uint8).tobytes())
  return str(how)


def test_random_damage_to_chunks_and_markers_is_repaired_by_a_rerun(run, tmp_path):
  workdir, _, client = run
  _write_volume(tmp_path / "in.zarr", SHAPE, seed=3)
  clean = tmp_path / "clean.zarr"
  volume_predict.predict_volume(_small_config(tmp_path / "in.zarr", clean), workdir, client=client)
  want = _arrays(clean)
  rng = np.random.default_rng(SEED)
  damaged_total = 0
  for round_ in range(ROUNDS):
    out = tmp_path / f"round{round_}.zarr"
    shutil.copytree(clean, out, symlinks=True)
    chunks = sorted(p for p in out.rglob("*") if p.is_file() and p.name.isdigit())
    markers = sorted((out / volume_predict.MARKERS).glob("*-*-*"))
    damage = []
    for path in rng.choice(chunks, size=int(rng.integers(1, 5)), replace=False):
      if path.exists():
        damage.append((str(path.relative_to(out)), _damage_file(path, rng)))
    for path in rng.choice(markers, size=int(rng.integers(0, 3)), replace=False):
      damage.append((str(path.relative_to(out)), _damage_file(path, rng)))
    summary = volume_predict.predict_volume(_small_config(tmp_path / "in.zarr", out), workdir, client=client)
    for got, expected in zip(_arrays(out), want):
      np.testing.assert_array_equal(got, expected, err_msg=f"round {round_}, damage {damage}")
    assert summary["computed"] >= 1, damage
    again = volume_predict.predict_volume(_small_config(tmp_path / "in.zarr", out), workdir, client=client)
    assert again["computed"] == 0, (round_, damage)
    damaged_total += len(damage)
    shutil.rmtree(out)
  assert damaged_total >= ROUNDS
