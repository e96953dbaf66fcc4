"""--mode=attribute end to end on the tiny config, and completeness of integrated gradients on the trained model."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image

from configs import tiny
from urisc_jax import predict, state, train
from urisc_jax.attribution import fields
from urisc_jax.attribution import integrated_gradients as ig
from urisc_jax.attribution import run
from urisc_jax.data import dataset

TRAIN_STEPS = 24


def _config():
  config = tiny.get_config()
  config.train.num_steps = TRAIN_STEPS
  config.train.checkpoint_every = TRAIN_STEPS
  config.train.eval_every = 0  # no validation during training
  config.predict.threshold = 0.5  # no threshold sweep on the validation image
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  flags.FLAGS.mark_as_parsed()  # Grain reads absl flags
  workdir = tmp_path_factory.mktemp("attribution")
  train.train_and_evaluate(_config(), workdir)
  return workdir


@pytest.fixture(scope="module")
def attributed(trained):
  config = _config()  # the default quadrature: Gauss-Legendre, refined to the default tolerance
  config.attribution.chunk_size = 8
  config.attribution.num_targets = 2
  config.attribution.targets_per_pass = 6  # one pass for the image's (up to) 6 targets: one compilation
  config.attribution.crop = "none"  # the tiny model's receptive field covers the whole 192 x 160 image anyway
  config.attribution.k_grid = (0.01, 0.1, 0.5)
  return config, run.attribute(config, trained)


def _path_derivative(logit_fn, variables, x, baseline, target, ts, chunk=50) -> np.ndarray:
  """f'(t) = dF_target(x' + t (x - x')) / dt at each t of `ts`, float64 [len(ts)]: the integrand of IG's path
  integral, computed directly (jax.grad of the target's logit along the path), independent of the IG code."""
  delta = jnp.asarray(x - baseline)

  def logit_at(t):
    return logit_fn(variables, (baseline + t * delta)[None])[0, target[0], target[1]]

  derivative = jax.jit(jax.vmap(jax.grad(logit_at)))
  return np.concatenate([np.asarray(derivative(jnp.asarray(ts[i:i + chunk], jnp.float32)), np.float64)
                         for i in range(0, len(ts), chunk)])


@pytest.mark.numerics
def test_right_riemann_gaps_on_the_trained_model_are_the_quadrature_errors_of_the_path_derivative(trained):
  """On the trained model, IG's completeness gap with n right Riemann steps (the paper's rule) is exactly the
  quadrature error of the path derivative f'(t) = dF(x' + t (x - x')) / dt, computed here directly (jax.grad of
  the target's logit along the path): gap_n = sum_i f'(i / n) / n - (F(x) - F(x')). And it is within the rule's
  first-order bound TV(f') / n: on each step the error is at most the step's oscillation of f' over n, and the
  oscillations add up to at most the total variation.

  Both hold whatever the trained weights and the machine's rounding (a strict ordering of the gaps at 10, 50 and 300
  steps does not: for a piecewise-linear network the error depends on where the kinks fall between the nodes). The
  identity is held to 1e-4 x max(|F(x) - F(x')|, 1), float32 summation over the window's pixels and the nodes
  (measured ~1e-6 here); it catches a wrong quadrature weight or node, a missing end point or gradients of another
  target, which move the gap by order 1/n x |f'|. TV(f') is measured on the 3001 points of the path that hold every
  node of the three rules (pieces of a piecewise-constant f' narrower than 1/3000 can hide from it, so the bound is
  doubled)."""
  config = _config()
  model = state.build_model(config.model)
  variables, _, meta = predict.restore_variables(config, trained, model)
  mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
  [test_image] = dataset.prepared_split(config.data, trained, "test", progress=False)
  image = np.asarray(test_image.image())[:64, :64]
  x = ig.input_window(image, mean=mean, std=std)
  # A black baseline: a model this briefly trained barely moves its logits between mid-gray (the zeros baseline) and
  # the image; from black they move by about 10, so the gaps are integration errors, not rounding.
  baseline = ig.make_baseline("black", image, mean=mean, std=std)
  logit_fn = ig.ModelLogits(model)
  logits = np.asarray(logit_fn(variables, np.stack([x, baseline])))
  change = np.abs(logits[0] - logits[1])
  targets = np.stack(np.unravel_index(np.argsort(change, axis=None)[-2:], change.shape), axis=1)
  ts = np.linspace(0.0, 1.0, 3001)
  derivative = np.stack([_path_derivative(logit_fn, variables, x, baseline, t, ts) for t in targets])  # [T, 3001]
  variation = np.abs(np.diff(derivative, axis=1)).sum(axis=1)
  for steps in (10, 50, 300):
    # One interval of `steps` nodes: the plain rule, nodes at i / steps.
    result = ig.integrated_gradients(logit_fn, variables, x, baseline, targets, steps=steps, chunk_size=10,
                                     rule="riemann_right", nodes_per_interval=steps)
    assert np.all(result.nodes == steps)
    change = result.logits.astype(np.float64) - result.baseline_logits
    expected = derivative[:, 3000 // steps::3000 // steps].mean(axis=1) - change
    np.testing.assert_allclose(result.completeness_gap, expected, rtol=0,
                               atol=1e-4 * np.maximum(np.abs(change), 1.0).max(), err_msg=f"{steps} steps")
    assert np.all(np.abs(result.completeness_gap) <= 2.0 * variation / steps), (steps, result.completeness_gap)


def test_attribute_writes_stats_targets_and_figures(attributed, trained):
  config, summary = attributed
  out = trained / "attribution"
  stats = json.loads((out / "stats.json").read_text())
  listing = json.loads((out / "targets.json").read_text())
  entries = listing["targets"]
  assert summary["num_targets"] == len(entries) == stats["outcomes"]["all"]["n"] > 0
  assert stats["dataset"] == listing["dataset"] == "synthetic:Track1/test"
  assert stats["k_grid"] == listing["k_grid"] == [0.01, 0.1, 0.5] and stats["rule"] == "gauss_legendre"
  assert sum(stats["outcomes"][o]["n"] for o in fields.OUTCOMES if o in stats["outcomes"]) == len(entries)
  for name in ("figure7b_sk.png", *sorted({f"figure8_{e['image']}.png" for e in entries})):
    with Image.open(out / name) as png:
      assert png.format == "PNG" and png.width > 0
  for key in ("image", "y", "x", "outcome", "logit", "baseline_logit", "completeness_gap", "completeness_gap_rel",
              "nodes", "gradient_evaluations", "met_tolerance", "s_k_nm2"):
    assert all(key in e for e in entries), key
  assert all(np.all(np.diff(e["s_k_nm2"]) <= 0) for e in entries)  # fewer pixels pass a higher level
  pixels = np.array([e["s_k_nm2"] for e in entries]) / 2.18**2  # S_k = pixel count x (2.18 nm)^2
  np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-6)
  np.testing.assert_allclose(summary["mean_s_k_nm2"]["k=0.01"], np.mean([e["s_k_nm2"][0] for e in entries]))
  assert summary["completeness"]["max_abs_gap"] == max(abs(e["completeness_gap"]) for e in entries)


def test_every_target_of_the_default_run_meets_the_completeness_tolerance(attributed, trained):
  config, summary = attributed
  stats = json.loads((trained / "attribution" / "stats.json").read_text())
  entries = json.loads((trained / "attribution" / "targets.json").read_text())["targets"]
  completeness = stats["completeness"]
  assert completeness["tolerance"] == config.attribution.tolerance == 0.01
  assert completeness["met_tolerance"] == completeness["num_targets"] == len(entries) > 0
  for e in entries:  # recomputed from the recorded numbers
    assert e["met_tolerance"]
    assert abs(e["completeness_gap"]) <= 0.01 * max(abs(e["logit"] - e["baseline_logit"]), 1.0) + 1e-6
    assert config.attribution.steps <= e["nodes"] <= config.attribution.max_nodes <= 512
    assert e["gradient_evaluations"] >= e["nodes"]
  assert completeness["nodes"]["max"] == max(e["nodes"] for e in entries)


def test_targets_are_sampled_by_outcome_against_the_annotation(attributed, trained):
  config, _ = attributed
  stats = json.loads((trained / "attribution" / "stats.json").read_text())
  entries = json.loads((trained / "attribution" / "targets.json").read_text())["targets"]
  [test_image] = dataset.prepared_split(config.data, trained, "test", progress=False)
  truth = np.asarray(test_image.label()) > 0
  for e in entries:
    predicted = e["probability"] >= stats["threshold"]  # the tiny config does not post-process
    assert fields.outcome_masks(np.array([[predicted]]), truth[e["y"], e["x"]][None, None])[e["outcome"]][0, 0]
  counts = {o: sum(e["outcome"] == o for e in entries) for o in fields.OUTCOMES}
  assert all(n <= config.attribution.num_targets for n in counts.values()) and counts["tp"] + counts["fn"] > 0


def test_paper_protocol_resizes_draws_targets_on_its_grid_and_scales_the_pixel_size(trained, tmp_path):
  config = _config()
  config.attribution.protocol = "paper"
  config.attribution.paper_size = 64  # the paper's 512, scaled to the tiny images (192 x 160)
  config.attribution.paper_grid = 10
  config.attribution.num_targets = 1
  config.attribution.max_nodes = config.attribution.steps  # one pass: this test is about the protocol
  config.attribution.crop = "none"
  config.attribution.k_grid = (0.01, 0.1)
  workdir = tmp_path / "run"  # a copy: the other tests read the native run's attribution/
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("attribution"))
  summary = run.attribute(config, workdir)
  stats = json.loads((workdir / "attribution" / "stats.json").read_text())
  entries = json.loads((workdir / "attribution" / "targets.json").read_text())["targets"]
  pixel_nm = 2.18 * np.sqrt(192 * 160) / 64
  assert stats["protocol"] == summary["protocol"] == "paper" and stats["input_shape"] == [64, 64]
  np.testing.assert_allclose([stats["pixel_nm"], summary["pixel_nm"]], pixel_nm)
  assert entries and all(e["y"] % 10 == 0 and e["x"] % 10 == 0 and e["y"] < 64 and e["x"] < 64 for e in entries)
  assert all(e["window"]["height"] == e["window"]["width"] == 64 for e in entries)
  pixels = np.array([e["s_k_nm2"] for e in entries]) / pixel_nm**2  # whole resized pixels
  np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-6)
  assert pixels.max() <= 64 * 64


def test_attribute_needs_a_trained_run_and_a_valid_config(tmp_path, trained):
  with pytest.raises(FileNotFoundError, match="train first"):
    run.attribute(_config(), tmp_path)
  config = _config()
  config.attribution.crop = "tiles"
  with pytest.raises(ValueError, match="receptive_field"):
    run.attribute(config, trained)
