"""ISBI 2012, the plain U-Net of Ronneberger et al. (the official repository's U-Net) at half width for the CPU: train on slices 00-19, score slices 20-29.

    python -m urisc_jax.main --config=configs/isbi2012_plain_unet.py --workdir=runs/isbi2012_plain_unet \
        --config.data.root=PATH/TO/isbi2012

PATH/TO/isbi2012 holds train-volume.tif and train-labels.tif, or train/images/NN.png and train/labels/NN.png.
Shared settings and how each number is computed: configs/isbi2012_common.py. Cost on 2 idle CPU cores: not measured yet.
"""

from configs import isbi2012_common


def get_config():
  config = isbi2012_common.get_config({"name": "plain_unet", "width": 0.5})
  config.train.num_steps = 400
  return config
