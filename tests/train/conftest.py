"""Fixtures shared by the trainer tests."""

import pytest

from tests.train.helpers import smoke_config, smoke_config_3d, write_pretraining_checkpoints


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
