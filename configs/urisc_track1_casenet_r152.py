"""U-RISC Track 1, CASENet-ResNet152 (deep stem, five side outputs, as the U-RISC code builds it), the paper's settings (configs/urisc_common.py) for 8 accelerators.

    python -m urisc_jax.main --config=configs/urisc_track1_casenet_r152.py --workdir=runs/urisc_track1_casenet_r152 \
        --config.data.root=PATH/TO/U-RISC

PATH/TO/U-RISC holds the release's imgs/ and label/ folders. Paper (U-RISC Track 1): LinkNet and CASENet up to 0.61 F1.
Cost: not measured (the U-RISC images are not bundled and take 8 accelerators at these settings); a 1024^2 step of
the model is timed on a CPU by `python -m benchmarks.train` (README, Performance).
"""

from configs import urisc_common


def get_config():
  return urisc_common.get_config({"name": "casenet", "encoder": "resnet152", "variant": "urisc", "width": 1.0}, "Track1")
