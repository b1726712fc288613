"""DINO v1 objective (no iBOT, no KoLeo) on the same ViT and data; same variants as dinov2_reg.py."""

from medjax.train.pretrain_config import apply_variant, recipe


def get_config(variant: str = ""):
    return apply_variant(recipe(registers=0, ibot=False, koleo=False), variant or "", __file__)
