"""Continued pretraining from official DINOv2 weights: config.model.init_weights."""

import jax
import numpy as np
import pytest

from medjax import sharding
from medjax.models.convert import load_official
from medjax import optim
from medjax.pretrain.trainer import init_sharded_state, start_from_official
from medjax.pretrain.loss_model import build_models
from tests.helpers import smoke_config

FIXTURE = "tests/fixtures/vit_reg4_c1.npz"  # a 48-dim, 2-block, 4-register official backbone at 42 px


def _config():
    config = smoke_config(embed_dim=48, depth=2, num_heads=3, patch_size=14)
    config.crops.global_size, config.crops.local_size = 42, 14
    return config


def test_student_and_teacher_start_from_the_official_backbone(tmp_path):
    z = np.load(FIXTURE)
    path = tmp_path / "weights.npz"
    np.savez(path, **{k[3:]: z[k] for k in z.files if k.startswith("sd/")})
    config = _config()
    models = build_models(config)
    mesh = sharding.make_mesh()
    state, shardings = init_sharded_state(models, config, jax.random.PRNGKey(0), optim.make_adam(0.9, 0.999), mesh)
    head_before = jax.device_get(state.student["dino_head"])
    state = start_from_official(state, shardings, models, str(path))
    _, want = load_official(str(path), model=models.backbone)
    for which in (state.student, state.teacher):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(which["backbone"]), want)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.student["dino_head"]), head_before)
    x = z["x_nchw"].transpose(0, 2, 3, 1)
    out = models.backbone.apply({"params": state.teacher["backbone"]}, x, np.asarray(z["masks"]), train=False)
    np.testing.assert_allclose(out["x_norm_clstoken"], z["out/x_norm_clstoken"], atol=1e-4)


def test_missing_or_mismatched_weights_are_one_sentence(tmp_path):
    config = _config()
    models = build_models(config)
    mesh = sharding.make_mesh()
    state, shardings = init_sharded_state(models, config, jax.random.PRNGKey(0), optim.make_adam(0.9, 0.999), mesh)
    with pytest.raises(FileNotFoundError, match="config.model.init_weights"):
        start_from_official(state, shardings, models, str(tmp_path / "nope.npz"))
    z = np.load(FIXTURE)
    path = tmp_path / "other.npz"
    np.savez(path, **{k[3:]: z[k] for k in z.files if k.startswith("sd/") and "blocks.1." not in k})
    with pytest.raises(ValueError):
        start_from_official(state, shardings, models, str(path))
