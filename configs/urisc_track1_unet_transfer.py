"""U-RISC Track 1, U-Net-transfer: U-Net-ResNet50 whose encoder starts from CEM500K MoCoV2 weights (the paper's best).

    python -m urisc_jax.main --config=configs/urisc_track1_unet_transfer.py --workdir=runs/urisc_track1_unet_transfer \
        --config.data.root=PATH/TO/U-RISC \
        --config.transfer.checkpoint=PATH/TO/cem500k_mocov2_resnet50_200ep.pth.tar

The checkpoint (Zenodo record 6453140) is required: the run stops before training if it is not given. Its encoder_q
weights load into the encoder (the projection head is dropped; tensors are rebuilt without running pickled code) and
its stored norms set the input normalization. Otherwise the paper's settings (configs/urisc_common.py); chosen
here, not stated by the paper: the pretrained encoder learns at 0.1x the decoder's rate.
Paper (U-RISC Track 1): U-Net-transfer 0.6659 F1, against 0.6070 for the competition's leader.
Cost: not measured (the U-RISC images are not bundled and take 8 accelerators at these settings).
"""

from configs import urisc_common


def get_config():
  config = urisc_common.get_config({"name": "unet", "encoder": "resnet50", "width": 1.0}, "Track1")
  config.transfer.required = True
  config.optim.encoder_lr_multiplier = 0.1
  return config
