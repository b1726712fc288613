"""Test-wide settings (float32 matmuls on CPU, absl flags parsed: Grain workers need them) and the
session fixtures shared by the trainer tests."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent XLA compilation cache per test session, set before JAX loads: the command-line runs the
# tests start (each a fresh process) compile the same :smoke steps again, and with the cache each compiles once.
# The first process to load this file (pytest-xdist's controller, or the only process) makes the folder and
# removes it at exit; the worker processes and every subprocess inherit it through the environment.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="medjax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
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


# The slowest files (seconds in one process, `python -m pytest -n 0 --durations=0`), longest first. They run
# first: with `--dist loadfile` a file goes whole to one worker, and a long one picked up last keeps one core
# busy while the other has nothing left. `--no-loadscope-reorder` (pyproject.toml) keeps this order.
SLOW_FIRST = (
    "tests/test_sharding.py",  # ~190 s, three subprocesses of its own
    "tests/pretrain/test_pretrain_run.py",  # ~150 s
    "tests/probe/test_probe_run.py",
    "tests/mae/test_mae_run.py",
    "tests/finetune/test_cnn_baselines.py",
    "tests/test_public_datasets.py",
    "tests/test_notebook.py",
    "tests/segment/test_segment_3d.py",
    "tests/finetune/test_finetune_run.py",
    "tests/pretrain/test_pretrain_3d.py",
    "tests/segment/test_segment_run.py",
    "tests/finetune/test_finetune_3d.py",
    "tests/finetune/test_mae_recipe.py",
    "tests/test_dry_run.py",
    "tests/models/test_mae.py",  # ~30 s; the rest take less and keep their collection order
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_FIRST)))  # stable sort
