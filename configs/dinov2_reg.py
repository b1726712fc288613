"""DINOv2 with 4 register tokens (ViT-S/14 recipe); variants: demo, smoke, bench, vits14..vitg14.

    python -m medjax.main --config=configs/dinov2_reg.py:demo --workdir=runs/demo
"""

from medjax.train.pretrain_config import apply_variant, recipe


def get_config(variant: str = ""):
    return apply_variant(recipe(registers=4), variant or "", __file__)
