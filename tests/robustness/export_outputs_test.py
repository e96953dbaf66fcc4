"""--mode=export outputs that cannot hurt the user's files: a folder where a file goes, a path below a file, a user's
folder as the bioimage.io package, a permission error, an oversized test crop are each refused (exit 2, naming
config.export.output or the key) before the checkpoint is loaded; a package is built in a hidden sibling and renamed
into place, so an interrupted export leaves nothing that looks like a whole package."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from configs import tiny
from urisc_jax import config_checks
from urisc_jax import export as exporting
from urisc_jax.export import bioimageio_package

REPO = pathlib.Path(__file__).resolve().parents[2]


def _config(fmt, output):
  config = tiny.get_config()
  config.export.format, config.export.output = fmt, str(output)
  return config


def _refused(config, workdir) -> str:
  """The export's refusal; `workdir` holds no checkpoint, so only a check made before loading one can answer."""
  with pytest.raises(exporting.OutputError) as raised:
    exporting.export(config, workdir)
  assert isinstance(raised.value, config_checks.ConfigError)  # main's input errors: exit 2, one line
  return str(raised.value)


def _snapshot(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


# ------------------------------------------------------------------------------------------ where the file goes

@pytest.mark.parametrize("fmt", ["onnx", "torch", "stablehlo", "bioimageio"])
def test_a_folder_where_the_export_is_one_file_is_refused(tmp_path, fmt):
  output = tmp_path / ("out.zip" if fmt == "bioimageio" else "out.onnx")
  output.mkdir()
  (output / "keep.txt").write_text("mine")
  message = _refused(_config(fmt, output), tmp_path / "run")
  assert f"config.export.output='{output}' is a folder" in message and "pass a file path" in message
  assert _snapshot(output) == {"keep.txt": b"mine"}


@pytest.mark.parametrize("fmt", ["onnx", "bioimageio"])
def test_an_output_below_a_file_is_refused(tmp_path, fmt):
  blocker = tmp_path / "a_file"
  blocker.write_text("mine")
  message = _refused(_config(fmt, blocker / "sub" / "model.onnx"), tmp_path / "run")
  assert "config.export.output=" in message and f"{blocker} is a file" in message
  assert blocker.read_text() == "mine"


def test_a_file_where_the_package_folder_goes_is_refused(tmp_path):
  output = tmp_path / "package"
  output.write_text("mine")
  assert "is a file; a bioimage.io package is a folder" in _refused(_config("bioimageio", output), tmp_path / "run")
  assert output.read_text() == "mine"


def test_a_permission_error_names_config_export_output_not_a_temporary_file(tmp_path, monkeypatch):
  output = tmp_path / "model.onnx"
  temporary = tmp_path / ".model.x1y2.onnx.tmp"
  monkeypatch.setattr(exporting, "load_trained", lambda config, workdir: None)

  def denied(*args, **kwargs):  # what atomic_path's mkstemp raises in a folder the user cannot write
    raise PermissionError(13, "Permission denied", str(temporary))
  monkeypatch.setattr(exporting, "write", denied)
  message = _refused(_config("onnx", output), tmp_path / "run")
  assert f"config.export.output='{output}': cannot write there (Permission denied)" in message
  assert ".tmp" not in message and "--config.export.output=PATH" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_loading(tmp_path):
  folder = tmp_path / "read_only"
  folder.mkdir()
  folder.chmod(0o500)
  try:
    assert "is not writable" in _refused(_config("onnx", folder / "model.onnx"), tmp_path / "run")
  finally:
    folder.chmod(0o700)


@pytest.mark.parametrize("size,ok", [(2048, True), (2049, False), (16384, False), (0, False)])
def test_the_test_crop_size_has_an_upper_bound(size, ok):
  config = tiny.get_config()
  config.export.sample_size = size
  if ok:
    config_checks.validate(config, "export")
    return
  with pytest.raises(config_checks.ConfigError, match=rf"config.export.sample_size={size}: must be an integer in "
                                                      r"1..2048"):
    config_checks.validate(config, "export")


# ---------------------------------------------------------------------------------------- the bioimage.io folder

def _fake_package(folder: pathlib.Path, *, marker: str) -> None:
  """What a package of this project holds, in miniature."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "rdf.yaml").write_text(yaml.safe_dump({"type": "model", "config": {"urisc_jax": {"marker": marker}}}))
  (folder / "README.md").write_text(f"package {marker}")
  (folder / "weights.onnx").write_bytes(b"onnx " + marker.encode())


@pytest.fixture
def fake_writer(monkeypatch):
  """Replaces the expensive part of `build` (the model's test tensors, ONNX conversion, validation) by a writer of a
  miniature package, so the placement logic is tested on its own; tests/export_test.py builds real ones."""
  def write(trained, sample, folder, *, size):
    _fake_package(folder, marker="new")
    return {"files": sorted(p.name for p in folder.iterdir())}
  monkeypatch.setattr(bioimageio_package, "_write_folder", write)


def test_a_users_folder_is_neither_overwritten_nor_packed(tmp_path, fake_writer):
  output = tmp_path / "my_project"
  output.mkdir()
  (output / "README.md").write_text("my notes")
  (output / "data.csv").write_text("1,2,3")
  before = _snapshot(output)
  message = _refused(_config("bioimageio", output), tmp_path / "run")
  assert "is an existing folder that is not a package written by this project" in message
  assert "data.csv" in message and "Pass a new or empty folder" in message
  with pytest.raises(FileExistsError):  # the library call refuses too
    bioimageio_package.build(None, ("s", np.zeros((8, 8), np.uint8)), output)
  assert _snapshot(output) == before
  only_readme = tmp_path / "readme_only"
  only_readme.mkdir()
  (only_readme / "README.md").write_text("my notes")  # a package's name, but no rdf.yaml of ours
  assert "no rdf.yaml written by urisc_jax" in _refused(_config("bioimageio", only_readme), tmp_path / "run")
  assert (only_readme / "README.md").read_text() == "my notes"


def test_a_previous_package_of_ours_or_an_empty_folder_is_replaced_whole(tmp_path, fake_writer):
  output = tmp_path / "package"
  _fake_package(output, marker="old")
  (output / "cover.png").write_bytes(b"old cover")  # not written by the new build: must not survive
  exporting.check_output(output, "bioimageio")
  bioimageio_package.build(None, ("s", np.zeros((8, 8), np.uint8)), output)
  assert sorted(p.name for p in output.iterdir()) == ["README.md", "rdf.yaml", "weights.onnx"]
  assert (output / "README.md").read_text() == "package new"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["package"]  # no staging or previous copy left
  empty = tmp_path / "empty"
  empty.mkdir()
  bioimageio_package.build(None, ("s", np.zeros((8, 8), np.uint8)), empty)
  assert (empty / "README.md").read_text() == "package new"


def test_a_failed_build_leaves_no_package_and_no_staging(tmp_path, monkeypatch):
  def fails(trained, sample, folder, *, size):
    _fake_package(folder, marker="half")
    raise ValueError("bioimageio.spec rejects the description")
  monkeypatch.setattr(bioimageio_package, "_write_folder", fails)
  with pytest.raises(ValueError, match="rejects"):
    bioimageio_package.build(None, ("s", np.zeros((8, 8), np.uint8)), tmp_path / "package")
  assert list(tmp_path.iterdir()) == []


def test_sigterm_mid_export_leaves_nothing_that_looks_like_a_package(tmp_path):
  output = tmp_path / "package"
  script = textwrap.dedent(f"""
      import os, pathlib, signal
      import numpy as np
      from urisc_jax.export import bioimageio_package

      def write(trained, sample, folder, *, size):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "README.md").write_text("half")
        (folder / "rdf.yaml").write_text("config: {{urisc_jax: {{}}}}")
        os.kill(os.getpid(), signal.SIGTERM)  # the job is preempted while the package is written

      bioimageio_package._write_folder = write
      bioimageio_package.build(None, ("s", np.zeros((8, 8), np.uint8)), pathlib.Path({str(output)!r}))
      """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]
  assert not output.exists()
  left = [p.name for p in tmp_path.iterdir()]
  assert all(name.startswith(".package.") and name.endswith(".partial") for name in left), left
