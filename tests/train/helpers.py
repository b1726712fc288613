"""Small configs for trainer tests."""

from medjax.train.pretrain_config import apply_variant, recipe


def smoke_config(registers: int = 4, **model_overrides):
    """The ``:smoke`` pretraining config, with optional ``config.model`` overrides."""
    config = apply_variant(recipe(registers=registers), "smoke", "configs/dinov2_reg.py")
    for key, value in model_overrides.items():
        config.model[key] = value
    return config
