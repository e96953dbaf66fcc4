"""A volume prediction's output cannot hurt the input or the user's files, and a rerun resumes only what is whole.

The output is refused, before anything is written, when it is the input, inside it or a symlink to it; when it is a
folder that is not this prediction's output; when it holds a symlink; when the rerun's settings, run record or input
data differ from the ones its blocks were computed with. A declared section count is capped and planned lazily. A
resumed run recomputes the blocks whose chunks are missing or changed, so it ends equal to a clean run.

The trained workdir (random weights) and the 2-worker LocalCluster come from tests/volume_predict_test.py.
"""

import hashlib
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import tensorstore as ts

from tests.volume_predict_test import _config, _write_volume, run  # noqa: F401  pylint: disable=unused-import
from urisc_jax import blockwise, volume_predict, volumes

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHAPE = (2, 512, 512)  # 8 blocks of 256 x 256, 2 pyramid levels


def _small_config(input_path, output_path):
  config = _config(input_path, output_path)
  config.predict.volume.block = 256
  config.predict.volume.chunk = 128
  return config


def _tree_digest(folder: pathlib.Path) -> dict[str, str]:
  """Relative path -> digest of every file (and link target) under `folder`: what a check may not change."""
  digests = {}
  for root, dirs, files in os.walk(folder):
    for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
      path = pathlib.Path(root) / name
      key = str(path.relative_to(folder))
      digests[key] = ("link:" + os.readlink(path)) if path.is_symlink() else \
          hashlib.sha256(path.read_bytes()).hexdigest()
  return digests


def _levels(out: pathlib.Path, levels: int = 2) -> list[np.ndarray]:
  return [volumes.open_level(out, level, labels=labels) for level in range(levels) for labels in (False, True)]


def _assert_same_output(out: pathlib.Path, clean: pathlib.Path) -> None:
  for got, want in zip(_levels(out), _levels(clean)):
    np.testing.assert_array_equal(got, want)


# --- 1: never into the input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["same", "same_file_url", "inside", "symlink", "group_of_level", "relative"])
def test_an_output_that_is_the_input_inside_it_or_a_link_to_it_is_refused_and_nothing_is_written(
    tmp_path, where, monkeypatch):
  source = tmp_path / "in.zarr"
  _write_volume(source, (2, 256, 256))
  input_text = str(source)
  if where == "group_of_level":  # an OME-Zarr-like layout: the array is IN.zarr/0, the output IN.zarr
    group = tmp_path / "group.zarr"
    group.mkdir()
    source.rename(group / "0")
    source, input_text = group, str(group / "0")
  out = {"same": str(source), "same_file_url": source.as_uri(), "inside": str(source / "pred.zarr"),
         "symlink": str(tmp_path / "link.zarr"), "group_of_level": str(source), "relative": "in.zarr"}[where]
  if where == "symlink":
    (tmp_path / "link.zarr").symlink_to(source)
  monkeypatch.chdir(tmp_path)
  before = _tree_digest(source)
  config = _small_config(input_text, out)
  with pytest.raises(volumes.VolumeError, match="overlaps the input volume"):
    volume_predict.predict_volume(config, tmp_path / "no_run_needed")
  assert _tree_digest(source) == before
  assert not (source / "pred.zarr").exists()


def test_the_command_exits_2_naming_the_output_when_it_is_the_input(tmp_path):
  source = tmp_path / "in.zarr"
  _write_volume(source, (2, 256, 256))
  before = _tree_digest(source)
  workdir = tmp_path / "run"
  workdir.mkdir()
  result = subprocess.run(
      [sys.executable, "-m", "urisc_jax.main", "--mode=predict", "--config=configs/tiny.py", f"--workdir={workdir}",
       f"--config.predict.input={source}", f"--config.predict.output={source}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stderr
  assert "overlaps the input volume" in result.stderr and str(source) in result.stderr
  assert _tree_digest(source) == before


# --- 17, 11: where the output is -----------------------------------------------------------------------------------


def test_output_location_parses_file_urls_makes_paths_absolute_and_refuses_other_schemes(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert volumes.output_location(f"file://{tmp_path}/out.zarr") == tmp_path / "out.zarr"
  assert volumes.output_location("file://localhost/abs/out.zarr") == pathlib.Path("/abs/out.zarr")
  assert volumes.output_location("rel/out.zarr") == tmp_path / "rel" / "out.zarr"  # for workers in another folder
  for url in ("gs://bucket/out.zarr", "s3://bucket/out.zarr", "http://host/out.zarr"):
    with pytest.raises(volumes.VolumeError, match=url.split(":")[0] + "://"):
      volumes.output_location(url)
  with pytest.raises(volumes.VolumeError, match="another host"):
    volumes.output_location("file://otherhost/out.zarr")
  assert not list(tmp_path.iterdir())  # no "./file:" folder, nothing created


def test_a_relative_output_and_workers_in_another_folder_write_and_resume_the_same_output(run, tmp_path,
                                                                                         monkeypatch):
  workdir, _, client = run
  _write_volume(tmp_path / "in.zarr", SHAPE)
  elsewhere = tmp_path / "workers_cwd"
  elsewhere.mkdir()
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(volume_predict, "_in_flight", lambda workers: 3)  # 8 blocks through a window of 3
  previous = client.run(os.getcwd)
  client.run(os.chdir, str(elsewhere))  # as an external cluster's workers, started in their own folder
  try:
    config = _small_config("in.zarr", "out.zarr")
    first = volume_predict.predict_volume(config, workdir, client=client)
    again = volume_predict.predict_volume(config, workdir, client=client)
  finally:
    for worker, cwd in previous.items():
      client.run(os.chdir, cwd, workers=[worker])
  assert first["output"] == str(tmp_path / "out.zarr")
  assert (first["computed"], again["computed"], again["skipped"]) == (8, 0, 8)
  assert len(volume_predict.marker_names(tmp_path / "out.zarr")) == 8
  assert not list(elsewhere.iterdir())  # nothing landed relative to the workers' folder


# --- 3: a huge declared section count ------------------------------------------------------------------------------


def test_a_huge_declared_section_count_is_refused_fast_and_planned_lazily_when_allowed(tmp_path):
  sparse = tmp_path / "huge.zarr"
  ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(sparse)},
           "metadata": {"shape": [10**8, 64, 64], "chunks": [1, 64, 64], "dtype": "|u1"}}, create=True).result()
  assert sum(f.stat().st_size for f in sparse.rglob("*") if f.is_file()) < 8192
  config = _small_config(sparse, tmp_path / "out.zarr")
  tracemalloc.start()
  start = time.monotonic()
  try:
    with pytest.raises(volumes.VolumeError, match=r"\[100000000, 64, 64\].*config.predict.volume.max_blocks"):
      volume_predict.predict_volume(config, tmp_path / "no_run_needed")
    assert time.monotonic() - start < 60
    # Allowed: the real planning calls (input identity, marker listing and check, the pending blocks) stay small.
    volume = volumes.open_input(str(sparse))
    blocks = blockwise.block_grid(volume.shape[1:], 256, chunk=128)
    assert volume_predict.check_work_size(volume.shape, 256, 10**9, str(sparse)) == 10**8
    volume_predict.input_identity(volume, volumes.input_locations(str(sparse), volume))
    out = volumes.output_volume(tmp_path / "out.zarr", volume, chunk=128, levels=2, dtype="uint8")
    done, _ = volume_predict.check_markers(out, "digest", blocks, volume.shape[0], volume_predict.marker_names(
        out.path))
    todo = volume_predict.pending_work(volume_predict.plan_work(volume.shape[0], blocks), done)
    head = list(itertools.islice(todo, 10_000))
    assert head[-1][0] == 9_999
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 200 * 2**20, peak
  assert not (tmp_path / "out.zarr").exists()


# --- 5, 6, 23: what an existing output may be ----------------------------------------------------------------------


def test_a_user_folder_as_output_is_refused_untouched_with_a_message_saying_so(tmp_path):
  _write_volume(tmp_path / "in.zarr", (2, 256, 256))
  folder = tmp_path / "mine.zarr"
  folder.mkdir()
  (folder / ".zattrs").write_text('{"mine": true}\n')
  (folder / "notes.txt").write_text("my notes\n")
  before = _tree_digest(folder)
  with pytest.raises(volumes.VolumeError, match="is not the output of a prediction"):
    volume_predict.predict_volume(_small_config(tmp_path / "in.zarr", folder), tmp_path / "no_run_needed")
  assert _tree_digest(folder) == before


def test_a_symlink_inside_the_output_is_never_followed(tmp_path):
  _write_volume(tmp_path / "in.zarr", (2, 256, 256))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  (elsewhere / ".zattrs").write_text('{"theirs": true}\n')
  out = tmp_path / "out.zarr"
  out.mkdir()
  (out / "labels").symlink_to(elsewhere)
  before = _tree_digest(elsewhere)
  with pytest.raises(volumes.VolumeError, match=f"symlink, {out / 'labels'}"):
    volume_predict.predict_volume(_small_config(tmp_path / "in.zarr", out), tmp_path / "no_run_needed")
  assert _tree_digest(elsewhere) == before


def test_a_refused_rerun_leaves_the_output_untouched_and_a_symlink_after_a_run_is_refused(run, tmp_path):
  workdir, _, client = run
  _write_volume(tmp_path / "in.zarr", SHAPE)
  out = tmp_path / "out.zarr"
  config = _small_config(tmp_path / "in.zarr", out)
  volume_predict.predict_volume(config, workdir, client=client)
  before = _tree_digest(out)
  config.predict.volume.levels = 3
  with pytest.raises(volumes.VolumeError, match="differs in: levels"):
    volume_predict.predict_volume(config, workdir, client=client)
  assert _tree_digest(out) == before
  assert not (out / "2").exists()
  # A link placed in a finished output (a section folder of level 0) is refused by the next rerun.
  config.predict.volume.levels = 2
  (tmp_path / "elsewhere").mkdir()
  shutil.rmtree(out / "0" / "1")
  (out / "0" / "1").symlink_to(tmp_path / "elsewhere")
  with pytest.raises(volumes.VolumeError, match="symlink"):
    volume_predict.predict_volume(config, workdir, client=client)
  assert not list((tmp_path / "elsewhere").iterdir())


def test_a_failed_attempt_leaves_nothing_that_blocks_the_next(run, tmp_path, monkeypatch):
  workdir, _, client = run
  _write_volume(tmp_path / "in.zarr", SHAPE)
  out = tmp_path / "out.zarr"
  config = _small_config(tmp_path / "in.zarr", out)

  # Stopped while the skeleton is built: nothing at the output path, no temporary folder left.
  real_open = ts.open
  creates = []

  def failing_open(spec, *args, **kwargs):
    if kwargs.get("create"):
      creates.append(spec)
      if len(creates) == 2:  # the first array is made, the second fails
        raise OSError("disk full")
    return real_open(spec, *args, **kwargs)

  monkeypatch.setattr(volumes.ts, "open", failing_open)
  with pytest.raises(PermissionError, match="cannot create the output volume"):
    volume_predict.predict_volume(config, workdir, client=client)
  monkeypatch.setattr(volumes.ts, "open", real_open)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]

  # Stopped after the skeleton (the cluster fails): the skeleton holds our run record and is reused.
  class BrokenClient:
    def scheduler_info(self, **_):
      raise OSError("scheduler gone")

  with pytest.raises(OSError, match="scheduler gone"):
    volume_predict.predict_volume(config, workdir, client=BrokenClient())
  assert (out / volume_predict.MARKERS / volume_predict.RUN_FILE).is_file()
  summary = volume_predict.predict_volume(config, workdir, client=client)
  assert summary["computed"] == 8


def test_a_failed_predict_does_not_leave_a_workdir_it_created(tmp_path):
  _write_volume(tmp_path / "in.zarr", (2, 256, 256))
  workdir = tmp_path / "typo_run"
  result = subprocess.run(
      [sys.executable, "-m", "urisc_jax.main", "--mode=predict", "--config=configs/tiny.py", f"--workdir={workdir}",
       f"--config.predict.input={tmp_path / 'in.zarr'}", f"--config.predict.output={tmp_path / 'out.zarr'}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stderr
  assert f"--workdir={workdir}" in result.stderr
  assert not workdir.exists() and not (tmp_path / "out.zarr").exists()


# --- 7, 24: what a rerun trusts ------------------------------------------------------------------------------------


def _chunk_files(out: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in out.rglob("*") if p.is_file() and p.parent.name.isdigit() and p.name.isdigit())


def test_a_rerun_recomputes_blocks_whose_chunks_are_missing_or_garbled(run, tmp_path):
  workdir, _, client = run
  _write_volume(tmp_path / "in.zarr", SHAPE)
  clean = tmp_path / "clean.zarr"
  volume_predict.predict_volume(_small_config(tmp_path / "in.zarr", clean.as_uri()), workdir, client=client)
  assert clean.is_dir()  # the file:// URL went to its path
  out = tmp_path / "out.zarr"
  config = _small_config(tmp_path / "in.zarr", out)
  volume_predict.predict_volume(config, workdir, client=client)
  assert len(volume_predict.marker_names(out)) == 8
  level0 = sorted(p for p in (out / "0").rglob("*") if p.is_file() and p.name != ".zarray")
  deleted, garbled = level0[0], level0[-1]  # section 0's first chunk, section 1's last: two blocks
  deleted.unlink()
  garbled.write_bytes(np.random.default_rng(0).integers(0, 256, garbled.stat().st_size, np.uint8).tobytes())
  summary = volume_predict.predict_volume(config, workdir, client=client)
  assert (summary["damaged"], summary["computed"], summary["skipped"]) == (2, 2, 6)
  _assert_same_output(out, clean)


def test_a_deleted_run_record_or_replaced_input_is_detected(run, tmp_path):
  workdir, _, client = run
  _write_volume(tmp_path / "in.zarr", SHAPE)
  out = tmp_path / "out.zarr"
  config = _small_config(tmp_path / "in.zarr", out)
  volume_predict.predict_volume(config, workdir, client=client)
  record = out / volume_predict.MARKERS / volume_predict.RUN_FILE
  stored = record.read_text()

  record.unlink()  # with the same settings: the markers are of this run; the record is written again
  again = volume_predict.predict_volume(config, workdir, client=client)
  assert (again["computed"], again["skipped"]) == (0, 8)
  assert json.loads(record.read_text()) == json.loads(stored)

  record.unlink()  # with other settings: the markers are of another run
  config.predict.threshold = 0.25
  before = _tree_digest(out)
  with pytest.raises(volumes.VolumeError, match="blocks of another prediction"):
    volume_predict.predict_volume(config, workdir, client=client)
  assert _tree_digest(out) == before

  config.predict.threshold = 0.5
  record.write_text(stored)
  shutil.rmtree(tmp_path / "in.zarr")
  _write_volume(tmp_path / "in.zarr", SHAPE, seed=7)  # other data at the same path
  before = _tree_digest(out)
  with pytest.raises(volumes.VolumeError, match="input data changed.*new --config.predict.output"):
    volume_predict.predict_volume(config, workdir, client=client)
  assert _tree_digest(out) == before
