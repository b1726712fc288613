"""DINOv2 with 4 register tokens on 3D volumes (ViT-S/16, 2 x 96^3 + 8 x 48^3 crops at 1 mm); variants: demo, smoke.

    python -m medjax.main --config=configs/dinov2_reg_3d.py:demo --workdir=runs/demo3d
    python -m medjax.main --config=configs/dinov2_reg_3d.py --workdir=runs/knee3d \
        --config.data.manifest=knee_mri.csv
"""

from medjax.train.pretrain_config3d import apply_variant_3d, recipe_3d


def get_config(variant: str = ""):
    return apply_variant_3d(recipe_3d(registers=4), variant or "", __file__)
