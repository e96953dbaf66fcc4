"""ISBI 2012, U-Net-ResNet50 (the paper's U-Net) at half width (a quarter of the FLOPs) for the CPU: train on slices 00-19, score slices 20-29.

    python -m urisc_jax.main --config=configs/isbi2012_unet_r50.py --workdir=runs/isbi2012_unet_r50 \
        --config.data.root=PATH/TO/isbi2012

PATH/TO/isbi2012 holds train-volume.tif and train-labels.tif, or train/images/NN.png and train/labels/NN.png.
Shared settings and how each number is computed: configs/isbi2012_common.py. Cost on 2 idle CPU cores: about 12 min
(1.6 s per step; measured: membrane F1 0.805, cell-interior F1 0.948, V_rand 0.955, V_info 0.974, pixel error 0.082).
"""

from configs import isbi2012_common


def get_config():
  config = isbi2012_common.get_config({"name": "unet", "encoder": "resnet50", "width": 0.5})
  config.train.num_steps = 400
  return config
