"""Figure 8 and Figure 7B files: written atomically, readable PNGs of the requested content."""

import numpy as np
import pytest
from PIL import Image

from urisc_jax.attribution import fields, figures


def _stats(dataset, scale, pixel_nm=2.18, k_grid=(0.01, 0.1, 0.5)):
  rng = np.random.default_rng(0)
  areas = rng.uniform(1, 2, (6, len(k_grid))) * scale * np.array([4.0, 2.0, 1.0])[:len(k_grid)]
  stats = fields.field_statistics(areas, ["tp", "tp", "fp", "fp", "fn", "fn"], k_grid, pixel_nm=pixel_nm,
                                  image_pixels=[10_000] * 6)
  return {**stats, "dataset": dataset}


def test_figure8_is_a_readable_png(tmp_path):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (96, 128), dtype=np.uint8)
  truth = rng.random((96, 128)) < 0.1
  predicted = truth ^ (rng.random((96, 128)) < 0.05)
  panels = [{"row": 20 + 10 * i, "col": 30 + 15 * i, "outcome": outcome, "origin": (0, 32 * i),
             "map": fields.normalize_attributions(rng.normal(size=(64, 64)))}
            for i, outcome in enumerate(["tp", "fp", "fn", "tp"])]
  path = figures.plot_figure8(tmp_path / "out" / "figure8_a.png", image, predicted, truth, panels, title="a")
  assert path.stat().st_size > 0
  with Image.open(path) as png:
    png.load()
    assert png.format == "PNG" and png.width == 1200 and png.height == 1200  # 3 columns x (1 + 2 rows) at 4 in
    pixels = np.asarray(png.convert("RGB")).reshape(-1, 3).astype(int)
  # The diverging colormap's red and blue ends are both there.
  assert np.any((pixels[:, 0] > 150) & (pixels[:, 2] < 80)) and np.any((pixels[:, 2] > 150) & (pixels[:, 0] < 80))
  assert [p.name for p in (tmp_path / "out").iterdir()] == ["figure8_a.png"]  # no temporary file left
  # Images larger than max_display_px are shown shrunk; the file looks the same otherwise.
  shrunk = figures.plot_figure8(tmp_path / "out" / "figure8_b.png", image, predicted, truth, panels[:1],
                                max_display_px=50)
  with Image.open(shrunk) as png:
    assert png.format == "PNG" and png.size == (1200, 800)


def test_field_curves_and_dataset_comparison(tmp_path):
  urisc, isbi = _stats("U-RISC", 10_000.0), _stats("ISBI 2012", 2_000.0, pixel_nm=4.0)
  series = {o: urisc["outcomes"][o] for o in ("tp", "fp", "fn")}
  path = figures.plot_field_curves(tmp_path / "sk.png", series, urisc["k_grid"])
  with Image.open(path) as png:
    assert png.format == "PNG" and png.size == (600, 450)
  path = figures.plot_dataset_comparison(tmp_path / "compare.png", [urisc, isbi], outcome="tp")
  with Image.open(path) as png:
    assert png.format == "PNG" and png.size == (600, 450)
  with pytest.raises(ValueError, match="k_grid"):
    figures.plot_dataset_comparison(tmp_path / "bad.png", [urisc, _stats("other", 1.0, k_grid=(0.01, 0.1))])
  assert not (tmp_path / "bad.png").exists()


def test_heatmaps_zoom_to_where_the_attribution_is():
  field = np.zeros((300, 400), np.float32)
  field[140:160, 200:230] = 0.5  # the attribution around a target at (150, 215)
  field[10, 10] = 0.005  # below the level: ignored
  (row_lo, row_hi), (col_lo, col_hi) = figures.zoom_window(field, (150, 215), min_size=16)
  assert row_lo <= 140 and row_hi >= 160 and col_lo <= 200 and col_hi >= 230
  assert row_lo > 100 and col_lo > 150  # the tiny far-away value does not stretch the view
  (row_lo, row_hi), (col_lo, col_hi) = figures.zoom_window(np.zeros((300, 400)), (5, 395), min_size=64)
  assert (row_lo, col_hi) == (0, 400) and row_hi - row_lo >= 32 and col_hi - col_lo >= 32  # clipped at the border
