"""Tiny end-to-end config for tests: a narrow model on a few small synthetic images, seconds on a CPU.

    python -m urisc_jax.main --config=configs/tiny.py --workdir=/tmp/urisc_tiny
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "unet"
  config.model.encoder = "resnet18"
  config.model.width = 0.125
  config.data.crop_size = 64
  config.data.synthetic.preset = "urisc"
  config.data.synthetic.height = 192
  config.data.synthetic.width = 160
  config.data.synthetic.num_train = 2
  config.data.synthetic.num_val = 1
  config.data.synthetic.num_test = 1
  config.train.num_steps = 4
  config.train.batch_size = 8
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.eval_every = 2
  config.optim.warmup_steps = 0
  config.predict.tile = 64
  config.predict.batch_size = 8
  return config
