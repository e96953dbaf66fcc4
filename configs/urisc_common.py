"""What every U-RISC config shares: the release layout, the paper's patches, loss, optimizer and augmentations.

Not a run config itself: `urisc_track{1,2}_<model>.py` files call `get_config(model, track)` and say the command.

  - Data: the U-RISC release at --config.data.root (`imgs/<track>/...` with `label/<track>/...`, black = membrane).
    Track 1: 9958 x 9959 images at 2.18 nm/px, train / val / test folders (20 + 10 + 20; the val images choose the
    decision threshold and the best state). Track 2: 1024 x 1024 downsampled images (40 train + 30 test); its
    labels are gray after resizing, so they are re-binarized at gray <= 122 as the competitors did, and a seeded 10
    of the 40 training images (imgs/Track2/train) are held out as validation images; the test images lie in
    imgs/Track2/test.
  - As in the paper: 1024 x 1024 training patches (Track 2: 512, half its image side), 4 per device on 8 devices
    (global batch 32), focal + dice loss (gamma 2, lambda 1), Adam, flips / rotation / zoom / crop / translation /
    contrast / intensity augmentations, CEM500K input statistics.
  - Not stated by the paper, chosen here: learning rate 1e-3 with 500 warm-up steps and a cosine decay over
    20,000 steps (about 13 passes over the paper's 50,000 patches at batch 32), gradient clipping at norm 1,
    validation every 1,000 steps.
  - Prediction: 1024 px tiles in halo mode (128 px of context), 4-view flip TTA, threshold chosen on validation.
  - Hardware: sized for 8 accelerators (the paper's 8 GPUs); on fewer, lower --config.train.batch_size (it is
    global) or set --config.optim.accumulate_steps to keep 32 per update. On a CPU a Track 1 step at this size takes
    minutes (see README, Performance): use configs/default.py or an ISBI config there.
"""

from configs import default


def get_config(model: dict, track: str):
  if track not in ("Track1", "Track2"):
    raise ValueError(f"track must be 'Track1' or 'Track2', got {track!r}")
  config = default.get_config()
  config.model = config.model.__class__(model)
  config.model.dtype = "auto"  # bfloat16 on GPUs and TPUs, float32 on the CPU

  config.data.source = "urisc"
  config.data.root = ""  # required: the U-RISC release folder
  config.data.track = track
  config.data.crop_size = 1024 if track == "Track1" else 512
  if track == "Track2":
    config.data.label_threshold = 122
    config.data.train_split, config.data.val_split, config.data.test_split = "train", "", "test"
    config.data.split.mode = "images"
    config.data.split.val_fraction = 10 / 40

  config.train.num_steps = 20_000
  config.train.batch_size = 32
  config.train.log_every = 50
  config.train.checkpoint_every = 1_000
  config.train.eval_every = 1_000
  config.optim.name = "adam"
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 500
  config.optim.grad_clip_norm = 1.0

  config.predict.tile = 1024
  config.predict.halo = 128
  config.predict.tta = 4
  config.predict.batch_size = 4
  config.predict.threshold = None
  config.attribution.pixel_nm = 2.18 if track == "Track1" else 2.18 * 9958 / 1024
  config.data.pixel_nm = config.attribution.pixel_nm
  return config
