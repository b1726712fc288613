"""Small configs for trainer tests."""

from medjax.train.pretrain_config import apply_variant, recipe


def smoke_config(registers: int = 4, **model_overrides):
    """The ``:smoke`` pretraining config, with optional ``config.model`` overrides."""
    config = apply_variant(recipe(registers=registers), "smoke", "configs/dinov2_reg.py")
    for key, value in model_overrides.items():
        config.model[key] = value
    return config


def smoke_config_3d(registers: int = 4):
    """The ``configs/dinov2_reg_3d.py:smoke`` pretraining config (a 3D ViT, patch 6, 24^3 global crops)."""
    from medjax.train.pretrain_config3d import apply_variant_3d, recipe_3d

    return apply_variant_3d(recipe_3d(registers=registers), "smoke", "configs/dinov2_reg_3d.py")


def write_pretraining_checkpoints(workdir, config, steps=(1, 2)):
    """Checkpoints in a pretraining run's format (train state with the teacher backbone, and the run's
    config in ``meta``) with different random weights per step, written directly: what the evaluation
    trainers read, in seconds rather than a training run's minute."""
    import jax

    from medjax.checkpoint import Checkpointer, dumps_config, tree_fingerprint
    from medjax.train.ssl_model import build_models, init_params

    models = build_models(config)
    init = jax.jit(lambda key: init_params(models, key, config))  # one compile; eager init compiles op by op
    ckpt = Checkpointer(str(workdir), async_save=False)
    for k, step in enumerate(steps):
        params = init(jax.random.PRNGKey(100 + k))
        state = {"student": params, "teacher": params}
        ckpt.save(step, state, None, {"config": dumps_config(config), "fingerprint": tree_fingerprint(state)})
    ckpt.close()
    return workdir
