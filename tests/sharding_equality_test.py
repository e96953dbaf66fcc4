"""On 8 simulated CPU devices, a train step on meshes (8, 1), (4, 2) and (2, 4) equals the single-device step.

Float32 alone cannot show that: this step's gradients are ill-conditioned (train-mode BatchNorm statistics, focal +
dice), so reordering float32 sums, sharded or not, moves them by ~0.3 % (reordering the batch on one device does
too). Computed in float64 (parameters, BatchNorm statistics and optimizer state stay float32), the step can only
change by rounding: the loss, gradients (Adam's mu after one step), updated parameters and BatchNorm statistics
measured within 5e-8 of one device's, so < 1e-5 is a sharp test. The float32 step is then held to float32's own
accuracy: its loss and BatchNorm statistics match one device's to 1e-6, and its gradients and parameters are within
4 x of the single-device float32 step's distance from the float64 step (measured 2 x: 3e-3 vs 1.5e-3).

One subprocess computes every mesh and dtype (the 8 devices must exist before JAX starts) and prints JSON.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

# Floating-point comparisons (sharded steps against the single-device step):
# .ci/run runs them again under XLA's AVX2 cap.
pytestmark = pytest.mark.numerics

REPO = pathlib.Path(__file__).resolve().parents[1]
MESHES = {"data8": (("data", 8),), "data4_spatial2": (("data", 4), ("spatial", 2)),
          "data2_spatial4": (("data", 2), ("spatial", 4))}
PARTS = ("loss", "grads", "params", "batch_stats")

_SCRIPT = textwrap.dedent("""
    import concurrent.futures, json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import ml_collections, numpy as np, optax
    from urisc_jax import losses, sharding, state as state_lib, train

    MESHES = json.loads(sys.argv[1])
    CROP = 128  # The smallest crop whose 1/32 map splits 4 ways, >= 3 rows each: see sharding.check_spatial_split.
    tx = optax.adam(1e-3)  # After one step, mu = 0.1 x the gradients.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, CROP, CROP, 1), dtype=np.uint8)
    batch = {"image": image, "label": (image < 40).astype(np.uint8)}

    def model_of(dtype):
      return state_lib.build_model(ml_collections.ConfigDict(
          {"name": "unet", "encoder": "resnet18", "width": 0.125, "dtype": dtype}))

    # Parameters, BatchNorm statistics and optimizer state are float32 whatever the compute dtype: one initial state.
    single = sharding.mesh_from_config((("data", 1),), jax.devices()[:1])
    initial = jax.device_get(state_lib.create_state(model_of("float32"), tx, single, jax.random.key(0), CROP)[0])

    def lowered_step(dtype, axes):
      mesh = sharding.mesh_from_config(axes, jax.devices()[:int(np.prod([size for _, size in axes]))])
      sharding.check_spatial_split(mesh, CROP)
      shardings = jax.tree.map(lambda _: sharding.replicated(mesh), initial)
      step = jax.jit(train.make_train_step(model_of(dtype), tx, losses.focal_dice, mean=0.5, std=0.25),
                     in_shardings=(shardings, sharding.batch_sharding(mesh), None), out_shardings=(shardings, None))
      args = (jax.device_put(initial, shardings), sharding.global_batch_from_local(mesh, batch), jax.random.key(1))
      return step.lower(*args), args

    runs = {(dtype, name): lowered_step(dtype, axes)
            for dtype in ("float64", "float32") for name, axes in [("single", (("data", 1),)), *MESHES.items()]}
    # XLA compiles outside the GIL: two threads use both cores of a small machine.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      executables = dict(zip(runs, pool.map(lambda run: run[0].compile(), runs.values())))
    results = {}
    for key, (_, args) in runs.items():
      state, metrics = jax.device_get(executables[key](*args))
      results[key] = {"loss": metrics["loss"], "grads": state.opt_state[0].mu, "params": state.params,
                      "batch_stats": state.batch_stats}

    def relative(a, b):
      a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]).astype(np.float64)
      b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)]).astype(np.float64)
      return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    def errors(result, reference):
      return {part: relative(result[part], reference[part]) for part in reference}

    truth, single32 = results["float64", "single"], results["float32", "single"]
    report = {"float32_single_vs_float64": errors(single32, truth)}
    for name in MESHES:
      report[f"float64_{name}"] = errors(results["float64", name], truth)
      report[f"float32_{name}"] = errors(results["float32", name], single32)
      report[f"float32_{name}_vs_float64"] = errors(results["float32", name], truth)
    try:
      sharding.check_spatial_split(sharding.mesh_from_config((("data", 4), ("spatial", 2))), 64)
      report["refused"] = None
    except ValueError as e:
      report["refused"] = str(e)
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def report():
  # Backend optimization level 0 compiles the 8 steps about 3 x faster; both sides of each comparison share it.
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
                       + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  result = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(MESHES)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES)
def test_float64_step_on_a_mesh_equals_the_single_device_step(report, mesh):
  """Loss, gradients, updated parameters and BatchNorm running statistics within 1e-5 (relative, whole tree)."""
  errors = report[f"float64_{mesh}"]
  for part in PARTS:
    assert errors[part] < 1e-5, (part, errors)


@pytest.mark.parametrize("mesh", MESHES)
def test_float32_step_on_a_mesh_is_as_accurate_as_the_single_device_step(report, mesh):
  """The float32 loss and BatchNorm statistics match one device's; gradients and parameters are about as close to
  the float64 step as one device's float32 step is (sharding only reorders float32 sums)."""
  errors, floor = report[f"float32_{mesh}_vs_float64"], report["float32_single_vs_float64"]
  vs_single = report[f"float32_{mesh}"]
  assert vs_single["loss"] < 1e-6 and vs_single["batch_stats"] < 1e-6, vs_single
  for part in ("grads", "params"):
    assert errors[part] <= 4 * floor[part] + 1e-6, (part, errors, floor)


def test_a_split_xla_gets_wrong_is_refused_naming_the_config_keys(report):
  message = report["refused"]
  assert message is not None
  assert "config.data.crop_size=64" in message and "config.mesh" in message and "e.g. 128" in message
