"""Integrated gradients (Sundararajan et al. 2017) of a segmentation network's per-pixel logits.

For a target output pixel t with logit F_t, a normalized input x [H, W, C] and a baseline x' of the same shape,

    IG_i = (x_i - x'_i) * integral_0^1 dF_t/dx_i(x' + a (x - x')) da
        ~= (x_i - x'_i) * sum_k w_k dF_t/dx_i(x' + a_k (x - x'))

with the nodes a_k and weights w_k of a quadrature rule (`quadrature`). Completeness says sum_i IG_i = F_t(x) -
F_t(x'); what is left of it, sum(IG) - (F_t(x) - F_t(x')), is the integration error, which every `Attribution`
carries (Captum calls it the convergence delta).

The integral is a composite quadrature rule (Gauss-Legendre by default) that `path_integral.path_gradients` refines
per target, only where the integrand needs it, until |sum(IG) - (F(x) - F(x'))| <= tolerance * max(|F(x) - F(x')|,
1) or a node cap; every `Attribution` records each target's node count.

How the work is batched (see path_integral.py): path points go through the model in chunks of `chunk_size` (one
forward and one backward pass per chunk), targets share the forward pass (`jax.jacrev` over one-hot target
cotangents), and `vectorized=False` is the textbook loop, one `jax.grad` per target and point.

A U-RISC image (9958 x 9959 px) is far larger than any target can see, so `attribute_image` can cut, per target, a
window that holds the model's whole receptive field (`receptive_field_crop`, with the radius that
`receptive_field.model_receptive_field_radius` measures): the attribution there equals the whole-image attribution,
at a fraction of the cost.
"""

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from urisc_jax.attribution import path_integral

RULES, DEFAULT_RULE = path_integral.RULES, path_integral.DEFAULT_RULE
quadrature, completeness_met = path_integral.quadrature, path_integral.completeness_met
BASELINES = ("zeros", "black", "blurred", "noise")
# Every registry model accepts inputs whose sides are multiples of 32 (CASENet 8, plain U-Net 16).
MODEL_STRIDE = 32

# (variables, x [N, H, W, C] float32) -> logits [N, H, W] float32.
LogitFn = path_integral.LogitFn


@dataclasses.dataclass(frozen=True)
class ModelLogits:
  """The logit map of one output channel of a registry model in eval mode: (variables, x [N, H, W, C]) -> [N, H, W].

  Eval mode (train=False) normalizes with the BatchNorm running statistics in `variables['batch_stats']`, so each
  image's logits depend on that image alone. CASENet returns its fused logit. Hashable by value, so jitted functions
  that take it as a static argument compile once per model.
  """
  model: nn.Module
  channel: int = 0

  def __call__(self, variables: Any, x: jax.Array) -> jax.Array:
    return self.model.apply(variables, x, train=False)[..., self.channel]


@dataclasses.dataclass(frozen=True)
class Attribution:
  """Integrated gradients of T target logits over one window of an image.

  Attributes:
    attributions: float32 [T, h, w, C]: IG of each target over the window's input pixels.
    targets: int [T, 2]: (row, col) of each target in image coordinates.
    origin: (top, left) of the window in the image; targets sit at targets - origin inside it.
    logits: float32 [T]: F_t(x).
    baseline_logits: float32 [T]: F_t(x').
    nodes: int [T]: quadrature nodes of each target's final partition of the path.
    evaluations: int [T]: gradients computed for each target, including those of intervals it split.
    rule: the quadrature rule on each interval.
    tolerance: the completeness tolerance the targets were refined to meet (None: no refinement).
  """
  attributions: np.ndarray
  targets: np.ndarray
  origin: tuple[int, int]
  logits: np.ndarray
  baseline_logits: np.ndarray
  nodes: np.ndarray
  evaluations: np.ndarray
  rule: str
  tolerance: float | None = None

  @property
  def maps(self) -> np.ndarray:
    """float32 [T, h, w]: attributions summed over input channels (one map per target)."""
    return self.attributions.sum(axis=-1)

  @property
  def completeness_gap(self) -> np.ndarray:
    """float32 [T]: sum(IG) - (F(x) - F(x')), the integration error (0 for exact integration)."""
    total = self.attributions.reshape(len(self.targets), -1).astype(np.float64).sum(axis=1)
    return (total - (self.logits.astype(np.float64) - self.baseline_logits)).astype(np.float32)

  @property
  def completeness_gap_rel(self) -> np.ndarray:
    """float32 [T]: the gap divided by |F(x) - F(x')| (inf where the two logits are equal)."""
    change = np.abs(self.logits.astype(np.float64) - self.baseline_logits)
    with np.errstate(divide="ignore", invalid="ignore"):
      return (self.completeness_gap / change).astype(np.float32)

  @property
  def met_tolerance(self) -> np.ndarray:
    """bool [T]: |gap| <= tolerance x max(|F(x) - F(x')|, 1) (all True when no tolerance was asked for)."""
    if self.tolerance is None:
      return np.ones(len(self.targets), bool)
    return completeness_met(self.completeness_gap, self.logits, self.baseline_logits, self.tolerance)


def _check_inputs(x, baseline, targets) -> np.ndarray:
  if x.ndim != 3:
    raise ValueError(f"Integrated gradients takes one normalized image [H, W, C], got shape {x.shape}; add the "
                     "channel axis with x[..., None].")
  if baseline.shape != x.shape:
    raise ValueError(f"The baseline has shape {baseline.shape} but the input has shape {x.shape}: build it with "
                     "make_baseline from the same input.")
  targets = np.asarray(targets)
  if targets.ndim == 1:
    targets = targets[None]
  if targets.ndim != 2 or targets.shape[1] != 2 or not np.issubdtype(targets.dtype, np.integer):
    raise ValueError(f"targets must be integer (row, col) pairs of shape [T, 2], got {targets.dtype} {targets.shape}.")
  outside = (targets < 0).any(axis=1) | (targets[:, 0] >= x.shape[0]) | (targets[:, 1] >= x.shape[1])
  if outside.any():
    raise ValueError(f"Target pixel {tuple(targets[outside][0])} lies outside the {x.shape[0]} x {x.shape[1]} input.")
  return targets


def integrated_gradients(logit_fn: LogitFn, variables: Any, x, baseline, targets, *, steps: int = 32,
                         rule: str = DEFAULT_RULE, nodes_per_interval: int = 4, tolerance: float | None = None,
                         max_nodes: int | None = None, chunk_size: int = 16, vectorized: bool = True,
                         origin: tuple[int, int] = (0, 0)) -> Attribution:
  """Integrated gradients of the logits of `targets` with respect to the input `x`.

  Args:
    logit_fn: (variables, x [N, H, W, C]) -> logits [N, H, W], e.g. ModelLogits(model); must be hashable (a
      module-level function or a frozen dataclass) so that compilations are reused.
    variables: the model's variables ({'params', 'batch_stats'}).
    x: float32 [H, W, C], the normalized input (H, W as the model requires).
    baseline: float32 [H, W, C], x' (see `make_baseline`).
    targets: int [T, 2] (or one (row, col)): target pixels in x's coordinates; all T share each forward pass.
    steps: quadrature nodes of the first pass (steps // nodes_per_interval intervals; one interval of `steps` nodes,
      the plain rule, when steps <= nodes_per_interval).
    rule: the rule on each interval, one of RULES ('gauss_legendre' by default; 'riemann_right' is the paper's: a
      composite right Riemann sum is the right Riemann sum with all its nodes).
    nodes_per_interval: nodes of the rule per interval.
    tolerance: None = the first pass only. Otherwise intervals are split where the completeness gap is, until
      |gap| <= tolerance x max(|F(x) - F(x')|, 1) or the target's partition has `max_nodes` nodes.
    max_nodes: the node cap of refinement (None: the first pass's nodes).
    chunk_size: interpolation points per forward/backward pass; memory grows with chunk_size x T.
    vectorized: False loops in Python over targets and points, one jax.grad each (same result; for tests and
      benchmarks).
    origin: (top, left) of x in a larger image; recorded, and added to `targets` in the result.

  Returns:
    An Attribution with attributions [T, H, W, C], targets in image coordinates (targets + origin) and each
    target's node count.
  """
  x = jnp.asarray(x, jnp.float32)
  baseline = jnp.asarray(baseline, jnp.float32)
  targets = _check_inputs(x, baseline, targets)
  result = path_integral.path_gradients(logit_fn, variables, x, baseline, targets, steps=steps, rule=rule,
                                        nodes_per_interval=nodes_per_interval, tolerance=tolerance,
                                        max_nodes=max_nodes, chunk_size=chunk_size, vectorized=vectorized)
  attributions = np.asarray(x - baseline)[None] * result["gradients"]
  return Attribution(attributions=attributions.astype(np.float32), targets=targets + np.asarray(origin),
                     origin=tuple(map(int, origin)), logits=result["logits"].astype(np.float32),
                     baseline_logits=result["baseline_logits"].astype(np.float32), nodes=result["nodes"],
                     evaluations=result["evaluations"], rule=rule,
                     tolerance=None if tolerance is None else float(tolerance))


# ----------------------------------------------------------------------------------------------------------------
# Baselines and inputs cut from an 8-bit image.

def _blur_margin(sigma: float) -> int:
  return int(4.0 * sigma + 0.5)  # scipy's kernel radius at truncate=4


def _padded_window(image: np.ndarray, top: int, left: int, height: int, width: int, margin: int):
  """The window grown by `margin` on each side (clipped at the image), and where the window sits inside it."""
  r0, c0 = max(0, top - margin), max(0, left - margin)
  r1, c1 = min(image.shape[0], top + height + margin), min(image.shape[1], left + width + margin)
  return np.asarray(image[r0:r1, c0:c1], np.float32), (top - r0, left - c0)


def input_window(image: np.ndarray, window: "Crop | None" = None, *, mean: float, std: float) -> np.ndarray:
  """The normalized network input of a window of a gray uint8 image [H, W] (whole image if None): [h, w, 1]."""
  top, left, height, width = (0, 0, *image.shape) if window is None else window.box
  gray = np.asarray(image[top:top + height, left:left + width], np.float32) / 255.0
  return ((gray - np.float32(mean)) / np.float32(std))[..., None]


def make_baseline(kind: str, image: np.ndarray, window: "Crop | None" = None, *, mean: float, std: float,
                  seed: int | Sequence[int] = 0, blur_sigma: float = 10.0) -> np.ndarray:
  """The baseline x' for a window of a gray uint8 image [H, W] (whole image if None), normalized: [h, w, 1].

  Kinds: 'zeros' (zeros in normalized space: the dataset's mean gray, the paper's choice), 'black' (gray 0),
  'blurred' (the image under a Gaussian blur of `blur_sigma` px), 'noise' (uniform gray in [0, 1], seeded).
  A window's baseline equals the same window of the whole image's baseline: the blur reads `4 blur_sigma` px of
  context around the window and the noise of each pixel depends on (seed, row, col) only.
  """
  top, left, height, width = (0, 0, *image.shape) if window is None else window.box
  if kind == "zeros":
    return np.zeros((height, width, 1), np.float32)
  if kind == "black":
    return np.full((height, width, 1), -mean / std, np.float32)
  if kind == "blurred":
    if blur_sigma <= 0:
      raise ValueError(f"The blurred baseline needs blur_sigma > 0, got {blur_sigma}.")
    margin = _blur_margin(blur_sigma)
    context, (r, c) = _padded_window(image, top, left, height, width, margin)
    blurred = scipy.ndimage.gaussian_filter(context / 255.0, blur_sigma, mode="reflect", truncate=4.0)
    gray = blurred[r:r + height, c:c + width]
  elif kind == "noise":
    # One stream per image row, so a window's noise does not depend on where the window is.
    seeds = [int(s) for s in np.atleast_1d(seed)]
    gray = np.stack([np.random.default_rng([*seeds, row]).random(image.shape[1], np.float32)[left:left + width]
                     for row in range(top, top + height)])
  else:
    raise ValueError(f"Unknown baseline {kind!r}: choose one of {', '.join(BASELINES)}.")
  return ((gray.astype(np.float32) - np.float32(mean)) / np.float32(std))[..., None]


# ----------------------------------------------------------------------------------------------------------------
# Crops around a target.

@dataclasses.dataclass(frozen=True)
class Crop:
  """A window of an image and a target pixel re-indexed inside it.

  Attributes:
    top, left: the window's top-left pixel in the image.
    height, width: its size.
    target: (row, col) of the target inside the window.
  """
  top: int
  left: int
  height: int
  width: int
  target: tuple[int, int]

  @property
  def box(self) -> tuple[int, int, int, int]:
    return self.top, self.left, self.height, self.width

  @property
  def origin(self) -> tuple[int, int]:
    return self.top, self.left


def _axis_window(center: int, radius: int | None, length: int, multiple: int) -> tuple[int, int]:
  """(start, size) along one axis: [center - radius, center + radius] grown to multiples of `multiple`."""
  usable = length // multiple * multiple
  if usable == 0:
    raise ValueError(f"An image side of {length} px is shorter than the model's stride {multiple}: pad the image.")
  if radius is None:
    start, stop = 0, length
  else:
    start = max(0, (center - radius) // multiple * multiple)
    stop = min(length, -(-(center + radius + 1) // multiple) * multiple)
  size = min(-(-(stop - start) // multiple) * multiple, usable)
  # Flush with the far border when the grid does not fit (as sliding-window prediction's last tile is); then keep
  # the target inside and the window inside the image (both hold at once since size <= length).
  start = min(start, length - size)
  start = min(max(start, center - size + 1), center)
  start = min(max(start, 0), length - size)
  return start, size


def receptive_field_crop(image_shape: Sequence[int], target: Sequence[int], radius: int | None, *,
                         multiple: int = MODEL_STRIDE) -> Crop:
  """The window around `target` that holds its receptive field, sized for the model, and the target inside it.

  The window spans [target - radius, target + radius] on each axis, grown outward to multiples of `multiple` in
  image coordinates (so the model's downsampling grid matches the whole image's) and clipped at the image borders.
  When an image side is not a multiple of `multiple` and the window reaches its far border, the window is moved to
  end flush with that border instead (like the last tile of sliding-window prediction).

  Args:
    image_shape: (H, W, ...) of the image.
    target: (row, col) of the target pixel in the image.
    radius: receptive-field radius in px (`receptive_field.model_receptive_field_radius`); None takes the whole image
      (cut to multiples of `multiple`).
    multiple: the model's required input multiple (32 for every registry model).

  Returns:
    Crop(top, left, height, width, target re-indexed inside the window).
  """
  height, width = int(image_shape[0]), int(image_shape[1])
  row, col = int(target[0]), int(target[1])
  if not (0 <= row < height and 0 <= col < width):
    raise ValueError(f"Target pixel ({row}, {col}) lies outside the {height} x {width} image.")
  top, crop_h = _axis_window(row, radius, height, multiple)
  left, crop_w = _axis_window(col, radius, width, multiple)
  return Crop(top=top, left=left, height=crop_h, width=crop_w, target=(row - top, col - left))


# ----------------------------------------------------------------------------------------------------------------
# Attribution of target pixels of a whole (possibly huge) image.

def iter_attributions(logit_fn: LogitFn, variables: Any, image: np.ndarray, targets, *, mean: float, std: float,
                      baseline: str = "zeros", radius: int | None = None, steps: int = 32,
                      rule: str = DEFAULT_RULE, nodes_per_interval: int = 4, tolerance: float | None = None,
                      max_nodes: int | None = None, chunk_size: int = 16, targets_per_pass: int = 4,
                      seed: int | Sequence[int] = 0, blur_sigma: float = 10.0,
                      multiple: int = MODEL_STRIDE) -> Iterator[Attribution]:
  """Integrated gradients of target pixels of a gray uint8 image, each over the window that holds its receptive field.

  Targets whose windows coincide share a call (up to `targets_per_pass` at a time); each call attributes over its
  window only. Yields as it goes, so a caller can show progress.

  Args:
    logit_fn, variables: as for `integrated_gradients`.
    image: uint8 [H, W] (a memory map is fine: only windows are read).
    targets: int [T, 2] (row, col) in the image.
    mean, std: the input normalization the model was trained with.
    baseline: one of BASELINES (see `make_baseline`).
    radius: receptive-field radius (`receptive_field.model_receptive_field_radius`); None attributes over the whole
      image, whose sides must then be multiples of `multiple`.
    steps, rule, nodes_per_interval, tolerance, max_nodes, chunk_size: as for `integrated_gradients`.
    targets_per_pass: targets sharing one forward pass; memory grows with chunk_size x targets_per_pass.
    seed, blur_sigma: for the 'noise' and 'blurred' baselines.
    multiple: the model's required input multiple.

  Yields:
    One Attribution per group of targets sharing a window; each names its targets in image coordinates.
  """
  if np.ndim(image) != 2:
    raise ValueError(f"Attribution takes a gray image [H, W], got shape {np.shape(image)}.")
  if int(targets_per_pass) != targets_per_pass or targets_per_pass < 1:
    raise ValueError(f"targets_per_pass must be a positive integer, got {targets_per_pass!r}.")
  targets = np.asarray(targets, np.int64).reshape(-1, 2)
  if radius is None and (image.shape[0] % multiple or image.shape[1] % multiple):
    raise ValueError(f"Attributing over the whole {image.shape[0]} x {image.shape[1]} image needs sides that are "
                     f"multiples of {multiple}: attribute over receptive-field crops (config.attribution.crop="
                     "'receptive_field') or pad the image.")
  crops = [receptive_field_crop(image.shape, t, radius, multiple=multiple) for t in targets]
  groups: dict[tuple[int, int, int, int], list[int]] = {}
  for index, crop in enumerate(crops):
    groups.setdefault(crop.box, []).append(index)
  for indices in groups.values():
    window = crops[indices[0]]
    x = input_window(image, window, mean=mean, std=std)
    x_baseline = make_baseline(baseline, image, window, mean=mean, std=std, seed=seed, blur_sigma=blur_sigma)
    for start in range(0, len(indices), targets_per_pass):
      local = np.asarray([crops[i].target for i in indices[start:start + targets_per_pass]])
      yield integrated_gradients(logit_fn, variables, x, x_baseline, local, steps=steps, rule=rule,
                                 nodes_per_interval=nodes_per_interval, tolerance=tolerance, max_nodes=max_nodes, chunk_size=chunk_size,
                                 origin=window.origin)


def attribute_image(*args, **kwargs) -> list[Attribution]:
  """`iter_attributions` as a list."""
  return list(iter_attributions(*args, **kwargs))
