"""Default run: the whole U-RISC pipeline on synthetic EM that the package generates, on any machine.

    python -m urisc_jax.main --config=configs/default.py --workdir=runs/default

Generates a small U-RISC-like release (5 % membrane, mitochondria, vesicles, uneven illumination, noise) under
`workdir/data`, trains LinkNet-ResNet18 (the paper's LinkNet, at half width) on random 256 x 256 crops with focal +
dice loss and Adam, checkpoints, picks the decision threshold on the validation images, predicts the held-out test
images by sliding window and scores them with the official U-RISC F1 against a global-intensity-threshold baseline.
Cost: about 3 minutes on 2 idle CPU cores (188 s measured with an empty compilation cache, 180 s with a warm one;
7 min 20 s with other work running), test F1 0.948 vs baseline 0.516. Any value can be overridden, e.g. `--config.train.num_steps=100`.
`--mode=attribute` afterwards: about 1 target pixel per outcome and test image, a few minutes per target on a CPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Compiled programs are kept here, so a rerun or a resume loads them instead of compiling again (JAX's persistent
  # compilation cache; on a GPU also XLA's autotuning results). "default" = $URISC_JAX_CACHE, else
  # ~/.cache/urisc_jax/jax (JAX_COMPILATION_CACHE_DIR, if set, wins); a folder; or "" to compile every time.
  config.compilation_cache = "default"

  config.model = ml_collections.ConfigDict()
  config.model.name = "linknet"
  config.model.encoder = "resnet18"
  config.model.width = 0.5
  # Compute dtype: "auto" = bfloat16 on GPUs and TPUs, float32 on the CPU (where bfloat16 is slower); parameters,
  # BatchNorm statistics, loss and optimizer state are float32 whatever it is. Or "float32" / "bfloat16".
  config.model.dtype = "auto"

  # The paper's U-Net-transfer: start the encoder from a PyTorch ResNet checkpoint, e.g. CEM500K MoCoV2
  # (cem500k_mocov2_resnet50_200ep.pth.tar) with model.name="unet", model.encoder="resnet50", model.width=1.0.
  # Its stored `norms` then set the input normalization.
  config.transfer = ml_collections.ConfigDict()
  config.transfer.checkpoint = ""
  config.transfer.required = False  # True: refuse to train without a checkpoint (configs/urisc_track1_unet_transfer.py)

  config.data = ml_collections.ConfigDict()
  # "synthetic" | "urisc" (a release folder at data.root) | "isbi" (ISBI 2012 stacks or slices at data.root) |
  # "folders" (data.folders) | "tfds" (a TFDS builder, built from data.root) | "tensorstore" (chunked volumes,
  # data.tensorstore); see urisc_jax/data/dataset.py.
  config.data.source = "synthetic"
  config.data.root = ""  # "" = workdir/data for synthetic data
  config.data.track = "Track1"
  # What each split reads: a folder of the release, a key of data.isbi / data.folders, or a TFDS split string
  # ("train[:20]"); "" = no such split (no validation: threshold 0.5, or split.mode="images").
  config.data.train_split = "train"
  config.data.val_split = "val"
  config.data.test_split = "test"
  # source="isbi": slices per split, "0-19" (ends included), "0,2,5-9", "" = none, "test:0-29" = the unlabelled
  # test volume. ISBI 2012 released labels for its 30 training slices only, so the test split scores held-out ones.
  config.data.isbi = ml_collections.ConfigDict()
  config.data.isbi.train = "0-19"
  config.data.isbi.val = ""
  config.data.isbi.test = "20-29"
  # source="folders": image and label folders per split, paired by file stem ("" labels = unlabelled).
  config.data.folders = ml_collections.ConfigDict()
  for split in ("train", "val", "test"):
    config.data.folders[f"{split}_images"] = ""
    config.data.folders[f"{split}_labels"] = ""
  # source="tfds": "urisc/track1" | "urisc/track2" | "isbi2012"; data_dir "" = workdir/tfds.
  # source "tensorstore": per split, an image volume and its label volume (a zarr / N5 / precomputed path, a file://
  # URL or a TensorStore JSON spec; a 3-D volume's sections are the split's images), read crop by crop.
  config.data.tensorstore = ml_collections.ConfigDict()
  for split in ("train", "val", "test"):
    config.data.tensorstore[split] = ml_collections.ConfigDict({"image": "", "label": ""})
  config.data.tfds = ml_collections.ConfigDict()
  config.data.tfds.name = "isbi2012"
  config.data.tfds.data_dir = ""
  config.data.membrane = "black"  # label polarity: which gray value marks membrane
  config.data.label_threshold = ml_collections.config_dict.placeholder(int)  # e.g. 122 for Track 2 labels
  config.data.cache_dir = ""  # "" = workdir/cache
  # Largest image (width x height) any reader decodes: 2^28 = 268 Mpix takes U-RISC's 99 Mpix and refuses
  # decompression bombs; raise it for genuine larger images (a 30k x 30k section needs 9e8).
  config.data.max_image_pixels = 2**28
  # Pixel size of the training data in nm (U-RISC 2.18, ISBI 2012 4; None = unknown): --mode=predict resamples
  # inputs of another pixel size to it (config.predict.match_resolution).
  config.data.pixel_nm = ml_collections.config_dict.placeholder(float)
  config.data.pixel_nm = 2.18  # the synthetic U-RISC-like images
  config.data.crop_size = 256
  config.data.num_workers = 0
  # The paper's eight augmentations (flips, rotation, zoom, crop, translation, contrast, intensity jitter) plus the
  # noise-shape cutout U-RISC competitors used; each *_p is the chance per crop (0 = off). See data/augment.py.
  config.data.augment = ml_collections.ConfigDict()
  config.data.augment.flip_p = 0.5
  config.data.augment.rot90 = True
  config.data.augment.rotate_p = 0.5
  config.data.augment.rotate_degrees = 45.0
  config.data.augment.zoom_p = 0.3
  config.data.augment.zoom_range = (0.8, 1.25)
  config.data.augment.crop_p = 0.3
  config.data.augment.crop_area = (0.5, 1.0)
  config.data.augment.crop_aspect = (0.75, 4 / 3)
  config.data.augment.translate_p = 0.3
  config.data.augment.translate_fraction = 0.125
  config.data.augment.contrast_p = 0.5
  config.data.augment.contrast_range = (0.75, 1.33)
  config.data.augment.brightness_p = 0.5
  config.data.augment.brightness_range = 0.1
  config.data.augment.gamma_p = 0.3
  config.data.augment.gamma_range = (0.75, 1.33)
  config.data.augment.cutout_p = 0.2
  config.data.augment.cutout_area = (0.02, 0.1)
  config.data.augment.cutout_blob = 0.125
  config.data.augment.threads = 1  # threads warping each crop (same crops): 2-4 with num_workers=0 and idle cores
  # "folders": train on the train split (validation = the val split, whole images, no leakage).
  # "images": for data without a validation split (its val split must name nothing): hold out val_fraction of the
  # training images, chosen by split.seed, as validation images.
  # "patch": the paper's split of the training images' overlapping crop_size grid (stride 0 = crop_size / 2) into
  # disjoint train and validation patches (num_* = 0: all / val_fraction); e.g. 1024 px, stride 190, 50000 / 20000.
  config.data.split = ml_collections.ConfigDict()
  config.data.split.mode = "folders"
  config.data.split.seed = 0  # mode "images"
  config.data.split.stride = 0
  config.data.split.num_train = 0
  config.data.split.num_val = 0
  config.data.split.val_fraction = 2 / 7
  # Input normalization of gray in [0, 1]; CEM500K's statistics, which its pretrained encoders expect.
  config.data.mean = 0.57287007
  config.data.std = 0.12740536

  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.preset = "urisc"
  config.data.synthetic.height = 1024
  config.data.synthetic.width = 1024
  config.data.synthetic.num_train = 6
  config.data.synthetic.num_val = 2
  config.data.synthetic.num_test = 3
  config.data.synthetic.seed = 2022

  # name: "focal_dice" (paper) | "focal" | "dice" | "bce" | "balanced_bce" (CASENet) | "soft_f1"; options that the
  # chosen loss does not take are ignored. deep_supervision: also supervise CASENet's side outputs.
  config.loss = ml_collections.ConfigDict()
  config.loss.name = "focal_dice"
  config.loss.gamma = 2.0
  config.loss.dice_weight = 1.0
  config.loss.alpha = ml_collections.config_dict.placeholder(float)  # focal's membrane weight, e.g. 0.25 or 0.7
  config.loss.deep_supervision = False

  # See urisc_jax/optim.py. name: "adam" (paper) | "adamw" | "sgd"; schedule: "constant" | "cosine" | "poly" |
  # "one_cycle", each with a linear warm-up. num_steps counts train steps; with accumulate_steps = k the optimizer
  # updates every k steps on the mean gradient (an effective batch of k * train.batch_size).
  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adam"
  config.optim.learning_rate = 2e-3
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 50
  config.optim.end_lr_factor = 0.05
  config.optim.weight_decay = 1e-4
  config.optim.grad_clip_norm = 1.0
  config.optim.momentum = 0.9  # sgd only
  config.optim.poly_power = 0.9
  config.optim.one_cycle_pct_start = 0.3
  config.optim.one_cycle_div_factor = 25.0
  config.optim.encoder_lr_multiplier = 1.0  # e.g. 0.1: a pretrained encoder learns 10x slower than decoder and head
  config.optim.accumulate_steps = 1

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 400
  config.train.batch_size = 8  # global, over all devices and hosts
  # > 0: the global batch is this many crops per device times the job's device count (train.batch_size is then
  # replaced), so that one setting starts a job of any size; the multi-host launchers set it. 0 = batch_size.
  config.train.batch_size_per_device = 0
  config.train.log_every = 25
  config.train.checkpoint_every = 200
  config.train.keep_checkpoints = 2
  # Official F1 on the validation images (threshold chosen on them) every eval_every steps and at the end, logged as
  # val_f1; the best-scoring state is kept in workdir/checkpoints_best. 0 = only after training.
  config.train.eval_every = 200

  # Each host/device count must divide the batch (train.batch_size_per_device always does): ("data", -1) takes
  # every device.
  config.mesh = (("data", -1),)

  config.predict = ml_collections.ConfigDict()
  config.predict.tile = 512
  config.predict.step = 0.5
  config.predict.blend = "gaussian"
  # Halo mode: tiles overlap by 2 * halo px and each pixel comes from the tile whose centre is nearest, so a pixel
  # is computed 1.5-2 times instead of 2-4 times at step 0.5; None = blended tiles (step, blend). The tile grows to
  # at least 4 x halo and by up to half to fit the image (inference.halo_tile). 112 px is where this model's logits
  # stop feeling a tile border (< 0.05 logit); its F1 is within 1e-4 of step 0.5 (benchmarks/predict.py
  # --parts=quality --quality-model=linknet --quality-width=0.5 --tile=512 --train-steps=400).
  config.predict.halo = 112
  config.predict.tta = 1
  config.predict.batch_size = 2  # tiles per forward call, over all devices and hosts
  # > 0: tiles per device per call (predict.batch_size becomes this times the device count, and a process predicting
  # alone, as in multi-host validation, uses this times its own devices). 0 = batch_size.
  config.predict.batch_size_per_device = 0
  config.predict.threshold = ml_collections.config_dict.placeholder(float)  # None = choose on validation images
  # Clean-up of the thresholded mask (urisc_jax/postprocess.py), also applied when the threshold is chosen; in
  # pixels, 0 = off: closing with a disk of this radius, then removal of 8-connected membrane specks smaller than
  # min_membrane_size, then filling of 4-connected background holes smaller than fill_holes_below.
  config.predict.postprocess = ml_collections.ConfigDict()
  config.predict.postprocess.min_membrane_size = 0
  config.predict.postprocess.fill_holes_below = 0
  config.predict.postprocess.closing_radius = 0
  config.predict.input = ""  # --mode=predict: an image file or folder
  # --mode=predict: resample an input whose pixel size differs from config.data.pixel_nm to it, and the probability
  # map back (anti-aliased). The input's pixel size: input_pixel_nm, or None = what the file records (TIFF
  # resolution tags, ImageJ metadata, OME-Zarr), else the training data's (no resampling).
  config.predict.match_resolution = True
  config.predict.input_pixel_nm = ml_collections.config_dict.placeholder(float)
  # --mode=predict on a folder: "stop" at the first image that cannot be read or written (naming it), or "skip" it
  # and go on; skipped images are listed in <output>/prediction_errors.json.
  config.predict.on_error = "stop"
  config.predict.output = ""  # --mode=predict: "" = workdir/predictions (a volume: workdir/predictions.zarr)
  # --mode=predict on a chunked volume (predict.input = PATH.zarr, PATH.n5, a precomputed folder or a TensorStore
  # JSON spec; a 3-D input's first axis is the section): blocks of block x block px of each section, aligned to the
  # output's chunk x chunk chunks, written to the OME-Zarr predict.output with `levels` pyramid levels; the
  # probability as uint8 (p x 255) or float16 (urisc_jax/volumes.py, blockwise.py, volume_predict.py).
  config.predict.volume = ml_collections.ConfigDict()
  config.predict.volume.block = 4096
  config.predict.volume.chunk = 512
  config.predict.volume.levels = 3
  config.predict.volume.dtype = "uint8"
  # Refuse volumes of more blocks (sections x blocks per section) than this: a declared shape costs nothing on disk
  # ([1e8, 64, 64] in a sparse zarr is 8 KB) but one Dask task and one marker per block.
  config.predict.volume.max_blocks = 1_000_000
  # Seconds opening a volume may wait for its storage (an http:// or gs:// server) before giving up with a message.
  config.predict.volume.open_timeout_s = 60.0
  # Blocks are Dask tasks: address "" = a LocalCluster of `workers` processes (0 = one per accelerator, or 2 on the
  # CPU), else a running scheduler's address, e.g. "tcp://10.0.0.5:8786" (launch/dask_slurm.py starts one on SLURM).
  # A block that raises is retried `retries` times; a lost worker's blocks go to another worker.
  config.predict.dask = ml_collections.ConfigDict()
  config.predict.dask.address = ""
  config.predict.dask.workers = 0
  config.predict.dask.retries = 2
  # Seconds to wait for the scheduler at `address` to answer (connect, handshake, first request) before giving up.
  config.predict.dask.timeout_s = 30.0

  config.eval = ml_collections.ConfigDict()
  # "official" (GT as released, like eval.py; a thresholded Track-2 label is re-read from the release) or "binarized"
  # (GT <= 122, the competition); metrics.json records "official" or "binarized@122".
  config.eval.gt_mode = "official"
  # Also score the test images by class (membrane and cell-interior F1 by the official formula, no format check),
  # pixel error, V_rand and V_info (evaluation/two_class.py): for ISBI-like data that the official scorer refuses.
  config.eval.two_class = False
  config.eval.pred_dir = ""  # --mode=evaluate
  config.eval.gt_dir = ""  # --mode=evaluate
  config.eval.prob_dir = ""  # --mode=evaluate, optional: probability maps for ISBI V_rand / V_info
  # --mode=evaluate: True stops at the first submission the official format check rejects; False scores it 0 (as
  # the competition did) and names the reason in the report.
  config.eval.strict = False

  # --mode=criteria: image definition criteria of originals vs downsampled versions (Track 1 -> Track 2).
  config.criteria = ml_collections.ConfigDict()
  config.criteria.input = ""  # an image or folder; "" = the test split of config.data
  config.criteria.scale = 1024 / 9958  # Track 2's size relative to Track 1
  config.criteria.methods = ("area", "bilinear", "bicubic", "lanczos")

  # --mode=export: the trained model in a format other tools open (README, "Use a trained model elsewhere").
  # format: "onnx" (onnxruntime, ilastik, Fiji) | "torch" (a PyTorch state dict: .safetensors, or .pt / .pth in
  # torch.save's format; segmentation_models_pytorch names for U-Net and LinkNet) | "bioimageio" (a bioimage.io model
  # package: a folder, or a .zip) | "stablehlo" (a serialized jax.export module for JAX serving).
  config.export = ml_collections.ConfigDict()
  config.export.format = "onnx"
  config.export.output = ""  # "" = workdir/export/model.<onnx|safetensors|stablehlo> or workdir/export/bioimageio
  config.export.checkpoint = "best"  # "best" (workdir/checkpoints_best, else the latest) | "latest" | a folder
  config.export.sigmoid = False  # onnx / stablehlo: output probabilities instead of logits
  # bioimageio: the image its test tensors and cover are cut from ("" = the first image of config.data's test
  # split), and the size of that square crop (a multiple of the model's input multiple).
  config.export.sample = ""
  config.export.sample_size = 256

  # --mode=attribute: integrated gradients of the logits of sampled pixels of the trained model, by outcome, and
  # their attribution fields S_k (see urisc_jax/attribution/): workdir/attribution/{stats,targets}.json + figures.
  config.attribution = ml_collections.ConfigDict()
  config.attribution.split = "test"  # "train" | "val" | "test": the images of config.data.<split>_split
  # Target pixels per outcome (true positive, false positive, false negative) and image. Each costs about 0.7 s per
  # gradient evaluation with this config's model on 2 busy CPU cores; at the default tolerance a target took 32-264
  # evaluations (ISBI U-Net, 9 targets): raise it on an accelerator.
  config.attribution.num_targets = 1
  config.attribution.border = 0  # targets are drawn at least this many pixels from the image border
  # Quadrature of the path integral (attribution/path_integral.py): the path is cut into steps // nodes_per_interval
  # intervals, each integrated by `rule`: "gauss_legendre" (exact for polynomials of degree <= 2 nodes - 1) |
  # "riemann_right" (the paper's, with 100 steps; composite = plain) | "riemann_left" | "riemann_middle" |
  # "trapezoid". Where a target's completeness gap |sum(IG) - (F(x) - F(x'))| exceeds tolerance x
  # max(|F(x) - F(x')|, 1), the intervals with the largest local gaps are halved until it holds or the target's
  # partition has max_nodes nodes (targets.json records each target's nodes and gap; tolerance None = one pass).
  config.attribution.rule = "gauss_legendre"
  config.attribution.steps = 32
  config.attribution.nodes_per_interval = 4
  config.attribution.tolerance = ml_collections.config_dict.placeholder(float)
  config.attribution.tolerance = 0.01
  config.attribution.max_nodes = 512
  # "zeros" (zeros after normalization, the paper's) | "black" (gray 0) | "blurred" (Gaussian, blur_sigma px) | "noise"
  config.attribution.baseline = "zeros"
  config.attribution.blur_sigma = 10.0
  # Interpolation points per forward/backward pass and targets sharing it: memory grows with their product.
  config.attribution.chunk_size = 8  # U-Net-ResNet50 on ~700 px crops needs ~0.5 GiB per point and target
  config.attribution.targets_per_pass = 4
  # "receptive_field": attribute over a window around each target that holds the model's whole receptive field
  # (measured; same result as the whole image, far cheaper on large images) | "none": the whole image.
  config.attribution.crop = "receptive_field"
  config.attribution.pixel_nm = 2.18  # pixel size h for S_k = count(w > k) * h^2: U-RISC 2.18 nm, ISBI 2012 4 nm
  # "native": S_k at the images' own resolution, targets anywhere. "paper": as the paper's code did, every image (and
  # label) resized to paper_size x paper_size before prediction and attribution, targets drawn from a paper_grid px
  # grid, and h scaled to the resized pixels (U-RISC 9958 px -> 512 px: 42.4 nm).
  config.attribution.protocol = "native"
  config.attribution.paper_size = 512
  config.attribution.paper_grid = 10
  config.attribution.k_grid = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # levels k of normalized attribution
  config.attribution.seed = 0  # target sampling and the "noise" baseline
  return config
