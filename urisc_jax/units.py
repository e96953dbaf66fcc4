"""Lengths in nanometres: the one table of unit names that TIFF tags, ImageJ metadata and OME-NGFF use.

Every pixel size the project reads (an image's resolution tags or ImageJ metadata, a volume's OME-Zarr scale) goes
through here, so an angstrom or a parsec means the same to image prediction and to volume prediction, and a unit
that is no length is told apart from a missing one.
"""

# Unit name (lower case) -> (multiplier, divisor) to nanometres: a fraction, so that angstrom (1/10) and the small
# SI prefixes convert without a rounding of their own. Every OME-NGFF 0.4 space unit, plus the short forms and
# spellings TIFF and ImageJ write (ImageJ stores the micro sign as the six characters \u00B5 in its text metadata).
_NM_PER_UNIT = {
    "yoctometer": (1, 1e15), "zeptometer": (1, 1e12), "attometer": (1, 1e9), "femtometer": (1, 1e6),
    "picometer": (1, 1e3), "angstrom": (1, 10), "nanometer": (1, 1), "micrometer": (1e3, 1), "millimeter": (1e6, 1),
    "centimeter": (1e7, 1), "decimeter": (1e8, 1), "meter": (1e9, 1), "hectometer": (1e11, 1),
    "kilometer": (1e12, 1), "megameter": (1e15, 1), "gigameter": (1e18, 1), "terameter": (1e21, 1),
    "petameter": (1e24, 1), "exameter": (1e27, 1), "zettameter": (1e30, 1), "yottameter": (1e33, 1),
    "inch": (2.54e7, 1), "foot": (3.048e8, 1), "yard": (9.144e8, 1), "mile": (1.609344e12, 1),
    "parsec": (3.0856775814913673e25, 1),
    "nm": (1, 1), "um": (1e3, 1), "\u00b5m": (1e3, 1), "\u03bcm": (1e3, 1), "\\u00b5m": (1e3, 1), "micron": (1e3, 1),
    "microns": (1e3, 1), "mm": (1e6, 1), "cm": (1e7, 1), "m": (1e9, 1), "\u00e5": (1, 10), "pm": (1, 1e3),
}
# OME-NGFF 0.4 time units: allowed on a volume's section axis (a time series predicted frame by frame), not on y or x.
TIME_UNITS = frozenset(f"{p}second" for p in ("", "atto", "centi", "deci", "exa", "femto", "giga", "hecto", "kilo",
                                              "mega", "micro", "milli", "nano", "peta", "pico", "tera", "yocto",
                                              "yotta", "zepto", "zetta")) | {"minute", "hour", "day"}


def nm_factor(unit: str) -> tuple[float, float] | None:
  """(multiplier, divisor) from `unit` to nanometres; None for a unit that is no length (or no unit)."""
  return _NM_PER_UNIT.get(unit.strip().lower())


def to_nm(value: float, unit: str | None) -> float | None:
  """`value` in `unit` as nanometres; None for an unknown unit or a value that is not positive."""
  factor = nm_factor(unit or "")
  if factor is None or not value > 0:
    return None
  multiplier, divisor = factor
  return float(value) * multiplier / divisor
