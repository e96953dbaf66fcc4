"""Seeded fuzz of TIFF resolution metadata through the reader and resolution matching of --mode=predict.

Small 8-bit gray TIFFs get random and extreme XResolution / YResolution (zero, one, tiny and huge numerators and
denominators, zero denominators, negative values as SRATIONAL), ResolutionUnit values (none, inch, cm, unknown
codes) and ImageJ metadata with odd units (unicode, empty, unknown, numbers, long strings); a share of the cases
also give config.predict.input_pixel_nm (from 1e-9 to 1e12 nm). Each file goes where --mode=predict takes it:
`imageio.read_gray`, `resolution.pixel_size_nm`, `resolution.scale_factor`, `resolution.check_matched_shape`, and,
when that passes, `resolution.matched_probabilities` with a stand-in network. Every case must either succeed with a
resampled size within the pixel cap and at least MIN_MATCHED_SIDE per side (or the image's own side), or raise the
documented input error (imageio.DataError and its subclass resolution.ResolutionError) - never another exception,
never a hang, and the whole run within a memory bound.

  URISC_FUZZ_INPUTS   cases (default 400: a few seconds on 2 cores); e.g. 20000 for a long run.
  URISC_FUZZ_SEED     default 0. Case i is reproducible alone: its generator is seeded with (seed, i).

The loop runs in a child process (this file run as a script) so that its peak memory is measured on its own.
"""

import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import traceback

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from tests.robustness.fuzz_images_test import peak_rss_kb  # pylint: disable=wrong-import-position

DEFAULT_INPUTS = 400
TRAIN_NM = 2.18
# The cap the cases run under: a matched image may be resampled up to it (float32: 4 MB, a few copies).
FUZZ_MAX_PIXELS = 1 << 20
# Peak RSS of the child (numpy, Pillow, tifffile and the project's reader, no JAX; a resampling at the cap adds a few
# copies of 4 MB): 44 MB after 400 cases, seed 0. Before the cap on derived sizes one case of 1 px/cm asked for
# terabytes (MemoryError) and a 654 nm case grew past 4 GB; the bound leaves room for allocator and library noise.
PEAK_RSS_BOUND_MB = 200
SECONDS_PER_CASE = 10
WORDS = (0, 1, 2, 3, 7, 72, 96, 300, 1000, 25400, 65535, 65536, 10**6, 10**7, 2**31 - 1, 2**31, 2**32 - 1)
TIFF_UNITS = (0, 1, 2, 3, 4, 5, 255, 65535)  # 1 none, 2 inch, 3 cm; the rest unknown codes
# ImageJ writes its description in ASCII, non-ASCII units as escapes (\\u00B5m): tifffile writes ASCII only.
IMAGEJ_UNITS = ("nm", "nanometer", "micron", "um", "\\u00B5m", "\\u03BCm", "\\u00C5", "mm", "cm", "m", "inch", "pixel",
                "", " ", "NaN", "-1", "0", "1e9", "furlong", "angstrom", "nm" * 200, "\\x00", "\\u")
RATIONAL, SRATIONAL = 5, 10


def _rational(rng) -> tuple[int, int]:
  """(numerator, denominator) as 32-bit words: interesting values or random ones."""
  pick = lambda: int(rng.choice(WORDS)) if rng.random() < 0.7 else int(rng.integers(0, 2**32))
  return pick(), pick()


def _patch_resolution(path: pathlib.Path, rng) -> dict:
  """Rewrites the first page's resolution tags in the file's bytes (tifffile refuses to write zero denominators
  or an unknown unit): new rationals, sometimes typed SRATIONAL (negative values), a new ResolutionUnit word."""
  import tifffile  # pylint: disable=g-import-not-at-top
  with tifffile.TiffFile(path) as tif:
    order = tif.byteorder
    tags = tif.pages[0].tags
    entries = {name: (tags[name].offset, tags[name].valueoffset) for name in ("XResolution", "YResolution",
                                                                             "ResolutionUnit") if name in tags}
  data = bytearray(path.read_bytes())
  done = {}
  for name in ("XResolution", "YResolution"):
    if name not in entries or rng.random() < 0.1:
      continue
    entry, value = entries[name]
    numerator, denominator = _rational(rng)
    if rng.random() < 0.25:  # signed: the same bits read as negative numbers
      data[entry + 2:entry + 4] = struct.pack(order + "H", SRATIONAL)
    data[value:value + 8] = struct.pack(order + "II", numerator, denominator)
    done[name] = (numerator, denominator)
  if "ResolutionUnit" in entries and rng.random() < 0.7:
    entry, value = entries["ResolutionUnit"]
    unit = int(rng.choice(TIFF_UNITS))
    data[value:value + 2] = struct.pack(order + "H", unit)
    done["ResolutionUnit"] = unit
  path.write_bytes(bytes(data))
  return done


def _case(rng, path: pathlib.Path) -> dict:
  """Writes the case's TIFF at `path`; returns what it claims (for the report) and the configured pixel size."""
  import tifffile  # pylint: disable=g-import-not-at-top
  height, width = int(rng.integers(1, 80)), int(rng.integers(1, 80))
  gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
  kind = rng.choice(["tags", "imagej", "plain"], p=[0.6, 0.3, 0.1])
  claim = {"kind": str(kind), "shape": [height, width]}
  if kind == "imagej":
    unit = str(rng.choice(IMAGEJ_UNITS))
    per_unit = float(10.0 ** rng.uniform(-8, 8))
    tifffile.imwrite(path, gray, imagej=True, resolution=(per_unit, per_unit), metadata={"unit": unit})
    claim["unit"] = unit
  elif kind == "tags":
    tifffile.imwrite(path, gray, resolution=(72, 72), resolutionunit="INCH",
                     byteorder=str(rng.choice(["<", ">"])))
  else:
    tifffile.imwrite(path, gray)
  if kind != "plain" and rng.random() < 0.8:
    claim.update(_patch_resolution(path, rng))
  claim["input_pixel_nm"] = float(10.0 ** rng.uniform(-9, 12)) if rng.random() < 0.15 else None
  return claim


class _Hang(Exception):
  pass


def _alarm(signum, frame):
  raise _Hang()


def _run(inputs: int, seed: int, scratch: pathlib.Path) -> dict:
  """The fuzz loop (in the child): counts of outcomes and the cases that broke the contract."""
  from urisc_jax import resolution  # pylint: disable=g-import-not-at-top
  from urisc_jax.data import imageio  # pylint: disable=g-import-not-at-top

  imageio.set_max_pixels(FUZZ_MAX_PIXELS)
  signal.signal(signal.SIGALRM, _alarm)
  counts = {"matched": 0, "as_is": 0, "refused_size": 0, "refused_data": 0}
  failures = []
  for i in range(inputs):
    rng = np.random.default_rng([seed, i])
    path = scratch / f"case{i % 8}.tif"
    claim = _case(rng, path)
    signal.alarm(SECONDS_PER_CASE)
    try:
      image = imageio.read_gray(path)
      input_nm, origin = claim["input_pixel_nm"], "config.predict.input_pixel_nm"
      if input_nm is None:
        input_nm, origin = resolution.pixel_size_nm(path), "from the file's resolution metadata"
      factor = resolution.scale_factor(input_nm, TRAIN_NM)
      shape = resolution.check_matched_shape(path, image.shape, factor, input_nm=input_nm, train_nm=TRAIN_NM,
                                             origin=origin)
      problems = []
      if shape[0] * shape[1] > FUZZ_MAX_PIXELS:
        problems.append(f"resampled to {shape}, above the cap")
      if min(shape) < min(resolution.MIN_MATCHED_SIDE, *image.shape):
        problems.append(f"resampled to {shape}, below the minimum")
      seen = []
      probability = resolution.matched_probabilities(
          lambda gray: (seen.append(gray.shape), np.zeros(gray.shape, np.float32))[1], image, factor)
      if probability.shape != image.shape or (seen and tuple(seen[0]) != tuple(shape)):
        problems.append(f"matched {seen} / {probability.shape}, expected {shape} / {image.shape}")
      if problems:
        failures.append({"case": i, "claim": claim, "problems": problems})
      counts["as_is" if factor == 1.0 else "matched"] += 1
    except resolution.ResolutionError:
      counts["refused_size"] += 1
    except imageio.DataError:
      counts["refused_data"] += 1
    except _Hang:
      failures.append({"case": i, "claim": claim, "problems": [f"took over {SECONDS_PER_CASE} s"]})
    except Exception as e:  # pylint: disable=broad-except  # the contract under test: nothing else escapes
      failures.append({"case": i, "claim": claim, "problems": [f"{type(e).__name__}: {e}"],
                       "traceback": traceback.format_exc()[-1500:]})
    finally:
      signal.alarm(0)
  return {"inputs": inputs, "seed": seed, "counts": counts, "failures": failures[:20],
          "failure_count": len(failures),
          "peak_rss_mb": peak_rss_kb() / 1024}


def test_fuzzed_resolution_tags_match_within_the_cap_or_are_refused(tmp_path):
  inputs = int(os.environ.get("URISC_FUZZ_INPUTS", DEFAULT_INPUTS))
  seed = int(os.environ.get("URISC_FUZZ_SEED", "0"))
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "URISC_FUZZ_SCRATCH": str(tmp_path)}
  result = subprocess.run([sys.executable, __file__, str(inputs), str(seed)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120 + inputs)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.splitlines()[-1])
  print(f"TIFF resolution fuzz: {report['inputs']} cases, seed {report['seed']}: {report['counts']}, "
        f"peak RSS {report['peak_rss_mb']:.0f} MB")
  assert report["failure_count"] == 0, json.dumps(report["failures"], indent=1)[:6000]
  counts = report["counts"]
  assert sum(counts.values()) == inputs
  if inputs >= 200:  # the generator reaches every outcome
    assert all(counts[k] > 0 for k in ("matched", "as_is", "refused_size", "refused_data")), counts
  assert report["peak_rss_mb"] < PEAK_RSS_BOUND_MB


if __name__ == "__main__":
  print(json.dumps(_run(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(os.environ["URISC_FUZZ_SCRATCH"]))))
