"""What every ISBI 2012 config shares: the paper's 20 / 10 split of the 30 labelled slices, its loss and optimizer.

Not a run config itself: `isbi2012_<model>.py` files call `get_config(model)` and say the command and cost.

  - Data: ISBI 2012 training volume (512 x 512 slices, 4 nm/px, ~22 % membrane) at --config.data.root, either the
    challenge's train-volume.tif / train-labels.tif or per-slice train/images/NN.png + train/labels/NN.png folders.
    Train on slices 00-19, test on 20-29 (the paper's split; the challenge's own test labels were never released).
    There is no validation split, so the threshold is fixed at 0.5 and no best-by-validation state is kept.
  - Scoring: the official U-RISC scorer refuses ISBI predictions (its rule of at least 5 background pixels per
    membrane pixel fails at 22 % membrane), so metrics.json's "two_class" block reports the official F1 formula for
    the membrane class and for the cell-interior class, the pixel error, and the ISBI V_rand / V_info (Fiji
    protocol, best over thresholds); see urisc_jax/evaluation/two_class.py. The test images are whole 512 x 512
    slices, predicted as one tile each.
  - Training: the paper's focal + dice (gamma 2, lambda 1), Adam, its flips / rotation / zoom / crop / translation /
    contrast / intensity augmentations; random crops of 256 px (the paper used 1024 px patches of far larger images).
    Step counts and widths are scaled so that each model trains on 2 CPU cores in one sitting; each file says how.
"""

from configs import default


def get_config(model: dict):
  config = default.get_config()
  config.model = config.model.__class__(model)
  config.model.dtype = "auto"  # bfloat16 on GPUs and TPUs, float32 on the CPU

  config.data.source = "isbi"
  config.data.root = ""  # required: the ISBI 2012 folder
  config.data.train_split, config.data.val_split, config.data.test_split = "train", "val", "test"
  config.data.isbi.train = "0-19"
  config.data.isbi.val = ""
  config.data.isbi.test = "20-29"
  config.data.crop_size = 256
  # ISBI 2012's own intensity statistics (slices 00-19), not CEM500K's: no pretrained encoder here.
  config.data.mean = 0.4865
  config.data.std = 0.1665

  config.train.batch_size = 8
  config.train.log_every = 25
  config.train.eval_every = 0  # no validation split
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 50

  config.predict.tile = 512
  config.predict.batch_size = 1
  config.predict.threshold = 0.5
  config.eval.gt_mode = "binarized"
  config.eval.two_class = True
  config.attribution.pixel_nm = 4.0
  config.data.pixel_nm = 4.0
  return config
