"""U-RISC Track 2, U-Net-ResNet50 from random weights, the paper's settings (configs/urisc_common.py) for 8 accelerators.

    python -m urisc_jax.main --config=configs/urisc_track2_unet_r50.py --workdir=runs/urisc_track2_unet_r50 \
        --config.data.root=PATH/TO/U-RISC

PATH/TO/U-RISC holds the release's imgs/ and label/ folders. The paper reports Track 2 in its Table 3.
Cost: not measured (the U-RISC images are not bundled and take 8 accelerators at these settings); a 1024^2 step of
the model is timed on a CPU by `python -m benchmarks.train` (README, Performance).
"""

from configs import urisc_common


def get_config():
  return urisc_common.get_config({"name": "unet", "encoder": "resnet50", "width": 1.0}, "Track2")
