"""Input normalization: 8-bit gray -> float network input, the same in training, prediction and attribution."""

import jax.numpy as jnp

# CEM500K's statistics of gray in [0, 1]: the normalization its pretrained ResNet50 expects, and our default.
CEM500K_MEAN = 0.57287007
CEM500K_STD = 0.12740536


def normalize(images, *, mean: float = CEM500K_MEAN, std: float = CEM500K_STD):
  """Maps uint8 gray [..., H, W, C] to float32 (x / 255 - mean) / std."""
  return (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std
