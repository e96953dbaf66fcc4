"""Volume prediction on a Dask LocalCluster of 2 worker processes: equal to single-process whole-image prediction,
resumable after the driver stops, unharmed by a lost worker, and with per-worker memory that does not grow with
the volume.

One cluster and one narrow LinkNet (width 1/16, random weights saved as a checkpoint) serve every test.
"""

import os
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from configs import default
from urisc_jax import checkpoint, models, optim, state, volume_predict, volumes
from urisc_jax import predict as predict_lib

SECTION = 2048


def _config(input_path, output_path):
  config = default.get_config()
  config.model.name, config.model.encoder, config.model.width, config.model.dtype = "linknet", "resnet18", 1 / 16, "float32"
  config.data.crop_size = 64
  config.predict.tile = 256
  config.predict.halo = 48
  config.predict.batch_size = 2
  config.predict.threshold = 0.5
  config.predict.input, config.predict.output = str(input_path), str(output_path)
  config.predict.volume.block = 512
  config.predict.volume.chunk = 256
  config.predict.volume.levels = 2
  return config


def _write_volume(path: pathlib.Path, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
  """A zarr v2 volume of smooth random structure (so that thresholded masks are not trivial)."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (*shape[:-2], shape[-2] // 32 + 1, shape[-1] // 32 + 1)).astype(np.float32)
  image = np.repeat(np.repeat(coarse, 32, axis=-2), 32, axis=-1)[..., :shape[-2], :shape[-1]]
  image = np.clip(image + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
  store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
                   "metadata": {"shape": list(shape), "chunks": [1, 512, 512][3 - len(shape):], "dtype": "|u1"}},
                  create=True).result()
  store.write(image).result()
  return image


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir with a checkpoint of random weights, config maker, the model's forward on one process, client)."""
  from distributed import Client, LocalCluster  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("volume_run")
  config = _config("", "")
  model = state.build_model(config.model)
  tx = optim.optimizer_from_config(config.optim, config.train.num_steps)
  # models.init_variables compiles in seconds where state.init_state takes tens of seconds on a busy CPU.
  initial = models.init_variables(model, (1, 64, 64, 1))
  # Random weights give logits >= 0 (a ReLU feeds the head): shift them so that probabilities spread around 0.5.
  params = dict(initial["params"], head=dict(initial["params"]["head"], bias=jnp.full((1,), -0.3)))
  train_state = state.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=initial["batch_stats"],
                                 opt_state=tx.init(params))
  saver = checkpoint.Checkpointer(workdir / "checkpoints")
  saver.save(0, train_state)
  saver.close()
  variables, _, _ = predict_lib.restore_variables(config, workdir, model)
  forward = predict_lib.tile_forward(config, model, variables)
  with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, env=volume_predict.worker_env(),
                    dashboard_address=None) as cluster, Client(cluster) as client:
    yield workdir, forward, client


def _wait_until_idle(client, timeout: float = 60.0) -> None:
  """Waits until no worker is still running or writing a block (a cancelled task's thread runs on to its end)."""
  deadline = time.monotonic() + timeout
  while any(client.run(lambda dask_worker: len(dask_worker.state.executing)).values()):
    assert time.monotonic() < deadline, "workers still busy"
    time.sleep(0.2)
  client.run(volume_predict.flush_writes)  # and the last block's write on each worker


def _reference(forward, image: np.ndarray, config) -> tuple[np.ndarray, np.ndarray]:
  """Single-process whole-section prediction: (stored probability, mask) per section. Sets config.predict.threshold
  to the mean probability, so that the mask of the random-weight model is not all one value."""
  probability = np.stack([predict_lib.probabilities(forward, section, config.predict) for section in image])
  config.predict.threshold = float(probability.mean())
  return (volumes.quantize_probability(probability, "uint8"),
          (probability >= np.float32(config.predict.threshold)).astype(np.uint8))


def test_two_workers_equal_whole_image_prediction_and_a_rerun_skips_everything(run, tmp_path):
  workdir, forward, client = run
  image = _write_volume(tmp_path / "in.zarr", (3, SECTION, SECTION))
  config = _config(tmp_path / "in.zarr", tmp_path / "out.zarr")
  probability, mask = _reference(forward, image, config)
  summary = volume_predict.predict_volume(config, workdir, client=client)
  assert (summary["blocks"], summary["computed"], summary["skipped"]) == (3 * 16, 48, 0)
  np.testing.assert_array_equal(volumes.open_level(tmp_path / "out.zarr"), probability)
  np.testing.assert_array_equal(volumes.open_level(tmp_path / "out.zarr", labels=True), mask)
  assert 0 < mask.mean() < 1
  # The pyramid: level 1 is the 2 x 2 mean / max of level 0.
  np.testing.assert_array_equal(volumes.open_level(tmp_path / "out.zarr", 1), volumes.downsample(probability, "mean"))
  np.testing.assert_array_equal(volumes.open_level(tmp_path / "out.zarr", 1, labels=True),
                                volumes.downsample(mask, "max"))
  again = volume_predict.predict_volume(config, workdir, client=client)
  assert (again["computed"], again["skipped"]) == (0, 48)


def test_a_stopped_run_then_a_lost_worker_finish_by_redoing_only_missing_blocks(run, tmp_path):
  workdir, forward, client = run
  image = _write_volume(tmp_path / "in.zarr", (2, 1024, 1024), seed=1)
  config = _config(tmp_path / "in.zarr", tmp_path / "out.zarr")
  config.predict.volume.block = 256
  probability, mask = _reference(forward, image, config)

  class Stop(Exception):
    pass

  def stop_after_3(done, _):
    if done == 3:
      raise Stop

  with pytest.raises(Stop):  # the driver dies after 3 of 32 blocks (pending tasks are cancelled with it)
    volume_predict.predict_volume(config, workdir, client=client, on_block=stop_after_3)
  _wait_until_idle(client)
  finished = len(list((tmp_path / "out.zarr" / volume_predict.MARKERS).glob("*-*-*")))
  assert finished >= 3

  pids = list(client.run(os.getpid).values())
  killed = []

  def kill_a_worker(done, _):
    if done == 2 and not killed:
      os.kill(pids[0], signal.SIGKILL)  # the nanny starts a new worker; its blocks go to the other one
      killed.append(pids[0])

  summary = volume_predict.predict_volume(config, workdir, client=client, on_block=kill_a_worker)
  assert killed
  assert summary["skipped"] == finished
  assert summary["computed"] == 32 - finished
  np.testing.assert_array_equal(volumes.open_level(tmp_path / "out.zarr"), probability)
  np.testing.assert_array_equal(volumes.open_level(tmp_path / "out.zarr", labels=True), mask)


def test_a_2d_image_gives_a_2d_output_and_a_rerun_with_other_settings_is_refused(run, tmp_path):
  workdir, forward, client = run
  image = _write_volume(tmp_path / "in.zarr", (300, 280))
  config = _config(tmp_path / "in.zarr", tmp_path / "out.zarr")
  config.predict.volume.block = 256
  probability, _ = _reference(forward, image[None], config)
  volume_predict.predict_volume(config, workdir, client=client)
  np.testing.assert_array_equal(volumes.open_level(tmp_path / "out.zarr"), probability[0])
  config.predict.threshold = 0.01
  with pytest.raises(volumes.VolumeError, match="differs in: threshold"):
    volume_predict.predict_volume(config, workdir, client=client)


def test_worker_peak_memory_does_not_grow_with_the_volume(run, tmp_path):
  workdir, _, client = run
  peaks = {}
  # 2x and 8x the pixels of a 512 x 1024 section.
  for factor, shape in ((2, (1, 1024, 1024)), (8, (1, 2048, 2048))):
    _write_volume(tmp_path / f"in{factor}.zarr", shape)
    config = _config(tmp_path / f"in{factor}.zarr", tmp_path / f"out{factor}.zarr")
    peaks[factor] = volume_predict.predict_volume(config, workdir, client=client)["worker_peak_rss_gib"]
  # 4x the pixels: blocks of the same size, more of them; allow 10 % + 32 MiB for allocator noise.
  assert peaks[8] <= peaks[2] * 1.1 + 1 / 32, peaks


@pytest.mark.parametrize("scale, units, input_nm, match, refused", [
    ((50.0, 4.36, 4.36), ("nanometer",) * 3, None, True, True),        # OME-Zarr at 2x the training pixel size
    ((0.05, 0.00436, 0.00436), ("micrometer",) * 3, None, True, True),  # the same in micrometres
    ((50.0, 2.2, 2.2), ("nanometer",) * 3, None, True, False),          # within 5 % of data.pixel_nm = 2.18
    ((1.0, 1.0, 1.0), ("", "", ""), None, True, False),                 # no metadata: taken to match
    ((1.0, 1.0, 1.0), ("", "", ""), 8.0, True, True),                   # predict.input_pixel_nm says otherwise
    ((50.0, 4.36, 4.36), ("nanometer",) * 3, None, False, False),       # matching switched off: predicted as is
])
def test_a_volume_at_another_pixel_size_is_refused_not_silently_predicted(scale, units, input_nm, match, refused):
  config = _config("in.zarr", "out.zarr")
  config.predict.input_pixel_nm, config.predict.match_resolution = input_nm, match
  volume = volumes.InputVolume(spec={}, shape=(2, 64, 64), ndim=3, scale=scale, units=units)
  if refused:
    with pytest.raises(volumes.VolumeError, match="match_resolution=False"):
      volume_predict._check_pixel_size(config, volume)  # pylint: disable=protected-access
  else:
    volume_predict._check_pixel_size(config, volume)  # pylint: disable=protected-access
