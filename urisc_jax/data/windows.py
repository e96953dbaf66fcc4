"""Windows of big .npy arrays, read without letting the process's memory grow with the data.

With `np.load(mmap_mode="r")` every page a crop touches stays mapped into the process, and the kernel maps up to
64 KB around each fault: whole rows of a 9958-pixel-wide image. After a few hundred random crops every image is
resident, so ten U-RISC images with their labels count 2 GB in each worker's RSS. `NpyWindows` copies a window out
of the mapping and then drops the pages it touched (madvise MADV_DONTNEED): they stay in the kernel's page cache,
shared by all processes, but leave this one, so its memory stays at about one window whatever the number and size
of the images.
"""

import mmap
import os
import pathlib

import numpy as np

from urisc_jax.data.imageio import DataError

_PAGE = mmap.PAGESIZE
_CAN_DROP = hasattr(mmap, "MADV_DONTNEED")


class NpyWindows:
  """Reads windows of a 2-D array stored as .npy (C order), opening the file lazily (picklable before first use)."""

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    self._file = None
    self._map = None
    self._array = None
    self._offset = 0

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
      self._drop(top, top + height)
      return window
    row_index = _mirror(np.arange(top, top + height), rows)
    col_index = _mirror(np.arange(left, left + width), cols)
    window = array[row_index[:, None], col_index[None, :]]
    self._drop(int(row_index.min()), int(row_index.max()) + 1)
    return window

  def _drop(self, row_start: int, row_stop: int) -> None:
    """Unmaps the pages holding rows [row_start, row_stop) from this process (they stay in the page cache)."""
    if not _CAN_DROP:
      return
    row_bytes = self._array.shape[1] * self._array.itemsize
    start = self._offset + row_start * row_bytes
    stop = min(self._offset + row_stop * row_bytes, len(self._map))
    aligned = start - start % _PAGE
    if stop > aligned:
      self._map.madvise(mmap.MADV_DONTNEED, aligned, stop - aligned)

  def close(self) -> None:
    self._array = None
    if self._map is not None:
      self._map.close()
      self._map = None
    if self._file is not None:
      self._file.close()
      self._file = None


def _mirror(index: np.ndarray, length: int) -> np.ndarray:
  """Mirrors indices into [0, length) without repeating the edge: -1 -> 1, length -> length - 2."""
  if length == 1:
    return np.zeros_like(index)
  period = 2 * (length - 1)
  folded = np.mod(index, period)
  return np.where(folded < length, folded, period - folded)
