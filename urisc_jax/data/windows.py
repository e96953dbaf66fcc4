"""Windows of big .npy arrays, read without letting the process's memory grow with the data.

With `np.load(mmap_mode="r")` every page a crop touches stays mapped into the process, and the kernel maps up to
64 KB around each fault: whole rows of a 9958-pixel-wide image. After a few hundred random crops every image is
resident, so ten U-RISC images with their labels count 2 GB in each worker's RSS. `NpyWindows` copies a window out
of the mapping and keeps count of the rows its reads have mapped, in all readers of the process together; once they
exceed `RESIDENT_BUDGET_BYTES` it drops every mapped page (madvise MADV_DONTNEED). The pages stay in the kernel's
page cache, shared by all processes, but leave this one, so its memory stays under the budget whatever the number
and size of the images.

Dropping after every read would hold memory at one window, but costs more than the copy itself: each 1024 x 1024
crop of a U-RISC image maps ~14 MB of whole rows that must be unmapped and faulted in again, which made reading
2-3 x slower. Within the budget, windows that overlap earlier ones (one image crop after crop) find their pages
still mapped.
"""

import mmap
import os
import pathlib
import weakref

import numpy as np

from urisc_jax.data.imageio import DataError

_PAGE = mmap.PAGESIZE
_CAN_DROP = hasattr(mmap, "MADV_DONTNEED")
# Bytes of whole rows that the readers of one process may keep mapped before all of them are dropped.
RESIDENT_BUDGET_BYTES = 256 << 20
_FAULT_AROUND_BYTES = 64 << 10  # Linux maps up to this much around a faulting page of a file
_open_readers: "weakref.WeakSet[NpyWindows]" = weakref.WeakSet()
_mapped_bytes = 0  # rows marked in the readers' `_mapped_rows`, in bytes


class NpyWindows:
  """Reads windows of a 2-D array stored as .npy (C order), opening the file lazily (picklable before first use)."""

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    self._file = None
    self._map = None
    self._array = None
    self._offset = 0
    self._mapped_rows = None  # bool [rows]: rows a read may have mapped since the last drop

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  @property
  def shape(self) -> tuple[int, int]:
    return self._open().shape

  def _open(self) -> np.ndarray:
    if self._array is None:
      path = pathlib.Path(self.path)
      f = open(path, "rb")
      try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
      except ValueError as e:
        f.close()
        raise DataError(f"{path} is not a valid .npy file ({e}); delete it so that the prepare step rebuilds "
                        "it.") from None
      if len(shape) != 2 or fortran_order:
        f.close()
        raise DataError(f"{path} holds a {'Fortran-ordered ' if fortran_order else ''}array of shape {shape}; expected "
                        "a C-ordered 2-D image. Delete it so that the prepare step rebuilds it.")
      size = int(np.prod(shape)) * dtype.itemsize
      if os.fstat(f.fileno()).st_size < offset + size:
        f.close()
        raise DataError(f"{path} is truncated: its header promises {shape} {dtype} but the file is shorter. Delete it "
                        "so that the prepare step rebuilds it.")
      self._file = f
      self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
      self._offset = offset
      self._array = np.frombuffer(self._map, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
      self._mapped_rows = np.zeros(shape[0], bool)
      _open_readers.add(self)
    return self._array

  def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
    """A copy of rows [top, top + height) x columns [left, left + width); parts outside mirror the image.

    The mirror does not repeat the edge pixel (row -1 is row 1, like numpy's "reflect" padding).

    Returns:
      [height, width] array of the file's dtype, C-contiguous and writable.
    """
    array = self._open()
    rows, cols = array.shape
    if 0 <= top and top + height <= rows and 0 <= left and left + width <= cols:
      window = np.array(array[top:top + height, left:left + width])
      self._note_mapped(top, top + height)
      return window
    row_index = _mirror(np.arange(top, top + height), rows)
    col_index = _mirror(np.arange(left, left + width), cols)
    window = array[row_index[:, None], col_index[None, :]]
    self._note_mapped(int(row_index.min()), int(row_index.max()) + 1)
    return window

  def view(self, top: int, left: int, height: int, width: int) -> np.ndarray:
    """The window as a read-only view of the mapped file (no copy) inside the array, else a mirrored copy (`read`).

    The view's rows are strided by the image width; OpenCV reads such views in place (the warps).

    Returns:
      [height, width] array of the file's dtype.
    """
    array = self._open()
    rows, cols = array.shape
    if 0 <= top and top + height <= rows and 0 <= left and left + width <= cols:
      self._note_mapped(top, top + height)
      return array[top:top + height, left:left + width]
    return self.read(top, left, height, width)

  def _note_mapped(self, row_start: int, row_stop: int) -> None:
    """Counts rows [row_start, row_stop) as mapped; past the process's budget, unmaps every reader's pages."""
    global _mapped_bytes
    row_bytes = self._array.shape[1] * self._array.itemsize
    margin = -(-_FAULT_AROUND_BYTES // row_bytes)  # rows the kernel may map around the ones read
    row_start, row_stop = max(0, row_start - margin), min(len(self._mapped_rows), row_stop + margin)
    fresh = row_stop - row_start - int(np.count_nonzero(self._mapped_rows[row_start:row_stop]))
    if not fresh:
      return
    self._mapped_rows[row_start:row_stop] = True
    _mapped_bytes += fresh * row_bytes
    if _mapped_bytes > RESIDENT_BUDGET_BYTES:
      drop_all()

  def _unmap(self) -> None:
    """Unmaps all pages of this reader from the process (they stay in the page cache)."""
    if self._map is not None and _CAN_DROP:
      self._map.madvise(mmap.MADV_DONTNEED)
    if self._mapped_rows is not None:
      self._mapped_rows[:] = False

  def close(self) -> None:
    global _mapped_bytes
    if self._mapped_rows is not None:
      _mapped_bytes -= int(np.count_nonzero(self._mapped_rows)) * self._array.shape[1] * self._array.itemsize
      self._mapped_rows = None
    _open_readers.discard(self)
    self._array = None
    if self._map is not None:
      try:
        self._map.close()
      except BufferError:
        pass  # a Pillow window still reads it; the mapping closes when that image is freed
      self._map = None
    if self._file is not None:
      self._file.close()
      self._file = None


def drop_all() -> None:
  """Unmaps the pages every reader of this process has mapped (they stay in the page cache)."""
  global _mapped_bytes
  for reader in list(_open_readers):
    reader._unmap()  # pylint: disable=protected-access
  _mapped_bytes = 0


def _mirror(index: np.ndarray, length: int) -> np.ndarray:
  """Mirrors indices into [0, length) without repeating the edge: -1 -> 1, length -> length - 2."""
  if length == 1:
    return np.zeros_like(index)
  period = 2 * (length - 1)
  folded = np.mod(index, period)
  return np.where(folded < length, folded, period - folded)
