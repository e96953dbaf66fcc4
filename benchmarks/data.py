"""Speed and memory of the crop pipeline at U-RISC scale, one JSON object per line.

    python -m benchmarks.data                  # crops/s with 0 and 2 workers; peak RSS with 1 and 10 images
    python -m benchmarks.data --bench crops --workers 0 --threads 1,2    # crops/s only, 1 and 2 warp threads
    python -m benchmarks.data --model_step     # and the crops/s a U-Net-ResNet50 train step consumes (1024^2, batch 1)

A full-size U-RISC Track 1 image (9959 x 9958 px) and its label are rendered once with urisc_jax.data.synthetic
(about a minute) and kept as .npy files under --cache. Crops are 1024 x 1024 with the paper's augmentations plus
cutout (--augment paper, data/augment.py) or flips and right-angle rotations only (--augment dihedral).

  crops_per_s: augmented crops delivered per second, the median over --repeats runs of --batches batches each after
    a warm-up batch (worker start-up not counted; min and max are reported beside it), with --threads threads
    warping each crop (config.data.augment.threads), from --crop_images linked images (1: the same image's pages
    stay mapped, see data/windows.py; 10: most crops touch pages the process has not mapped yet). cpu_ms_per_crop:
    the CPU time of this process per crop (0 workers only), steadier than crops/s on a busy machine.
  peak_rss_mib: the largest peak resident set (VmHWM) of the process and of its worker processes, each image count
    in a fresh process (total_mib adds them up); the ten images are hard links of the one image under ten names, so
    the page cache holds one copy while every worker maps ten files, which is what would make a plain memory map
    grow with the number of images (data/windows.py holds each process under RESIDENT_BUDGET_BYTES, 256 MiB).
  step_crops_per_s: batch / median step time of `benchmarks.models --model unet_resnet50 --size 1024 --batch 1
    --bench train --repeats 2` run in the same sitting, and data_to_step_ratio: crops_per_s with 2 workers over it.
The load average is printed with every line: on a shared machine compare medians from one sitting.
"""

import argparse
import gc
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

from urisc_jax.data import augment, pipeline, synthetic
from urisc_jax.data.prepare import PreparedImage

TRACK1_SHAPE = (9959, 9958)  # rows x columns as stored


def emit(metric: str, value: float, unit: str, **params) -> None:
  print(json.dumps({"bench": "data", "metric": metric, "value": round(float(value), 3), "unit": unit, **params,
                    "load_avg_1min": round(os.getloadavg()[0], 2)}), flush=True)


def full_size_image(cache: pathlib.Path, seed: int = 2022) -> PreparedImage:
  """A rendered 9959 x 9958 synthetic U-RISC image with its membrane mask (1 = membrane) as .npy, made once."""
  image_path, label_path = cache / "track1_full.image.npy", cache / "track1_full.label.npy"
  if not (image_path.is_file() and label_path.is_file()):
    cache.mkdir(parents=True, exist_ok=True)
    image, label = synthetic.render(synthetic.urisc_like(*TRACK1_SHAPE), seed, progress=True)
    for path, array in ((label_path, (label == synthetic.MEMBRANE).astype(np.uint8)), (image_path, image)):
      tmp = path.with_suffix(".tmp.npy")
      np.save(tmp, array)
      os.replace(tmp, path)
  return PreparedImage("track1_full", str(image_path), str(label_path), TRACK1_SHAPE, "synthetic", "synthetic")


def linked_images(image: PreparedImage, count: int, cache: pathlib.Path) -> list[PreparedImage]:
  """`count` PreparedImages whose files are hard links of `image`'s (separate files to every reader)."""
  folder = cache / "links"
  folder.mkdir(parents=True, exist_ok=True)
  images = []
  for k in range(count):
    paths = []
    for source in (image.image_path, image.label_path):
      link = folder / f"{k:02d}.{pathlib.Path(source).name}"
      if not link.exists():
        try:
          os.link(source, link)
        except OSError:
          os.symlink(source, link)
      paths.append(str(link))
    images.append(PreparedImage(f"image_{k:02d}", paths[0], paths[1], image.shape, "synthetic", "synthetic"))
  return images


def augment_config(name: str, *, threads: int = 1) -> augment.AugmentConfig:
  return augment.AugmentConfig.paper(threads=threads) if name == "paper" else augment.AugmentConfig(threads=threads)


def _peak_rss_mib(pid: int) -> float:
  """VmHWM of a process: its peak resident set since it started (reset by exec, unlike ru_maxrss)."""
  for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024
  return float("nan")


def _descendants(pid: int) -> list[int]:
  children = {}
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
  found, todo = [], [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      found.append(child)
      todo.append(child)
  return found


def crops_per_second(images, *, workers: int, args, threads: int = 1,
                     before_closing=None) -> tuple[list[float], list[float]]:
  """Crops per second and CPU ms per crop of each repeat: batches after the first, which warms up the workers."""
  rates, cpu_ms = [], []
  for repeat in range(args.repeats):
    examples = pipeline.CropExamples(images, crop_size=args.crop, seed=repeat,
                                     augment=augment_config(args.augment, threads=threads))
    dataset = pipeline.train_dataset(examples, num_steps=args.batches + 1, global_batch_size=args.batch_size)
    iterator = pipeline.iterator(dataset, num_workers=workers)
    next(iterator)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
      next(iterator)
    crops = args.batches * args.batch_size
    rates.append(crops / (time.perf_counter() - start))
    cpu_ms.append((time.process_time() - cpu) / crops * 1e3)
    if before_closing is not None:
      before_closing()
    del iterator
    gc.collect()
  return rates, cpu_ms


def peak_rss(args) -> None:
  """Runs the pipeline with 2 workers over --images linked images and prints the peak RSS of each process."""
  cache = pathlib.Path(args.cache)
  images = linked_images(full_size_image(cache), args.images, cache)
  peaks = {}

  def record():
    for pid in _descendants(os.getpid()):
      try:
        peaks[pid] = _peak_rss_mib(pid)
      except OSError:
        pass  # a helper process that just exited

  crops_per_second(images, workers=2, args=args, before_closing=record)
  own = _peak_rss_mib(os.getpid())
  workers = sorted(peaks.values(), reverse=True)
  emit("peak_rss_mib", max([own] + workers), "MiB", images=args.images, main_mib=round(own, 1),
       worker_mib=[round(w, 1) for w in workers], total_mib=round(own + sum(workers), 1), crop=args.crop,
       augment=args.augment, crops_read=args.repeats * (args.batches + 1) * args.batch_size)


def model_step_seconds(args) -> float | None:
  """Median seconds of a U-Net-ResNet50 train step (batch 1, --crop px), timed by benchmarks.models."""
  command = [sys.executable, "-m", "benchmarks.models", "--model", "unet_resnet50", "--size", str(args.crop),
             "--batch", "1", "--bench", "train", "--repeats", "2"]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  median = [line["value"] for line in lines if line.get("metric") == "median_s"]
  if result.returncode or not median:
    print(json.dumps({"bench": "data", "error": "model step failed", "stderr": result.stderr[-2000:]}), flush=True)
    return None
  return median[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--bench", choices=["all", "crops", "rss"], default="all",
                      help="crops: crops/s only; rss: one peak-RSS measurement")
  parser.add_argument("--cache", default="/tmp/urisc_jax_bench", help="where the rendered image is kept")
  parser.add_argument("--crop", type=int, default=1024)
  parser.add_argument("--augment", choices=["paper", "dihedral"], default="paper")
  parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
  parser.add_argument("--threads", default="1", help="comma-separated warp thread counts (crops/s)")
  parser.add_argument("--crop_images", type=int, default=1, help="linked images the crops/s are cut from")
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--batches", type=int, default=25, help="timed batches per repeat")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--images", type=int, default=10, help="--bench rss: how many linked images")
  parser.add_argument("--model_step", action="store_true", help="also time a U-Net-ResNet50 train step")
  args = parser.parse_args()

  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags.
  if args.bench == "rss":
    peak_rss(args)
    return

  cache = pathlib.Path(args.cache)
  image = full_size_image(cache)
  images = [image] if args.crop_images == 1 else linked_images(image, args.crop_images, cache)
  rates = {}
  for workers in (int(w) for w in args.workers.split(",")):
    for threads in (int(t) for t in args.threads.split(",")):
      measured, cpu_ms = crops_per_second(images, workers=workers, threads=threads, args=args)
      rates[workers] = max(rates.get(workers, 0.0), statistics.median(measured))
      extra = {"cpu_ms_per_crop": round(statistics.median(cpu_ms), 2)} if workers == 0 else {}
      emit("crops_per_s", statistics.median(measured), "crops/s", workers=workers, threads=threads, crop=args.crop,
           augment=args.augment, image=f"{TRACK1_SHAPE[0]}x{TRACK1_SHAPE[1]}", images=len(images),
           batch_size=args.batch_size, batches=args.batches, repeats=args.repeats, min=round(min(measured), 3),
           max=round(max(measured), 3), cpus=os.cpu_count(), **extra)
  if args.bench == "crops":
    return
  for count in (1, args.images):
    command = [sys.executable, "-m", "benchmarks.data", "--bench", "rss", "--images", str(count), "--cache",
               args.cache, "--crop", str(args.crop), "--augment", args.augment, "--batch_size",
               str(args.batch_size), "--batches", str(args.batches), "--repeats", "1"]
    subprocess.run(command, check=True)
  if args.model_step:
    step_seconds = model_step_seconds(args)
    if step_seconds is not None:
      consumed = 1 / step_seconds
      emit("step_crops_per_s", consumed, "crops/s", model="unet_resnet50", size=args.crop, batch=1,
           step_s=round(step_seconds, 3))
      best = rates.get(2, max(rates.values()))
      emit("data_to_step_ratio", best / consumed, "x", workers=2 if 2 in rates else max(rates))


if __name__ == "__main__":
  main()
