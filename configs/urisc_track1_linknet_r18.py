"""U-RISC Track 1, LinkNet-ResNet18, the paper's settings (configs/urisc_common.py) for 8 accelerators.

    python -m urisc_jax.main --config=configs/urisc_track1_linknet_r18.py --workdir=runs/urisc_track1_linknet_r18 \
        --config.data.root=PATH/TO/U-RISC

PATH/TO/U-RISC holds the release's imgs/ and label/ folders. Paper (U-RISC Track 1): LinkNet and CASENet up to 0.61 F1.
Cost: not measured (the U-RISC images are not bundled and take 8 accelerators at these settings); a 1024^2 step of
the model is timed on a CPU by `python -m benchmarks.train` (README, Performance).
"""

from configs import urisc_common


def get_config():
  return urisc_common.get_config({"name": "linknet", "encoder": "resnet18", "width": 1.0}, "Track1")
