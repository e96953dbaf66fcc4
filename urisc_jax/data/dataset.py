"""From `config.data` to prepared (decoded, cached, memory-mappable) images per split.

`source = "synthetic"` writes a U-RISC-layout release with the package's generator (reused when it exists), so the
same reader serves synthetic and real data; `source = "urisc"` reads a downloaded release at `config.data.root`.
"""

import pathlib

from urisc_jax.data import prepare, sources, synthetic

SOURCES = ("synthetic", "urisc")


def release_root(data_config, workdir: str | pathlib.Path) -> pathlib.Path:
  """The folder holding `imgs/` and `label/`, generating the synthetic release first when asked for."""
  source = data_config.source
  if source == "synthetic":
    root = pathlib.Path(data_config.root or pathlib.Path(workdir) / "data")
    cfg = data_config.synthetic
    synthetic.write_release(root, num_train=cfg.num_train, num_val=cfg.num_val, num_test=cfg.num_test,
                            height=cfg.height, width=cfg.width, seed=cfg.seed, preset=cfg.preset)
    return root
  if source == "urisc":
    if not data_config.root:
      raise ValueError("config.data.source='urisc' needs the release folder: pass --config.data.root=PATH (the "
                       "folder that holds imgs/ and label/).")
    return pathlib.Path(data_config.root)
  raise ValueError(f"Unknown config.data.source {source!r}: choose one of {SOURCES}.")


def cache_dir(data_config, workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(data_config.cache_dir or pathlib.Path(workdir) / "cache")


def prepared_split(data_config, workdir: str | pathlib.Path, split: str, *,
                   progress: bool = True) -> list[prepare.PreparedImage]:
  """Decoded images (with labels) of one split of the release, e.g. "train", "val" or "test"."""
  root = release_root(data_config, workdir)
  pairs = sources.urisc_pairs(root, track=data_config.track, split=split)
  return prepare.prepare_pairs(pairs, cache_dir(data_config, workdir), membrane=data_config.membrane,
                               threshold=data_config.label_threshold, progress=progress)
