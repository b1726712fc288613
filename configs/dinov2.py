"""DINOv2 without register tokens (ViT-S/14 recipe); same variants as dinov2_reg.py."""

from medjax.train.pretrain_config import apply_variant, recipe


def get_config(variant: str = ""):
    return apply_variant(recipe(registers=0), variant or "", __file__)
