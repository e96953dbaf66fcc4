"""ISBI 2012, CASENet-ResNet152 (the U-RISC variant: deep stem, five side outputs) at 1/8 width on 128 px crops for the CPU: train on slices 00-19, score slices 20-29.

    python -m urisc_jax.main --config=configs/isbi2012_casenet_r152.py --workdir=runs/isbi2012_casenet_r152 \
        --config.data.root=PATH/TO/isbi2012

PATH/TO/isbi2012 holds train-volume.tif and train-labels.tif, or train/images/NN.png and train/labels/NN.png.
Shared settings and how each number is computed: configs/isbi2012_common.py. Cost on 2 idle CPU cores: about 4 min
(1.0 s per step; measured: membrane F1 0.673, cell-interior F1 0.897, V_rand 0.792, V_info 0.890, pixel error 0.156;
undertrained at this budget: raise width, crop_size and num_steps where time allows).
"""

from configs import isbi2012_common


def get_config():
  config = isbi2012_common.get_config({"name": "casenet", "encoder": "resnet152", "variant": "urisc", "width": 0.125})
  # Full-resolution stem and a dilated layer3 (36 blocks at 1/8 scale): the costliest model here, so smaller crops.
  config.data.crop_size = 128
  config.train.num_steps = 200
  return config
