"""3D pretraining: the config variants, and one ``configs/dinov2_reg_3d.py:smoke`` run through the command line."""

import os

import numpy as np
import pytest

from medjax.reporting import read_metrics
from medjax.pretrain.validate import validate
from medjax.pretrain.loss_model import build_models
from tests.helpers import load_config, medjax

SMOKE_3D = "--config=configs/dinov2_reg_3d.py:smoke"


def load(variant=""):
    return load_config("dinov2_reg_3d", variant)


@pytest.mark.parametrize("variant", ["", "smoke", "demo"])
def test_3d_variants_are_valid_and_build_3d_backbones(variant):
    config = load(variant)
    validate(config)
    backbone = build_models(config).backbone
    assert backbone.spatial_dims == 3 and backbone.img_size == config.crops.global_size
    assert config.crops.global_size % config.model.patch_size == 0
    assert len(config.data.target_spacing) == 3 and len(set(config.data.target_spacing)) == 1  # isotropic


def test_3d_config_errors_are_one_sentence():
    config = load("demo")
    config.evals.final = True
    with pytest.raises(ValueError, match="read 2D slices"):
        validate(config)
    config = load("smoke")
    config.model.spatial_dims = 4
    with pytest.raises(ValueError, match="spatial_dims=4 must be 2"):
        validate(config)
    with pytest.raises(ValueError, match="Unknown variant 'vitb14'"):
        load("vitb14")


def test_smoke_3d_run_writes_a_checkpoint_with_a_finite_loss(tmp_path):
    proc = medjax(tmp_path, "--config.train.stop_at_step=3", config=SMOKE_3D)
    assert "volumes at 6x6x6 mm" in proc.stdout and "Pretraining finished at step 3" in proc.stdout
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert last["step"] == 3
    for key in ("loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss"):
        assert np.isfinite(last[key]), key
