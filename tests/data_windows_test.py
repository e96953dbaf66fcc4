"""Windows of .npy files: exact copies with mirrored borders, clear errors, and memory held under a budget."""

import pathlib
import pickle

import numpy as np
import pytest

from urisc_jax.data import windows
from urisc_jax.data.imageio import DataError


def _rss_bytes():
  status = pathlib.Path("/proc/self/status")
  if not status.exists():
    pytest.skip("needs /proc to read the resident set size")
  for line in status.read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) * 1024
  pytest.skip("no VmRSS in /proc/self/status")


@pytest.mark.parametrize("box", [(0, 0, 7, 9), (2, 3, 3, 4), (-3, -2, 10, 12), (5, 7, 9, 9), (-20, -20, 3, 3)])
def test_windows_equal_numpy_slices_with_reflect_padding(tmp_path, box):
  array = np.random.default_rng(0).integers(0, 256, (7, 9), dtype=np.uint8)
  np.save(tmp_path / "a.npy", array)
  reader = pickle.loads(pickle.dumps(windows.NpyWindows(tmp_path / "a.npy")))  # picklable before use
  top, left, height, width = box
  reference = np.pad(array, 40, mode="reflect")[40 + top:40 + top + height, 40 + left:40 + left + width]
  window = reader.read(*box)
  np.testing.assert_array_equal(window, reference)
  assert window.flags.writeable and window.flags.c_contiguous


def test_resident_memory_stays_under_the_budget(tmp_path, monkeypatch):
  """Random windows from a 36 MB array: a plain memory map keeps what it touched resident, NpyWindows drops its
  pages whenever they pass the budget."""
  monkeypatch.setattr(windows, "RESIDENT_BUDGET_BYTES", 2 << 20)
  rows = cols = 6000
  path = tmp_path / "big.npy"
  np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, cols))[::97] = 1
  rng = np.random.default_rng(0)
  origins = rng.integers(0, rows - 256, (150, 2))

  reader = windows.NpyWindows(path)
  before = _rss_bytes()
  for r, c in origins:
    reader.read(int(r), int(c), 256, 256)
  grown_windows = _rss_bytes() - before
  reader.close()

  mapped = np.load(path, mmap_mode="r")
  before = _rss_bytes()
  for r, c in origins:
    np.array(mapped[r:r + 256, c:c + 256])
  grown_memmap = _rss_bytes() - before
  assert grown_windows < 4 << 20, grown_windows  # the budget plus one window of rows
  assert grown_memmap > 4 * grown_windows  # the comparison shows what is being measured


def test_rows_already_mapped_are_counted_once(tmp_path, monkeypatch):
  monkeypatch.setattr(windows, "_mapped_bytes", 0)
  np.save(tmp_path / "a.npy", np.zeros((4000, 1 << 14), np.uint8))  # 16 KB rows: 4 rows of fault-around margin
  reader = windows.NpyWindows(tmp_path / "a.npy")
  reader.read(100, 0, 10, 5)
  assert windows._mapped_bytes == (10 + 2 * 4) << 14
  reader.read(104, 7, 6, 5)  # inside rows already counted
  assert windows._mapped_bytes == (10 + 2 * 4) << 14
  reader.read(200, 0, 1, 1)
  assert windows._mapped_bytes == (10 + 1 + 4 * 4) << 14
  monkeypatch.setattr(windows, "RESIDENT_BUDGET_BYTES", 30 << 14)
  reader.read(300, 0, 10, 1)  # passes the budget: everything is dropped and the count starts again
  assert windows._mapped_bytes == 0 and not reader._mapped_rows.any()
  reader.read(300, 0, 10, 1)
  assert windows._mapped_bytes == (10 + 2 * 4) << 14
  reader.close()
  assert windows._mapped_bytes == 0


def test_bad_files_give_clear_errors(tmp_path):
  (tmp_path / "junk.npy").write_bytes(b"not an npy file at all")
  with pytest.raises(DataError, match="junk.npy is not a valid .npy"):
    windows.NpyWindows(tmp_path / "junk.npy").read(0, 0, 1, 1)
  np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4), np.uint8))
  with pytest.raises(DataError, match="expected a C-ordered 2-D image"):
    windows.NpyWindows(tmp_path / "cube.npy").shape
  np.save(tmp_path / "cut.npy", np.zeros((64, 64), np.uint8))
  data = (tmp_path / "cut.npy").read_bytes()
  (tmp_path / "cut.npy").write_bytes(data[:-100])
  with pytest.raises(DataError, match="truncated"):
    windows.NpyWindows(tmp_path / "cut.npy").read(0, 0, 4, 4)


@pytest.mark.parametrize("box", [(0, 0, 7, 9), (2, 3, 3, 4), (4, 5, 3, 4), (-3, -2, 10, 12), (5, 7, 9, 9)])
def test_views_equal_copied_windows_and_copy_nothing_inside_the_array(tmp_path, box):
  """In place inside the array (also in its last rows), a mirrored copy where the box reaches past the border."""
  array = np.random.default_rng(1).integers(0, 256, (7, 9), dtype=np.uint8)
  np.save(tmp_path / "a.npy", array)
  reader = windows.NpyWindows(tmp_path / "a.npy")
  view = reader.view(*box)
  np.testing.assert_array_equal(view, reader.read(*box))
  top, left, height, width = box
  inside = top >= 0 and left >= 0 and top + height <= 7 and left + width <= 9
  assert view.flags.owndata != inside and not (inside and view.flags.writeable)
  del view
  reader.close()
