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


def test_head_warm_up_trains_only_the_heads_then_releases_the_backbone(tmp_path):
    from medjax.pretrain.batches import BatchPlacer, pretrain_iterator
    from medjax.pretrain.trainer import build
    from tests.phantom import DemoSlices

    z = np.load(FIXTURE)
    path = tmp_path / "weights.npz"
    np.savez(path, **{k[3:]: z[k] for k in z.files if k.startswith("sd/")})
    config = _config()
    config.model.init_weights = str(path)
    config.model.head_warmup_epochs, config.train.epoch_length, config.optim.epochs = 1, 2, 3  # 2 frozen steps
    mesh = sharding.make_mesh()
    place = BatchPlacer(mesh, n_global=config.crops.n_global, n_local=config.crops.n_local)
    built = build(config, mesh, config.train.batch_size_per_device * mesh.size, place.shardings)
    batches = pretrain_iterator(config, DemoSlices(num_patients=2, slices_per_patient=4, size=48, seed=0),
                                config.train.batch_size_per_device, num_workers=0, process_index=0, process_count=1)
    state, start = built.state, jax.device_get(built.state)
    states = []
    for _ in range(3):
        state, _ = built.step_fn(state, place(next(batches)), *built.step_inputs)
        states.append(jax.device_get(state))
    for s in states[:2]:  # warm-up: the official backbone untouched in student and teacher; heads learn
        for which in (s.student, s.teacher):
            jax.tree.map(np.testing.assert_array_equal, which["backbone"], start.student["backbone"])
        jax.tree.map(np.testing.assert_array_equal, s.teacher["dino_head"], s.student["dino_head"])
    head_moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), states[1].student["dino_head"], start.student["dino_head"])
    assert max(jax.tree.leaves(head_moved)) > 1e-4
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), states[2].student["backbone"], start.student["backbone"])
    assert max(jax.tree.leaves(moved)) > 1e-6  # step 3: the backbone trains
    assert not np.array_equal(states[2].teacher["dino_head"]["mlp_0"]["kernel"],
                              states[2].student["dino_head"]["mlp_0"]["kernel"])  # the EMA is back
