"""Bad config values: each is refused before any work, in one message that names the key, the value and the valid
range (`config_checks.validate`); through the command line with exit status 2 and nothing written."""

import json
import pathlib
import subprocess
import sys

import pytest

from configs import default
from urisc_jax import config_checks

REPO = pathlib.Path(__file__).resolve().parents[2]

# (mode, {key: value}, message fragment): every value below was accepted, or failed late, before validation.
CASES = [
    ("train", {"train.num_steps": -3}, "config.train.num_steps=-3: must be an integer >= 1"),
    ("train", {"train.num_steps": 0}, "config.train.num_steps=0: must be an integer >= 1"),
    ("train", {"train.checkpoint_every": 0}, "config.train.checkpoint_every=0: must be an integer >= 1"),
    ("train", {"train.log_every": 0}, "config.train.log_every=0: must be an integer >= 1"),
    ("train", {"train.batch_size": 0}, "config.train.batch_size=0: must be an integer >= 1"),
    ("train", {"train.eval_every": -1}, "config.train.eval_every=-1: must be an integer >= 0"),
    ("train", {"train.keep_checkpoints": 0}, "config.train.keep_checkpoints=0: must be an integer >= 1"),
    ("train", {"model.width": 0.0}, "config.model.width=0.0: must be a number >= 0.015625"),
    ("train", {"model.width": -1.0}, "config.model.width=-1.0: must be a number >= 0.015625"),
    ("train", {"model.name": "unet3"}, "unknown model 'unet3'"),
    ("train", {"model.encoder": "resnet7"}, "resnet7"),
    ("train", {"model.dtype": "float33"}, "config.model.dtype='float33' is not a dtype"),
    ("train", {"data.crop_size": 100}, "config.data.crop_size=100: must be a multiple of 32"),
    ("train", {"data.crop_size": 2048}, "config.data.crop_size=2048: must be at most the synthetic images' 1024 x 1024"),
    ("train", {"data.std": 0.0}, "config.data.std=0.0: must be a positive number"),
    ("train", {"data.membrane": "grey"}, "config.data.membrane='grey': must be one of 'black', 'white'"),
    ("train", {"data.label_threshold": 300}, "config.data.label_threshold=300: must be unset or an integer gray level"),
    ("train", {"data.max_image_pixels": 0}, "config.data.max_image_pixels=0: must be an integer >= 1"),
    ("train", {"data.num_workers": -1}, "config.data.num_workers=-1: must be an integer >= 0"),
    ("train", {"data.source": "tensorstore"}, "config.data.tensorstore.train.image='': must be a volume to train"),
    ("train", {"data.synthetic.num_train": 0}, "config.data.synthetic.num_train=0: must be an integer >= 1"),
    ("train", {"optim.learning_rate": 0.0}, "config.optim.learning_rate=0.0: must be a positive number"),
    ("train", {"optim.name": "adagrad"}, "Unknown optimizer 'adagrad'"),
    ("train", {"optim.schedule": "step"}, "Unknown schedule 'step'"),
    ("train", {"loss.name": "mse"}, "Unknown loss 'mse'"),
    ("train", {"mesh": (("data", -1), ("data", 1))}, "config.mesh repeats an axis name"),
    ("train", {"mesh": (("data", 3),)}, "does not divide the"),
    ("train", {"predict.tile": 100}, "config.predict.tile=100: must be a multiple of 32"),
    ("predict", {"predict.step": 0.0}, "config.predict.step=0.0: must be a fraction of the tile in (0, 1]"),
    ("predict", {"predict.step": 1.5}, "config.predict.step=1.5: must be a fraction of the tile in (0, 1]"),
    ("predict", {"predict.tta": 3}, "config.predict.tta=3: must be one of 1, 2, 4, 8"),
    ("predict", {"predict.blend": "box"}, "config.predict.blend='box': must be one of 'gaussian', 'constant'"),
    ("predict", {"predict.on_error": "ignore"}, "config.predict.on_error='ignore': must be one of 'stop', 'skip'"),
    ("predict", {"predict.threshold": 1.5}, "config.predict.threshold=1.5: must be unset"),
    ("predict", {"predict.halo": -1}, "config.predict.halo=-1: must be unset (blended tiles) or an integer >= 0"),
    ("predict", {"predict.input_pixel_nm": -4.0}, "config.predict.input_pixel_nm=-4.0: must be unset"),
    ("predict", {"data.pixel_nm": 0.0}, "config.data.pixel_nm=0.0: must be unset (unknown"),
    ("predict", {"predict.batch_size": 0}, "config.predict.batch_size=0: must be an integer >= 1"),
    ("predict", {"predict.volume.block": 1000}, "config.predict.volume.block=1000: must be a multiple of"),
    ("predict", {"predict.volume.chunk": 0}, "config.predict.volume.chunk=0: must be an integer >= 1"),
    ("predict", {"predict.volume.chunk": 254}, "config.predict.volume.chunk=254: must be a multiple of 2^(levels - 1)"),
    ("predict", {"predict.volume.levels": 0}, "config.predict.volume.levels=0: must be an integer >= 1"),
    ("predict", {"predict.volume.dtype": "float32"}, "config.predict.volume.dtype='float32': must be one of 'uint8'"),
    ("predict", {"predict.dask.workers": -1}, "config.predict.dask.workers=-1: must be an integer >= 0"),
    ("predict", {"predict.dask.retries": -1}, "config.predict.dask.retries=-1: must be an integer >= 0"),
    ("evaluate", {"eval.gt_mode": "binary"}, "config.eval.gt_mode='binary': must be one of 'official', 'binarized'"),
    ("export", {"export.format": "tflite"},
     "config.export.format='tflite': must be one of 'onnx', 'torch', 'bioimageio', 'stablehlo'"),
    ("export", {"export.sample_size": 100}, "config.export.sample_size=100: must be a multiple of 32"),
    ("export", {"export.checkpoint": ""}, "config.export.checkpoint='': must be 'best', 'latest' or a checkpoint"),
    ("attribute", {"attribution.steps": 0}, "config.attribution.steps=0: must be an integer >= 1"),
    ("attribute", {"attribution.rule": "simpson"}, "config.attribution.rule='simpson': must be one of 'gauss_legendre'"),
    ("attribute", {"attribution.tolerance": -0.01}, "config.attribution.tolerance=-0.01: must be unset"),
    ("attribute", {"attribution.max_nodes": 16}, "config.attribution.max_nodes=16: must be >= config.attribution.steps=32"),
    ("attribute", {"attribution.max_nodes": 0}, "config.attribution.max_nodes=0: must be an integer >= 1"),
    ("attribute", {"attribution.protocol": "resized"}, "config.attribution.protocol='resized': must be one of 'native'"),
    ("attribute", {"attribution.paper_size": 500}, "config.attribution.paper_size=500: must be a multiple of 32"),
    ("attribute", {"attribution.paper_grid": 0}, "config.attribution.paper_grid=0: must be an integer >= 1"),
    ("attribute", {"attribution.pixel_nm": 0.0}, "config.attribution.pixel_nm=0.0: must be a positive pixel size"),
]


def _config(overrides: dict):
  config = default.get_config()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


@pytest.mark.parametrize("mode,overrides,fragment", CASES, ids=[f"{m}:{next(iter(o))}={next(iter(o.values()))}"
                                                                 for m, o, _ in CASES])
def test_a_bad_value_is_refused_naming_the_key_and_its_range(mode, overrides, fragment):
  with pytest.raises(config_checks.ConfigError) as raised:
    config_checks.validate(_config(overrides), mode)
  assert fragment in str(raised.value)


def test_the_default_and_every_shipped_config_pass():
  for path in sorted((REPO / "configs").glob("*.py")):
    if path.stem in ("__init__", "isbi2012_common", "urisc_common"):
      continue
    module = __import__(f"configs.{path.stem}", fromlist=["get_config"])
    for mode in config_checks.SECTIONS:
      config_checks.validate(module.get_config(), mode)


def test_every_problem_is_listed_at_once():
  config = _config({"train.num_steps": 0, "train.checkpoint_every": 0, "model.width": 0.0})
  with pytest.raises(config_checks.ConfigError, match="has 3 problems") as raised:
    config_checks.validate(config, "train")
  for key in ("train.num_steps", "train.checkpoint_every", "model.width"):
    assert f"config.{key}=" in str(raised.value)


def test_a_mode_ignores_the_sections_it_does_not_read():
  config_checks.validate(_config({"train.num_steps": 0, "optim.name": "adagrad"}), "evaluate")


@pytest.mark.parametrize("flags,fragment", [
    (["--config.train.num_steps=-3"], "config.train.num_steps=-3"),
    (["--config.train.checkpoint_every=0", "--config.model.width=0"], "has 2 problems"),
])
def test_the_command_line_exits_2_before_writing_anything(tmp_path, flags, fragment):
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "urisc_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}", *flags]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert fragment in result.stderr and "Traceback" not in result.stderr
  assert not workdir.exists()  # no config.json, no data, no checkpoints: nothing that looks like a run


def test_a_workdir_that_is_a_file_exits_2(tmp_path):
  workdir = tmp_path / "a_file"
  workdir.write_text("not a folder")
  command = [sys.executable, "-m", "urisc_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "is a file, not a folder" in result.stderr
  assert workdir.read_text() == "not a folder"


def test_stdout_json_is_standard_json_without_nan():
  from urisc_jax import main, outputs  # pylint: disable=g-import-not-at-top
  headline = main._headline({"f1": 0.5, "f1_sem": float("nan"), "train": {"x": float("inf")}, "per_image": [1]})
  text = json.dumps(outputs.json_safe(headline))
  assert json.loads(text) == {"f1": 0.5, "f1_sem": None, "train": {"x": None}}
  assert "NaN" not in text and "Infinity" not in text
