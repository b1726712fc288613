"""The ``:smoke`` segmentation run that the run tests of this folder read (ViT heads and the U-Net baseline)."""

import contextlib
import io

import pytest

from medjax.segment import trainer as segment
from tests.helpers import load_config


@pytest.fixture(scope="session")
def segment_run(smoke_checkpoints, smoke_demo_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("segment")
    config = load_config("segment", "smoke")
    config.segment.checkpoint_dir = str(smoke_checkpoints)
    config.data.demo_dir = str(smoke_demo_dir)
    config.segment.step = 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = segment.run(config, str(workdir))
    return workdir, results, out.getvalue()
