"""ISBI 2012, the plain U-Net of Ronneberger et al. (the official repository's U-Net) at quarter width for the CPU: train on slices 00-19, score slices 20-29.

    python -m urisc_jax.main --config=configs/isbi2012_plain_unet.py --workdir=runs/isbi2012_plain_unet \
        --config.data.root=PATH/TO/isbi2012

PATH/TO/isbi2012 holds train-volume.tif and train-labels.tif, or train/images/NN.png and train/labels/NN.png.
Shared settings and how each number is computed: configs/isbi2012_common.py. Cost on 2 idle CPU cores: about 11 min
(1.55 s per step; measured: membrane F1 0.805, cell-interior F1 0.946, V_rand 0.959, V_info 0.975, pixel error 0.084).
"""

from configs import isbi2012_common


def get_config():
  config = isbi2012_common.get_config({"name": "plain_unet", "width": 0.25})
  config.train.num_steps = 400
  return config
