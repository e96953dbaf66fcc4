"""Sliding-window prediction: exact where the maths says so, seamless, streamed, and in the competition format.

Two kinds of checks:
* Stand-in "networks" whose answer is known in closed form: a pointwise map (tiling must reproduce it exactly) and an
  integer box sum of radius r with zero padding (a receptive field of exactly r pixels, computed without rounding),
  against independent references: the same function on the whole image, and a full-image accumulator.
* A narrow real U-Net-ResNet18 (random weights) against one forward pass over the whole image.
"""

import jax
import numpy as np
import pytest

from urisc_jax import inference
from urisc_jax.data import crops

# Floating-point comparisons (tiling, halos and TTA against whole-image forwards and exact stand-ins):
# .ci/run runs them again under XLA's AVX2 cap.
pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def small_unet():
  """(model, variables) of a narrow U-Net-ResNet18 (width 1/8) with random weights."""
  from urisc_jax import models  # pylint: disable=g-import-not-at-top
  model = models.build("unet", encoder="resnet18", in_channels=1, num_classes=1, width=0.125)
  return model, models.init_variables(model, (1, 64, 64, 1))


def _pointwise_forward(tiles):
  """A 'network' whose logit depends on the pixel alone: tiling must reproduce it exactly."""
  return np.asarray(tiles[..., 0], np.float32) / 16.0 - 8.0


def _box_sum(images: np.ndarray, radius: int) -> np.ndarray:
  """Sum over the (2r + 1)^2 window around each pixel of integer images [..., H, W], zeros outside: exact int64."""
  k = 2 * radius + 1
  pad = [(0, 0)] * (images.ndim - 2) + [(radius + 1, radius)] * 2
  c = np.pad(images.astype(np.int64), pad).cumsum(-2).cumsum(-1)
  return c[..., k:, k:] - c[..., :-k, k:] - c[..., k:, :-k] + c[..., :-k, :-k]


def _box_forward(radius: int):
  """A 'network' with a receptive field of exactly `radius` px and zero padding, computed without rounding error."""
  return lambda tiles: (_box_sum(np.asarray(tiles)[..., 0], radius) / 512.0 - 8.0).astype(np.float32)


def _full_image_accumulation(forward, image, *, tile, step, blend):
  """The textbook algorithm as an independent reference: full-size logit and weight accumulators."""
  weights = inference.blend_weights(tile, blend)
  logit_sum = np.zeros(image.shape, np.float64)
  weight_sum = np.zeros(image.shape, np.float64)
  for r, c in crops.grid_origins(image.shape, tile, max(1, int(round(tile * step)))):
    logits = forward(image[None, r:r + tile, c:c + tile, None])[0]
    logit_sum[r:r + tile, c:c + tile] += logits * weights
    weight_sum[r:r + tile, c:c + tile] += weights
  return logit_sum / weight_sum


def _random_image(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", [(200, 300), (64, 64), (50, 70), (129, 65)])
@pytest.mark.parametrize("options", [dict(blend="gaussian", step=0.5), dict(blend="constant", step=0.5),
                                     dict(blend="gaussian", step=0.25), dict(blend="constant", step=1.0),
                                     dict(halo=0), dict(halo=16)])
def test_tiling_reproduces_a_pointwise_model_exactly(shape, options):
  image = _random_image(shape)
  logits = inference.predict_logits(_pointwise_forward, image, tile=64, batch_size=3, **options)
  np.testing.assert_allclose(logits, image.astype(np.float32) / 16.0 - 8.0, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape,tile,step", [((300, 200), 64, 0.5), ((97, 250), 32, 0.25), ((128, 128), 64, 1.0),
                                             ((260, 70), 64, 0.3)])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_banded_streaming_equals_full_image_accumulation(shape, tile, step, blend):
  image = _random_image(shape, seed=1)
  forward = _box_forward(5)
  streamed = inference.predict_logits(forward, image, tile=tile, step=step, blend=blend, batch_size=5)
  reference = _full_image_accumulation(forward, image, tile=tile, step=step, blend=blend)
  np.testing.assert_allclose(streamed, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [dict(step=0.5), dict(halo=8)])
def test_memory_mapped_input_and_output_give_the_in_memory_result_bit_for_bit(tmp_path, options):
  image = _random_image((333, 190), seed=2)
  np.save(tmp_path / "image.npy", image)
  mapped_image = np.load(tmp_path / "image.npy", mmap_mode="r")
  out = np.lib.format.open_memmap(tmp_path / "logits.npy", mode="w+", dtype=np.float32, shape=image.shape)
  forward = _box_forward(3)
  result = inference.predict_logits(forward, mapped_image, tile=64, out=out, **options)
  assert result is out
  del result, out
  in_memory = inference.predict_logits(forward, image, tile=64, **options)
  np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), in_memory)


@pytest.mark.parametrize("shape,tile,halo", [((200, 300), 64, 16), ((64, 100), 64, 8), ((1000, 97), 96, 40)])
def test_halo_grid_partitions_the_image_and_keeps_each_pixel_a_halo_from_its_tile_border(shape, tile, halo):
  grid = inference.tile_grid(shape, tile, halo=halo)
  for starts, seams, length in ((grid.rows, grid.row_seams, shape[0]), (grid.cols, grid.col_seams, shape[1])):
    assert seams[0] == 0 and seams[-1] == length and len(seams) == len(starts) + 1
    assert starts[-1] == length - tile and all(np.diff(starts) > 0)
    for i, start in enumerate(starts):
      top, bottom = seams[i], seams[i + 1]
      assert start <= top < bottom <= start + tile
      assert i == 0 or top - start >= halo  # inner tile borders are at least `halo` away
      assert i == len(starts) - 1 or start + tile - bottom >= halo


@pytest.mark.parametrize("shape,radius,halo", [((200, 300), 6, 6), ((150, 97), 4, 16), ((64, 200), 10, 12)])
def test_halo_mode_is_exact_when_the_halo_covers_the_receptive_field(shape, radius, halo):
  image = _random_image(shape, seed=3)
  logits = inference.predict_logits(_box_forward(radius), image, tile=64, halo=halo, batch_size=2)
  np.testing.assert_array_equal(logits, _box_forward(radius)(image[None, ..., None])[0])


def test_a_halo_smaller_than_the_receptive_field_leaves_visible_errors():
  image = _random_image((200, 300), seed=4)
  logits = inference.predict_logits(_box_forward(8), image, tile=64, halo=2)
  assert np.abs(logits - _box_forward(8)(image[None, ..., None])[0]).max() > 0.1


def test_border_error_profile_finds_the_receptive_field_and_sizes_the_halo():
  image = _random_image((160, 160), seed=5)
  profile = inference.border_error_profile(_box_forward(7), image, tile=64, margin=32)
  assert profile.shape == (32,)
  assert (profile[:7] > 0).all() and (profile[7:] == 0).all()
  assert inference.choose_halo(profile, 0.0, multiple=1) == 7
  assert inference.choose_halo(profile, 0.0) == 16
  assert inference.choose_halo(inference.border_error_profile(_pointwise_forward, image, tile=64), 0.0) == 0
  with pytest.raises(ValueError, match="never falls below"):
    inference.choose_halo(np.ones(8), 0.5)


def test_the_device_computes_the_next_batch_while_the_host_consumes_the_last():
  events = []

  class Pending:
    """Stands for an asynchronous device result: reading it is the moment the host waits."""

    def __init__(self, index, tiles):
      self.index, self.logits = index, _pointwise_forward(tiles)

    def __array__(self, dtype=None, copy=None):
      events.append(("read", self.index))
      return self.logits

  def forward(tiles):
    events.append(("dispatch", len([e for e in events if e[0] == "dispatch"])))
    return Pending(events[-1][1], tiles)

  image = _random_image((128, 128), seed=6)
  logits = inference.predict_logits(forward, image, tile=64, step=0.5, batch_size=2)  # 9 tiles: 5 batches
  np.testing.assert_allclose(logits, _pointwise_forward(image[..., None]), rtol=1e-6)
  expected = [("dispatch", 0)]
  for k in range(1, 5):
    expected += [("dispatch", k), ("read", k - 1)]
  assert events == expected + [("read", 4)]


def test_the_eight_views_are_distinct_and_invert_exactly():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 1)), jnp.float32)
  seen = []
  for v in inference._VIEWS:
    viewed = inference.view(x, *v)
    np.testing.assert_array_equal(np.asarray(inference.unview(viewed, *v)), np.asarray(x))
    assert not any(np.array_equal(np.asarray(viewed), s) for s in seen)
    seen.append(np.asarray(viewed))


def _views_reference(single_view_forward, tiles, tta):
  """Test-time augmentation written out: the mean over views of unview(forward(view(tiles))), one view at a time."""
  total = 0.0
  for v in inference._VIEWS[:tta]:
    logits = np.asarray(single_view_forward(np.asarray(inference.view(tiles, *v))))[..., None]
    total = total + np.asarray(inference.unview(logits, *v))[..., 0]
  return total / tta


@pytest.fixture(scope="module")
def tta_forwards(small_unet):
  """Tile forwards of the narrow U-Net without TTA and with all 8 views."""
  model, variables = small_unet
  return {tta: inference.make_tile_forward(model, variables, mean=0.57, std=0.13, tta=tta) for tta in (1, 8)}


def test_a_binder_compiles_once_for_every_set_of_variables_it_binds(small_unet, monkeypatch):
  """Validation during training binds each new state to one compiled forward instead of recompiling."""
  model, variables = small_unet
  traces = []
  views_forward = inference._views_forward
  monkeypatch.setattr(inference, "_views_forward", lambda *a: traces.append(1) or views_forward(*a))
  bind = inference.tile_forward_binder(model, mean=0.57, std=0.13)
  doubled = jax.tree.map(lambda x: x * 2, variables)
  tiles = _random_image((2, 64, 64, 1), seed=5)
  first, second = np.asarray(bind(variables)(tiles)), np.asarray(bind(doubled)(tiles))
  assert len(traces) == 1
  np.testing.assert_array_equal(first, np.asarray(inference.make_tile_forward(model, variables, mean=0.57,
                                                                              std=0.13)(tiles)))
  assert np.abs(second - first).max() > 1e-3  # the second binding really used its own variables


def _float32_atol(reference, ulps_scale=1e-5) -> float:
  """An absolute tolerance for two float32 forwards of one network that sum in other orders (other batch sizes, other
  views, other tile shapes, so other blocking on any CPU): 1e-5 of the logits' scale, about a hundred float32 ulps
  of the largest logit, where a wrong view, a misplaced tile or a missing inverse transform moves logits by order 1."""
  return ulps_scale * max(1.0, float(np.abs(reference).max()))


def test_eight_views_in_one_batch_equal_the_views_taken_one_at_a_time(tta_forwards):
  tiles = _random_image((2, 64, 64, 1), seed=7)
  reference = _views_reference(tta_forwards[1], tiles, 8)
  np.testing.assert_allclose(np.asarray(tta_forwards[8](tiles)), reference, atol=_float32_atol(reference))


def test_eight_view_tta_makes_the_forward_equivariant_to_flips_and_transposes(tta_forwards):
  """Averaging over the whole symmetry group of the square: transforming the input transforms the output alike."""
  tiles = _random_image((2, 64, 64, 1), seed=8)
  logits = np.asarray(tta_forwards[8](tiles))[..., None]
  for v in inference._VIEWS[1:]:
    moved = np.asarray(tta_forwards[8](np.asarray(inference.view(tiles, *v))))
    np.testing.assert_allclose(moved, np.asarray(inference.view(logits, *v))[..., 0], atol=_float32_atol(logits))
  # Without TTA the network is not equivariant, so the property above is TTA's doing.
  mirrored = np.ascontiguousarray(tiles[:, :, ::-1])
  assert np.abs(np.asarray(tta_forwards[1](mirrored)) - np.asarray(tta_forwards[1](tiles))[:, :, ::-1]).max() > 1e-3


def test_tta_on_non_square_tiles_equals_the_views_taken_one_at_a_time(tta_forwards):
  """Transposed views of a non-square tile have another shape: they go through the network in a second call."""
  tiles = _random_image((1, 32, 64, 1), seed=9)
  reference = _views_reference(tta_forwards[1], tiles, 8)
  np.testing.assert_allclose(np.asarray(tta_forwards[8](tiles)), reference, atol=_float32_atol(reference))


def test_halo_tile_computes_the_fewest_pixels():
  # 4096 px at halo 128: 5 x 5 tiles of 1024 px compute 26 Mpix, 3 x 3 tiles of 1536 px 21 Mpix.
  assert inference.halo_tile((4096, 4096), 1024, 128) == 1536
  shape, tile, halo = (1000, 700), 256, 48
  chosen = inference.halo_tile(shape, tile, halo)
  computed = {t: inference.tile_grid(shape, t, halo=halo).num_tiles * t * t for t in range(256, 385, 32)}
  assert computed[chosen] == min(computed.values()) and chosen in computed


def test_a_tile_too_small_for_the_halo_grows_to_four_halos():
  """The halo is what the network needs, so a small tile (tiny's 64 px) is raised to 4 x halo, not the halo cut."""
  assert inference.min_halo_tile(64) == 256 and inference.min_halo_tile(20) == 96
  assert inference.min_halo_tile(0) == 32
  assert inference.halo_tile((192, 160), 64, 64) == 256
  assert inference.halo_tile((2000, 2000), 64, 64) >= 256
  assert inference.halo_tile((192, 160), 64, 16) == 96  # 6 tiles of 96 px compute fewer pixels than 20 of 64
  image = _random_image((192, 160), seed=10)
  tile = inference.halo_tile(image.shape, 64, 64)
  logits = inference.predict_logits(_box_forward(5), image, tile=tile, halo=64)
  # An image smaller than the tile is reflected up to the tile's size: one tile, exact.
  padded = np.pad(image, ((0, 64), (0, 96)), mode="reflect")
  np.testing.assert_array_equal(logits, _box_forward(5)(padded[None, ..., None])[0, :192, :160])
  with pytest.raises(ValueError, match="halo"):
    inference.halo_tile((192, 160), 64, -1)


def test_gaussian_weights_peak_in_the_centre_and_stay_positive():
  w = inference.blend_weights(64, "gaussian")
  assert w.shape == (64, 64) and w.min() > 0
  assert w[31, 31] == pytest.approx(w.max()) and w[0, 0] < 0.01
  np.testing.assert_array_equal(w, w.T)
  profile = np.exp(-0.5 * ((np.arange(64) - 31.5) / 8.0) ** 2)
  np.testing.assert_allclose(w, np.outer(profile, profile) / profile.max() ** 2, rtol=1e-5)


def test_probabilities_are_the_sigmoid_and_can_fill_a_given_buffer():
  logits = np.linspace(-100, 100, 20001, dtype=np.float32)
  kept = logits.copy()
  expected = 1 / (1 + np.exp(-logits.astype(np.float64)))
  probability = inference.probabilities(logits)
  assert probability.dtype == np.float32
  np.testing.assert_allclose(probability, expected, atol=1e-7)
  out = np.empty_like(logits)
  assert inference.probabilities(logits, out=out) is out
  np.testing.assert_array_equal(out, probability)
  np.testing.assert_array_equal(logits, kept)


def test_submission_format_and_overlay_colours():
  membrane = np.array([[True, False], [False, True]])
  np.testing.assert_array_equal(inference.submission(membrane), [[0, 255], [255, 0]])
  image = np.full((2, 2), 100, np.uint8)
  truth = np.array([[True, True], [False, False]])
  rgb = inference.overlay(image, membrane, truth)
  assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
  assert tuple(rgb[0, 0]) == (0, 220, 0)  # true positive
  assert tuple(rgb[1, 1]) == (255, 40, 40)  # false positive
  assert tuple(rgb[0, 1]) == (40, 120, 255)  # false negative
  assert tuple(rgb[1, 0]) == (60, 60, 60)  # true negative: dimmed gray


def test_rejects_bad_options():
  image = np.zeros((64, 64), np.uint8)
  with pytest.raises(ValueError, match="blend"):
    inference.predict_logits(_pointwise_forward, image, tile=64, blend="median")
  with pytest.raises(ValueError, match="gray image"):
    inference.predict_logits(_pointwise_forward, np.zeros((64, 64, 3), np.uint8), tile=64)
  with pytest.raises(ValueError, match="uint8"):
    inference.predict_logits(_pointwise_forward, image.astype(np.float32), tile=64)
  with pytest.raises(ValueError, match="halo"):
    inference.predict_logits(_pointwise_forward, image, tile=64, halo=32)
  with pytest.raises(ValueError, match="step"):
    inference.predict_logits(_pointwise_forward, image, tile=64, step=1.5)
  with pytest.raises(ValueError, match="out"):
    inference.predict_logits(_pointwise_forward, image, tile=64, out=np.zeros((64, 63), np.float32))


# A narrow real network. How far one output pixel of this U-Net-ResNet18 looks, measured as the extent of non-zero
# input gradients over all 32 positions modulo its stride: up to 311 px up/left and 280 px down/right. A pixel of a
# tile whose receptive field lies inside the tile (or is cut by the image border, which a whole-image pass pads the
# same way) sees exactly what it sees in a whole-image pass. Tiles of 1280 px at step 0.5 leave such pixels even
# where two tiles overlap; every tile origin is a multiple of 32 so that the stride-32 network sees the same grid.
REACH_BEFORE, REACH_AFTER = 312, 281
TILE = 1280


@pytest.fixture(scope="module")
def unet(small_unet):
  """(tile forward, whole-image forward) of the narrow U-Net; used with batches of 2 tiles of 1280 px."""
  forward = inference.make_tile_forward(*small_unet, mean=0.57, std=0.13)
  return forward, lambda image: np.asarray(forward(image[None, ..., None]))[0]


@pytest.fixture(scope="module")
def em_image():
  """A 1920 x 1280 U-RISC-like image: two tiles of 1280 px along the rows, one along the columns."""
  from urisc_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic.render(synthetic.urisc_like(1920, TILE), seed=3)[0]


@pytest.fixture(scope="module")
def em_logits(unet, em_image):
  """Logits of `em_image`: one whole-image pass, and tiles at step 0.5 blended with each weighting."""
  forward, whole_forward = unet
  logits = {"whole": whole_forward(em_image)}
  for blend in inference.BLEND_CHOICES:
    logits[blend] = inference.predict_logits(forward, em_image, tile=TILE, step=0.5, blend=blend, batch_size=2)
  return logits


def _exact_pixels(starts, tile, length):
  """Positions along an axis where every covering tile holds the pixel's whole receptive field."""
  exact = np.ones(length, bool)
  for s in starts:
    covered = np.arange(s, s + tile)
    cut_before = (covered - s < REACH_BEFORE) & (s > 0)
    cut_after = (s + tile - 1 - covered < REACH_AFTER) & (s + tile < length)
    exact[covered[cut_before | cut_after]] = False
  return exact


def test_blended_tiles_equal_a_whole_image_forward_where_no_tile_border_is_in_view(em_image, em_logits):
  tiled, whole = em_logits["gaussian"], em_logits["whole"]
  grid = inference.tile_grid(em_image.shape, TILE, step=0.5)
  assert grid.rows == (0, 640) and grid.cols == (0,)
  rows = _exact_pixels(grid.rows, TILE, em_image.shape[0])
  assert rows[640:1280].sum() > 30  # some exact pixels lie where the two tiles overlap
  np.testing.assert_allclose(tiled[rows], whole[rows], atol=_float32_atol(whole, 1e-4), rtol=1e-5)
  # Elsewhere tile borders are in view: errors exist but Gaussian weights keep them small.
  error = np.abs(tiled - whole)[~rows]
  assert 1e-4 < error.max() < 0.05 * np.abs(whole).max()


def test_halo_mode_equals_a_whole_image_forward_when_the_halo_covers_the_receptive_field(unet, em_image, em_logits):
  halo = 320  # >= REACH_BEFORE, REACH_AFTER
  tiled = inference.predict_logits(unet[0], em_image, tile=TILE, halo=halo, batch_size=2)
  np.testing.assert_allclose(tiled, em_logits["whole"], atol=_float32_atol(em_logits["whole"], 1e-4), rtol=1e-5)


def test_tile_borders_leave_no_step(em_image, em_logits):
  """Where a tile starts or ends, the difference to the whole-image logits must not jump from one row to the next."""
  whole = em_logits["whole"]
  typical_gradient = np.abs(np.diff(whole, axis=0)).mean()
  grid = inference.tile_grid(em_image.shape, TILE, step=0.5)
  border_rows = [grid.rows[1] - 1, grid.rows[0] + TILE - 1]  # the step between row y and y + 1

  def steps(blend):
    return np.abs(np.diff(em_logits[blend] - whole, axis=0))[border_rows].mean(axis=1)

  assert (steps("gaussian") < 0.01 * typical_gradient).all()
  assert (steps("constant") > 0.5 * typical_gradient).all()  # the measure sees seams when there are some


def test_a_constant_image_gives_a_constant_prediction_away_from_the_border(unet):
  forward, whole_forward = unet
  image = np.full((1920, TILE), 60, np.uint8)
  inner = (slice(REACH_BEFORE, -REACH_BEFORE), slice(REACH_BEFORE, -REACH_BEFORE))
  whole = whole_forward(image)
  # The network's answer to flat gray: the same everywhere up to float32 rounding (positions fall in other vector
  # lanes and blocks, on any CPU), 1e-5 of the value's scale.
  assert np.ptp(whole[inner]) < _float32_atol(whole[inner]) and abs(whole[inner].mean()) > 0.1
  gaussian = inference.predict_logits(forward, image, tile=TILE, step=0.5, batch_size=2)
  assert np.ptp(gaussian[inner]) < 0.01 * abs(whole[inner].mean())
  # The check has teeth: constant weights let the tile-border effects through.
  constant = inference.predict_logits(forward, image, tile=TILE, step=0.5, blend="constant", batch_size=2)
  assert np.ptp(constant[inner]) > 0.2 * abs(whole[inner].mean())
