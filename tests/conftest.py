"""Test-wide settings (float32 matmuls on CPU, absl flags parsed: Grain workers need them) and the
session fixtures shared by the trainer tests."""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent XLA compilation cache per test session, set before JAX loads: the command-line runs the
# tests start (each a fresh process) compile the same :smoke steps again, and with the cache each compiles once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="medjax_tests_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


from tests.helpers import smoke_config, smoke_config_3d, write_pretraining_checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def smoke_checkpoints(tmp_path_factory):
    """A directory shaped like a ``:smoke`` pretraining run with checkpoints at steps 1 and 2 (random weights)."""
    return write_pretraining_checkpoints(tmp_path_factory.mktemp("smoke_checkpoints"), smoke_config())


@pytest.fixture(scope="session")
def smoke_checkpoints_3d(tmp_path_factory):
    """The same for the 3D ``configs/dinov2_reg_3d.py:smoke`` model (spatial_dims=3)."""
    return write_pretraining_checkpoints(tmp_path_factory.mktemp("smoke_checkpoints_3d"), smoke_config_3d())


@pytest.fixture(scope="session")
def smoke_demo_dir(tmp_path_factory):
    """One folder for the ``:smoke`` evaluation configs' demo data (12 patients), written once per session."""
    return tmp_path_factory.mktemp("smoke_demo_data")
