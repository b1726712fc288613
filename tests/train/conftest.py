"""Fixtures shared by the trainer tests."""

import pytest

from tests.train.helpers import smoke_config, write_pretraining_checkpoints


@pytest.fixture(scope="session")
def smoke_checkpoints(tmp_path_factory):
    """A directory shaped like a ``:smoke`` pretraining run with checkpoints at steps 1 and 2 (random weights)."""
    return write_pretraining_checkpoints(tmp_path_factory.mktemp("smoke_checkpoints"), smoke_config())


@pytest.fixture(scope="session")
def smoke_demo_dir(tmp_path_factory):
    """One folder for the ``:smoke`` evaluation configs' demo data (12 patients), written once per session."""
    return tmp_path_factory.mktemp("smoke_demo_data")
