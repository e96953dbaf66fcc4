"""The tile forward split over 8 simulated CPU devices gives the single-device logits, whole images included.

The devices exist only in a fresh process started with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the
device count is fixed when JAX starts), so the checks run there and report JSON back.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np
    from configs import tiny
    from urisc_jax import inference, models, predict

    assert jax.local_device_count() == 8
    model = models.build("unet", encoder="resnet18", in_channels=1, num_classes=1, width=0.125)
    variables = models.init_variables(model, (1, 64, 64, 1))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    report = {}

    def max_diff(a, b):
      return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())

    def devices_of(result):
      return len(result.sharding.device_set)

    # Single tiles, every view of the test-time augmentation (small tiles: 8 x 8 views go through the network).
    tiles = rng.integers(0, 256, (8, 32, 32, 1), dtype=np.uint8)
    plain = inference.make_tile_forward(model, variables, mean=0.57, std=0.13, tta=8)
    sharded = inference.make_tile_forward(model, variables, mean=0.57, std=0.13, tta=8, mesh=mesh)
    result = sharded(tiles)
    report["tta8"] = {"diff": max_diff(result, plain(tiles)), "devices": devices_of(result)}
    try:
      sharded(tiles[:6])
      report["indivisible_batch_error"] = None
    except ValueError as error:
      report["indivisible_batch_error"] = str(error)

    # predict.tile_forward: the most local devices that divide the batch, down to one (no mesh).
    config = tiny.get_config()
    tiles = rng.integers(0, 256, (8, 64, 64, 1), dtype=np.uint8)
    unsharded = inference.make_tile_forward(model, variables, mean=config.data.mean, std=config.data.std)
    reference = np.asarray(unsharded(tiles))
    forwards = {}
    for batch_size in (8, 6):
      config.predict.batch_size = batch_size
      forwards[batch_size] = predict.tile_forward(config, model, variables)
      result = forwards[batch_size](tiles[:batch_size])
      report[f"batch{batch_size}"] = {"diff": max_diff(result, reference[:batch_size]),
                                      "devices": devices_of(result)}
    meshes = {b: predict.prediction_mesh(b) for b in (1, 3, 7, 12, 16)}
    report["mesh_sizes"] = {str(b): None if mesh is None else mesh.size for b, mesh in meshes.items()}

    # Whole images through predict_logits, blended and halo mode: the tile batch split over 8 devices or not.
    image = rng.integers(0, 256, (150, 230), dtype=np.uint8)
    for name, options in (("blend", dict(step=0.5)), ("halo", dict(halo=16))):
      logits = [inference.predict_logits(f, image, tile=64, batch_size=8, **options) for f in (forwards[8], unsharded)]
      report[f"image_{name}"] = {"diff": max_diff(*logits), "scale": float(np.abs(logits[1]).max())}
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_eight_view_tta_split_over_8_devices_equals_one_device(report):
  assert report["tta8"]["devices"] == 8
  assert report["tta8"]["diff"] < 1e-4, report


def test_a_batch_the_mesh_cannot_split_is_refused_with_a_clear_message(report):
  assert "batch_size" in report["indivisible_batch_error"]


@pytest.mark.parametrize("batch_size", [8, 6])
def test_predict_tile_forward_uses_the_devices_that_divide_the_batch(report, batch_size):
  assert report[f"batch{batch_size}"]["devices"] == batch_size
  assert report[f"batch{batch_size}"]["diff"] < 1e-4, report
  # The largest device count that divides the batch; one device (no mesh) when only 1 does.
  assert report["mesh_sizes"] == {"1": None, "3": 3, "7": 7, "12": 6, "16": 8}


@pytest.mark.parametrize("mode", ["blend", "halo"])
def test_whole_image_logits_do_not_depend_on_sharding(report, mode):
  assert report[f"image_{mode}"]["scale"] > 0.1  # the comparison is not between zeros
  assert report[f"image_{mode}"]["diff"] < 1e-4, report
