"""Segmentation models by name: U-Net, LinkNet, CASENet over ResNet encoders, and the plain U-Net.

    from urisc_jax import models
    model = models.build("unet", encoder="resnet50", in_channels=1, num_classes=1)
    variables = model.init(jax.random.key(0), x, train=False)      # {'params': ..., 'batch_stats': ...}
    logits = model.apply(variables, x, train=False)                  # x [N, H, W, C] -> [N, H, W, num_classes]
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

`build(name)` imports `urisc_jax/models/<name>.py` and instantiates its `MODEL_CLASS` with the class defaults
overridden by keyword; code outside the package adds models with the `register` decorator. Every model returns
float32 logits at the input's size; inputs must have H and W divisible by 32 (CASENet: by 8). Common overrides:
encoder, in_channels, num_classes, width, dtype.
"""

import dataclasses
import importlib
import pkgutil
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from urisc_jax import platforms

# Modules of this package that are not models.
_NOT_MODELS = frozenset({"layers", "resnet", "torch_import"})


@dataclasses.dataclass(frozen=True)
class InputNormalization:
  """Gray values in [0, 1] are fed to a model as (x - mean) / std."""
  mean: float
  std: float

  def __call__(self, x):
    """Normalizes x (gray in [0, 1], any shape); returns float32."""
    x = x if hasattr(x, "astype") else np.asarray(x)
    return (x.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std)


# The CEM500K MoCoV2 ResNet-50 weights were trained on inputs normalized with these (the checkpoint's `norms`).
CEM500K_NORMALIZATION = InputNormalization(mean=0.57287007, std=0.12740536)
input_normalization = {"cem500k": CEM500K_NORMALIZATION}


# Models registered from outside the package: name -> (class, input multiple).
_REGISTERED: dict[str, tuple[type[nn.Module], int]] = {}


def _builtin() -> list[str]:
  """The modules of this package that define MODEL_CLASS."""
  names = []
  for info in pkgutil.iter_modules(__path__):
    if info.name.startswith("_") or info.name in _NOT_MODELS:
      continue
    if hasattr(importlib.import_module(f"{__name__}.{info.name}"), "MODEL_CLASS"):
      names.append(info.name)
  return names


def available() -> list[str]:
  """Names `build` accepts: the modules of this package that define MODEL_CLASS, and the registered models."""
  return sorted({*_builtin(), *_REGISTERED})


def register(name: str, *, input_multiple: int = 32):
  """Class decorator: makes a Flax Linen model class buildable by name, from code outside the package.

      @models.register("my_unet", input_multiple=32)
      class MyUNet(nn.Module):
        in_channels: int = 1
        num_classes: int = 1

        @nn.compact
        def __call__(self, x, train: bool = False):  # x [N, H, W, in_channels] -> float32 [N, H, W, num_classes]
          ...

  Then `build("my_unet", ...)` makes it, and so does `--config.model.name=my_unet` once the module that registers it
  is imported. The class's attributes are its options (the configs build with in_channels=1, num_classes=1 and the
  keys of config.model); `model.apply(variables, x, train=...)` must return logits at the input's size.

  Args:
    name: the model's name; must not be one of the package's own models.
    input_multiple: what the input height and width must be multiples of (the deepest map's downsampling).

  Returns:
    The decorator, which returns the class unchanged.

  Raises:
    ValueError: the name is taken by a built-in model or by another registered class.
  """
  if not isinstance(input_multiple, int) or input_multiple < 1:
    raise ValueError(f"input_multiple must be a positive integer, got {input_multiple!r}")

  def add(cls: type[nn.Module]) -> type[nn.Module]:
    if name in _builtin():
      raise ValueError(f"model name {name!r} is one of urisc_jax's own models; register under another name")
    previous = _REGISTERED.get(name)
    # Re-running the defining module (a notebook cell, importlib.reload) registers the same class again.
    if previous and (previous[0].__module__, previous[0].__qualname__) != (cls.__module__, cls.__qualname__):
      raise ValueError(f"model name {name!r} is already registered by {previous[0].__module__}."
                       f"{previous[0].__qualname__}")
    _REGISTERED[name] = (cls, input_multiple)
    return cls

  return add


def _model_class(name: str) -> type[nn.Module]:
  if name in _REGISTERED:
    return _REGISTERED[name][0]
  return importlib.import_module(f"{__name__}.{name}").MODEL_CLASS


def model_fields(cls: type[nn.Module]) -> dict[str, Any]:
  """The overridable attributes of a model class and their defaults."""
  return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}


def build(name: str, **overrides: Any) -> nn.Module:
  """Instantiates the model `name` ('unet', 'linknet', 'casenet', 'plain_unet', ...) with `overrides`.

  Args:
    name: a module of urisc_jax.models that defines MODEL_CLASS, or a name given to `register`.
    **overrides: attributes of that class (e.g. encoder='resnet18', in_channels=1, num_classes=1, width=0.25,
      dtype=jnp.bfloat16, or dtype='auto': bfloat16 on GPUs and TPUs, float32 on the CPU).

  Returns:
    The unbound Flax Linen module.

  Raises:
    ValueError: unknown model name, unknown override or invalid encoder name, listing the valid ones.
  """
  valid = available()
  if name not in valid:
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(valid)}")
  cls = _model_class(name)
  fields = model_fields(cls)
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"model {name!r} has no option {', '.join(map(repr, unknown))}; valid options: "
                     f"{', '.join(sorted(fields))}")
  if isinstance(overrides.get("dtype"), str):  # configs spell dtypes as strings: 'auto', 'float32', 'bfloat16'
    overrides["dtype"] = platforms.compute_dtype(overrides["dtype"])
  if "encoder" in overrides:
    from urisc_jax.models import resnet  # pylint: disable=g-import-not-at-top
    resnet.encoder_spec(overrides["encoder"])  # raises with the valid names
  return cls(**overrides)


def input_multiple(name: str) -> int:
  """What the input height and width of model `name` must be multiples of (32 for ResNet U-Net / LinkNet, 16 for
  the plain U-Net, 8 for CASENet): the deepest feature map has H / input_multiple rows."""
  valid = available()
  if name not in valid:
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(valid)}")
  if name in _REGISTERED:
    return _REGISTERED[name][1]
  return importlib.import_module(f"{__name__}.{name}").INPUT_MULTIPLE


def count_params(tree: Any) -> int:
  """Number of scalars in a params tree (arrays or jax.ShapeDtypeStruct leaves).

  A full variables dict ({'params': ..., 'batch_stats': ...}) counts only its 'params', so BatchNorm scale and bias
  count and running statistics do not (the convention of torch's `sum(p.numel() for p in model.parameters())`).
  """
  if isinstance(tree, dict) and "params" in tree:
    tree = tree["params"]
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)))


def abstract_variables(model: nn.Module, input_shape: tuple[int, ...] = (1, 64, 64, 1)) -> Any:
  """Shapes and dtypes of `model.init` for an input of `input_shape` (NHWC), without computing anything."""
  x = jax.ShapeDtypeStruct(input_shape, np.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def init_variables(model: nn.Module, input_shape: tuple[int, ...], *, seed: int = 0) -> Any:
  """`model.init` for an NHWC input of `input_shape`, compiled once and quick to compile.

  Initialization draws from the 'rbg' PRNG: compiling ~100 threefry initializers takes XLA:CPU several seconds,
  rbg a fraction of that. The variables are as valid as threefry ones, just a different random stream.

  Args:
    model: an unbound model (e.g. from `build`).
    input_shape: (N, H, W, C) of a batch the model will see (only shapes matter).
    seed: PRNG seed.

  Returns:
    {'params': ..., 'batch_stats': ...} with float32 leaves.
  """
  x = jax.ShapeDtypeStruct(input_shape, np.float32)
  init = jax.jit(lambda x: model.init(jax.random.key(seed, impl="rbg"), x, train=False))
  return init(np.zeros(x.shape, x.dtype))


def random_variables(abstract: Any, *, seed: int = 0) -> Any:
  """Random variables shaped like `abstract` (e.g. from `abstract_variables`), drawn with numpy: nothing compiles.

  Kernels get He-normal values over their fan-in, BatchNorm scales 1, biases 0, running means 0 and variances 1.
  Meant for tests and benchmarks, where compiling `model.init` would cost more than the work being measured.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    shape = tuple(leaf.shape)
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1])) or 1
      return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)
    fill = 1.0 if name in ("scale", "var") else 0.0
    return np.full(shape, fill, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)
