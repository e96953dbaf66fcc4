"""Whole-image prediction: speed of U-Net-ResNet50 by sliding window, peak memory at U-RISC size and beyond.

  python -m benchmarks.predict                  # rate + rss: about 10 min on 2 idle CPU cores, 20 on busy ones
  python -m benchmarks.predict --quick          # small images: about 2.5 minutes on 2 busy CPU cores
  python -m benchmarks.predict --parts=rate --repeats=3 --peer-command="PEER_PYTHON smp_bench.py window ..."
  python -m benchmarks.predict --parts=quality  # halo mode vs step 0.5 on a briefly trained narrow U-Net
  python -m benchmarks.predict --parts=tta      # compile and run time of 1, 2, 4, 8 test-time views: about 1 minute
  # halo mode vs step 0.5 for the default config's model and tile (LinkNet-ResNet18 at width 1/2, 512 px):
  python -m benchmarks.predict --parts=quality --quality-model=linknet --quality-width=0.5 --tile=512 --train-steps=400

Parts (one JSON object per line on stdout, progress on stderr):
  rate     U-Net-ResNet50 (random weights: speed does not depend on them) predicts a random --height x --width
           image in tiles of --tile px, --batch-size tiles per call, no TTA: logits, then the probability map,
           timed from the first tile to the probability map as the PyTorch peer's `smp_bench.py window` times
           itself; the one-off JIT compile is reported apart (`compile_s`). Modes: `step0.5` (Gaussian blending at
           --step) and `halo128` (--halo) at the tile `inference.halo_tile` fits to the image (--halo-tiles
           to choose others). With --peer-command, the peer runs after each round of ours (alternating, as the
           machines are shared), and medians and speed ratios close the output.
  rss      Peak resident memory (VmHWM) of one whole prediction per fresh process, per --rss-runs entry
           `HxW:source:mode:model`: source `memory` (image, logits and probabilities in RAM, as predict.py works)
           or `disk` (a .npy image memory-mapped in, logits memory-mapped out); model `narrow` (U-Net-ResNet18 at
           width 1/8: a stand-in whose buffers, not weights, are measured) or `normalize_only` (no network: the
           tiling's own buffers, for runs whose network time would not fit the budget).
  quality  Trains a narrow ResNet18 U-Net (or LinkNet: --quality-model) for --train-steps on synthetic U-RISC-like
           crops, measures how far tile borders reach into its logits on --tile tiles
           (`inference.border_error_profile`), and compares halo-mode predictions of a held-out synthetic image
           with the step-0.5 Gaussian result at --tile: official F1 against the labels, agreement of the
           thresholded maps, largest probability difference, and speed-up. The halo the border profile asks for
           (--halo-tolerance) and --halo are tried at --tile and at the tile `inference.halo_tile` fits; the last
           record, `recommended_halo`, is the smallest of them whose F1 stays within --f1-tolerance of step 0.5.
  tta      Compile time and median run time of the narrow U-Net's tile forward with 1, 2, 4 and 8 test-time views
           (--batch-size tiles of --tta-tile px; the views of a batch go through the network as one batch).
"""

import argparse
import dataclasses
import json
import pathlib
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from benchmarks.json_lines import emit, log, run_and_collect

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NARROW = dict(encoder="resnet18", width=0.125)
MODELS = {"unet_resnet50": dict(encoder="resnet50", width=1.0), "narrow": NARROW}


@dataclasses.dataclass(frozen=True)
class Run:
  """One measurement, executed by a fresh worker process."""
  model: str
  height: int
  width: int
  tile: int
  mode: str  # "step" or "halo"
  step: float = 0.5
  blend: str = "gaussian"
  halo: int = 128
  batch_size: int = 2
  source: str = "memory"  # or "disk"

  def mode_name(self) -> str:
    if self.mode == "halo":
      return f"halo{self.halo}"
    return f"step{self.step:g}" + ("" if self.blend == "gaussian" else f"_{self.blend}")


def display_name(model: str) -> str:
  return f"unet_{NARROW['encoder']}_w{NARROW['width']:g}" if model == "narrow" else model


def peak_rss_gib() -> float:
  """Peak resident memory of this process image in GiB.

  Linux's VmHWM starts afresh at exec, whereas ru_maxrss also keeps the parent's resident size at fork (a worker
  started by a driver that had just written a big image would inherit that).
  """
  try:
    status = pathlib.Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kib / 2**20
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------------------------------------- worker


def _tile_forward(model_name: str):
  """(forward, batch compile probe) for a model name: a jitted uint8 [B, T, T, 1] -> float32 [B, T, T]."""
  import jax  # pylint: disable=g-import-not-at-top
  from urisc_jax import inference, models  # pylint: disable=g-import-not-at-top
  from urisc_jax.data import normalize  # pylint: disable=g-import-not-at-top

  if model_name == "normalize_only":
    return jax.jit(lambda tiles: normalize.normalize(tiles)[..., 0])
  model = models.build("unet", in_channels=1, num_classes=1, **MODELS[model_name])
  variables = models.init_variables(model, (1, 64, 64, 1))
  return inference.make_tile_forward(model, variables, mean=normalize.CEM500K_MEAN, std=normalize.CEM500K_STD)


def _write_random_image(path: pathlib.Path, height: int, width: int, rows_per_chunk: int = 256) -> None:
  """A random uint8 .npy image written in chunks, so that even 30000 x 30000 needs little memory."""
  image = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(height, width))
  rng = np.random.default_rng(0)
  for top in range(0, height, rows_per_chunk):
    rows = min(rows_per_chunk, height - top)
    image[top:top + rows] = rng.integers(0, 256, (rows, width), dtype=np.uint8)
  image.flush()


def _image_path(workdir: pathlib.Path, run: Run) -> pathlib.Path:
  return workdir / f"image_{run.height}x{run.width}.npy"


def measure(run: Run, workdir: pathlib.Path) -> None:
  """Predicts one image as `run` says and prints its speed and peak-memory records."""
  import jax  # pylint: disable=g-import-not-at-top
  from urisc_jax import inference  # pylint: disable=g-import-not-at-top

  forward = _tile_forward(run.model)
  if run.source == "disk":
    image = np.load(_image_path(workdir, run), mmap_mode="r")
    out = np.lib.format.open_memmap(workdir / "logits.npy", mode="w+", dtype=np.float32, shape=image.shape)
  else:
    image = np.random.default_rng(0).integers(0, 256, (run.height, run.width), dtype=np.uint8)
    out = None
  start = time.perf_counter()
  jax.block_until_ready(forward(np.zeros((run.batch_size, run.tile, run.tile, 1), np.uint8)))
  compile_s = time.perf_counter() - start
  options = dict(halo=run.halo) if run.mode == "halo" else dict(step=run.step, blend=run.blend)
  grid = inference.tile_grid((max(run.height, run.tile), max(run.width, run.tile)), run.tile,
                             **(dict(halo=run.halo) if run.mode == "halo" else dict(step=run.step)))
  start = time.perf_counter()
  logits = inference.predict_logits(forward, image, tile=run.tile, batch_size=run.batch_size, out=out, **options)
  if out is None:
    probability = inference.probabilities(logits)
    assert np.isfinite(probability).all()
  seconds = time.perf_counter() - start
  common = dict(model=display_name(run.model), mode=run.mode_name(),
                height=run.height, width=run.width, tile=run.tile, batch_size=run.batch_size, tiles=grid.num_tiles,
                source=run.source, framework="jax")
  emit({"bench": "predict", **common, "metric": "mpix_per_s", "value": run.height * run.width / seconds / 1e6,
        "unit": "Mpix/s", "seconds": seconds, "compile_s": compile_s, "devices": jax.device_count()})
  emit({"bench": "predict_rss", **common, "metric": "peak_rss", "value": peak_rss_gib(), "unit": "GiB"})


# ----------------------------------------------------------------------------------------------------------- driver


def run_worker(run: Run, tmp: pathlib.Path) -> list[dict]:
  """Runs `measure` in a fresh process (so that its peak RSS is its own) and passes its records through."""
  workdir = tmp / "work"
  workdir.mkdir(exist_ok=True)
  if run.source == "disk" and not _image_path(workdir, run).exists():
    log(f"writing a random {run.height} x {run.width} image to disk")
    _write_random_image(_image_path(workdir, run), run.height, run.width)
  log(f"measuring {run}")
  command = [sys.executable, "-m", "benchmarks.predict", "--worker", json.dumps(dataclasses.asdict(run)),
             "--tmpdir", str(workdir)]
  records = run_and_collect(command, what=f"the measurement {run}", cwd=REPO_ROOT)
  (workdir / "logits.npy").unlink(missing_ok=True)
  return records


def run_peer(command: str) -> float:
  """Runs the peer's window benchmark; returns its Mpix/s."""
  log(f"measuring the peer: {command}")
  records = run_and_collect(shlex.split(command), what=f"the peer command {command!r}")
  return next(r["value"] for r in records if r["metric"] == "mpix_per_s")


def rate_runs(args) -> list[Run]:
  from urisc_jax import inference  # pylint: disable=g-import-not-at-top
  shape = (args.height, args.width)
  common = dict(model=args.model, height=args.height, width=args.width, batch_size=args.batch_size)
  runs = [Run(tile=args.tile, mode="step", step=args.step, blend=args.blend, **common)]
  for tile in args.halo_tiles.split(","):
    tile = int(tile) or inference.halo_tile(shape, args.tile, args.halo)
    runs.append(Run(tile=tile, mode="halo", halo=args.halo, **common))
  return runs


def rss_runs(args) -> list[Run]:
  from urisc_jax import inference  # pylint: disable=g-import-not-at-top
  runs = []
  for entry in args.rss_runs.split(","):
    size, source, mode, model = entry.split(":")
    height, width = (int(v) for v in size.split("x"))
    tile = args.tile if mode == "step" else inference.halo_tile((height, width), args.tile, args.halo)
    runs.append(Run(model=model, height=height, width=width, tile=tile, mode=mode, step=args.step, blend=args.blend,
                    halo=args.halo, batch_size=args.batch_size, source=source))
  return runs


def benchmark_rate(args, tmp: pathlib.Path) -> None:
  runs = rate_runs(args)
  rates = {(run.mode_name(), run.tile): [] for run in runs}
  peer = []
  for _ in range(args.repeats):
    for run in runs:
      record = next(r for r in run_worker(run, tmp) if r["metric"] == "mpix_per_s")
      rates[(run.mode_name(), run.tile)].append(record["value"])
    if args.peer_command:
      peer.append(run_peer(args.peer_command))
  if args.repeats == 1 and not peer:
    return
  params = dict(model=display_name(args.model), height=args.height, width=args.width, repeats=args.repeats)
  for (mode, tile), values in rates.items():
    emit({"bench": "predict", **params, "mode": mode, "tile": tile, "metric": "mpix_per_s_median",
          "value": statistics.median(values), "unit": "Mpix/s", "values": values})
    if peer:
      emit({"bench": "predict_vs_peer", **params, "mode": mode, "tile": tile, "metric": "speedup",
            "value": statistics.median(values) / statistics.median(peer), "unit": "x",
            "peer_mpix_per_s_median": statistics.median(peer), "peer_values": peer})


def benchmark_rss(args, tmp: pathlib.Path) -> None:
  for run in rss_runs(args):
    run_worker(run, tmp)


# ---------------------------------------------------------------------------------------------------------- quality


def _train_briefly(model, steps: int, *, crop: int = 256, batch: int = 8, seed: int = 0):
  """Variables of `model` after `steps` Adam steps of focal + dice loss on synthetic U-RISC-like crops."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from urisc_jax import losses, models  # pylint: disable=g-import-not-at-top
  from urisc_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from urisc_jax.data.normalize import normalize  # pylint: disable=g-import-not-at-top

  rendered = [synthetic.render(synthetic.urisc_like(1024, 1024), seed=s) for s in range(4)]
  images = np.stack([image for image, _ in rendered])
  membrane = np.stack([label == synthetic.MEMBRANE for _, label in rendered])
  variables = models.init_variables(model, (1, crop, crop, 1), seed=seed)
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))

  @jax.jit
  def train_step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, normalize(x), train=True,
                                    mutable=["batch_stats"])
      return losses.focal_dice(logits, y), updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  for i in range(steps):
    k = rng.integers(0, len(images), batch)
    r, c = rng.integers(0, 1024 - crop, (2, batch))
    x = np.stack([images[a, b:b + crop, d:d + crop] for a, b, d in zip(k, r, c)])[..., None]
    y = np.stack([membrane[a, b:b + crop, d:d + crop] for a, b, d in zip(k, r, c)])[..., None]
    params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state, x, y)
    if i % 50 == 0 or i == steps - 1:
      log(f"train step {i}: loss {float(loss):.3f}")
  return {"params": params, "batch_stats": batch_stats}


def benchmark_quality(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from urisc_jax import inference, models  # pylint: disable=g-import-not-at-top
  from urisc_jax.data import normalize, synthetic  # pylint: disable=g-import-not-at-top
  from urisc_jax.evaluation import f1 as official  # pylint: disable=g-import-not-at-top

  width = args.quality_width
  model = models.build(args.quality_model, encoder="resnet18", in_channels=1, num_classes=1, width=width)
  variables = _train_briefly(model, args.train_steps)
  forward = inference.make_tile_forward(model, variables, mean=normalize.CEM500K_MEAN, std=normalize.CEM500K_STD)
  size = args.quality_size
  image, label = synthetic.render(synthetic.urisc_like(size, size), seed=1000)
  params = dict(model=f"{args.quality_model}_resnet18_w{width:g}", train_steps=args.train_steps, height=size,
                width=size)

  # The border's reach is measured on tiles of the size compared below, with half a tile of context on each side.
  profile = inference.border_error_profile(forward, image, tile=args.tile, margin=args.tile // 2)
  chosen = inference.choose_halo(profile, args.halo_tolerance)
  distances = sorted({d for d in (0, 16, 32, 48, 64, 96, 128, 160, 192, 255) if d < len(profile)})
  emit({"bench": "predict_quality", **params, "metric": "halo_for_tolerance", "value": chosen, "unit": "px",
        "tile": args.tile, "tolerance_logit": args.halo_tolerance,
        "border_error": {str(d): float(profile[d]) for d in distances}})

  def predict(tile, **options):
    jax.block_until_ready(forward(np.zeros((args.batch_size, tile, tile, 1), np.uint8)))  # compile apart
    start = time.perf_counter()
    probability = inference.probabilities(inference.predict_logits(
        forward, image, tile=tile, batch_size=args.batch_size, **options))
    return probability, time.perf_counter() - start

  def f1(probability):
    return official.official_f1(inference.submission(probability >= 0.5), label)[0]

  reference, reference_s = predict(args.tile, step=0.5, blend="gaussian")
  reference_f1, reference_mask = f1(reference), reference >= 0.5
  emit({"bench": "predict_quality", **params, "mode": "step0.5", "tile": args.tile, "metric": "f1",
        "value": reference_f1, "seconds": reference_s})
  holds = {}  # halo -> F1 within --f1-tolerance of step 0.5 at every tile tried
  for halo in sorted({chosen, args.halo}):
    for tile in sorted({args.tile, inference.halo_tile(image.shape, args.tile, halo)}):
      probability, seconds = predict(tile, halo=halo)
      mask = probability >= 0.5
      agreement = 2 * np.count_nonzero(mask & reference_mask) / (mask.sum() + reference_mask.sum())
      delta = f1(probability) - reference_f1
      holds[halo] = holds.get(halo, True) and abs(delta) <= args.f1_tolerance
      emit({"bench": "predict_quality", **params, "mode": f"halo{halo}", "tile": tile, "metric": "f1_delta",
            "value": delta, "f1": f1(probability), "f1_reference": reference_f1,
            "mask_dice_vs_reference": agreement,
            "max_abs_probability_diff": float(np.abs(probability - reference).max()),
            "seconds": seconds, "speedup": reference_s / seconds})
  # The smallest halo tried whose F1 holds (a smaller halo computes fewer pixels); None when none does.
  recommended = min((halo for halo, ok in holds.items() if ok), default=None)
  emit({"bench": "predict_quality", **params, "metric": "recommended_halo", "value": recommended, "unit": "px",
        "tile": args.tile, "f1_tolerance": args.f1_tolerance, "halos_tried": sorted(holds)})


# -------------------------------------------------------------------------------------------------------------- tta


def benchmark_tta(args) -> None:
  """Compile and run time of the tile forward with 1, 2, 4 and 8 test-time views on the narrow U-Net."""
  import jax  # pylint: disable=g-import-not-at-top
  from urisc_jax import inference, models  # pylint: disable=g-import-not-at-top
  from urisc_jax.data import normalize  # pylint: disable=g-import-not-at-top

  model = models.build("unet", in_channels=1, num_classes=1, **NARROW)
  variables = models.init_variables(model, (1, 64, 64, 1))
  tiles = np.random.default_rng(0).integers(0, 256, (args.batch_size, args.tta_tile, args.tta_tile, 1), np.uint8)
  for tta in inference.TTA_CHOICES:
    forward = inference.make_tile_forward(model, variables, mean=normalize.CEM500K_MEAN, std=normalize.CEM500K_STD,
                                          tta=tta)
    start = time.perf_counter()
    jax.block_until_ready(forward(tiles))
    compile_s = time.perf_counter() - start
    seconds = []
    for _ in range(args.tta_runs):
      start = time.perf_counter()
      jax.block_until_ready(forward(tiles))
      seconds.append(time.perf_counter() - start)
    emit({"bench": "predict_tta", "model": display_name("narrow"), "tta": tta, "tile": args.tta_tile,
          "batch_size": args.batch_size, "metric": "run_s_median", "value": statistics.median(seconds), "unit": "s",
          "compile_s": compile_s, "runs": args.tta_runs})


# ------------------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--parts", default="rate,rss", help="comma-separated: rate, rss, quality, tta")
  parser.add_argument("--quick", action="store_true", help="small images for a check in a few minutes")
  parser.add_argument("--model", default="unet_resnet50", choices=sorted(MODELS) + ["normalize_only"])
  parser.add_argument("--height", type=int, default=4096)
  parser.add_argument("--width", type=int, default=4096)
  parser.add_argument("--tile", type=int, default=1024)
  parser.add_argument("--step", type=float, default=0.5)
  parser.add_argument("--blend", default="gaussian", choices=["gaussian", "constant"])
  parser.add_argument("--halo", type=int, default=128)
  parser.add_argument("--halo-tiles", default="0",
                      help="comma-separated tiles of the halo-mode rate runs; 0: the one inference.halo_tile fits")
  parser.add_argument("--batch-size", type=int, default=2, help="tiles per forward call (the peer's default: 2)")
  parser.add_argument("--repeats", type=int, default=1, help="rounds of rate measurements; medians if > 1")
  parser.add_argument("--peer-command", default="", help="a command printing the peer's window JSON lines")
  parser.add_argument("--rss-runs", default="9958x9959:memory:step:narrow,9958x9959:memory:halo:narrow,"
                      "30000x30000:disk:halo:narrow,30000x30000:disk:step:normalize_only")
  parser.add_argument("--train-steps", type=int, default=300)
  parser.add_argument("--quality-model", default="unet", choices=["unet", "linknet"],
                      help="the ResNet18 model trained for the quality part (the default config's: linknet)")
  parser.add_argument("--quality-width", type=float, default=0.25, help="width of the trained model")
  parser.add_argument("--quality-size", type=int, default=4096, help="side of the held-out synthetic image")
  parser.add_argument("--halo-tolerance", type=float, default=0.05, help="logit error allowed beyond the halo")
  parser.add_argument("--f1-tolerance", type=float, default=0.005,
                      help="largest F1 change against step 0.5 for which a halo is recommended")
  parser.add_argument("--tta-tile", type=int, default=256, help="tile of the tta part")
  parser.add_argument("--tta-runs", type=int, default=5, help="timed calls per view count in the tta part")
  parser.add_argument("--tmpdir", default=None, help="where images for `disk` runs are written")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.height = args.width = 2048
    args.rss_runs = ("2048x2048:memory:step:narrow,4096x4096:disk:halo:narrow,"
                     "4096x4096:disk:step:normalize_only")
    args.train_steps, args.quality_size = min(args.train_steps, 100), 2048
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.worker:
    measure(Run(**json.loads(args.worker)), pathlib.Path(args.tmpdir))
    return
  parts = args.parts.split(",")
  unknown = set(parts) - {"rate", "rss", "quality", "tta"}
  if unknown:
    raise SystemExit(f"--parts: unknown part(s) {sorted(unknown)}; choose from rate, rss, quality, tta")
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="predict_bench_", dir=args.tmpdir))
  try:
    if "rate" in parts:
      benchmark_rate(args, tmp)
    if "rss" in parts:
      benchmark_rss(args, tmp)
    if "quality" in parts:
      benchmark_quality(args)
    if "tta" in parts:
      benchmark_tta(args)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
