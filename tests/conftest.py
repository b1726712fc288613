"""Test-wide settings: float32 matmuls on CPU, absl flags parsed (Grain workers need them)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
