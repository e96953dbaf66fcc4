"""ISBI 2012, LinkNet-ResNet18 (the paper's LinkNet) at full width: train on slices 00-19, score slices 20-29.

    python -m urisc_jax.main --config=configs/isbi2012_linknet_r18.py --workdir=runs/isbi2012_linknet_r18 \
        --config.data.root=PATH/TO/isbi2012

PATH/TO/isbi2012 holds train-volume.tif and train-labels.tif, or train/images/NN.png and train/labels/NN.png.
Shared settings and how each number is computed: configs/isbi2012_common.py. Cost on 2 idle CPU cores: about 17 min
(2.4 s per step; measured: membrane F1 0.802, cell-interior F1 0.947, V_rand 0.947, V_info 0.966, pixel error 0.084).
"""

from configs import isbi2012_common


def get_config():
  config = isbi2012_common.get_config({"name": "linknet", "encoder": "resnet18", "width": 1.0})
  config.train.num_steps = 400
  return config
