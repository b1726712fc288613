"""DINOv2 with 4 register tokens on 3D volumes (``config.model.spatial_dims = 3``): ViT-S/16 with cubic
patches, 2 x 96^3 + 8 x 48^3 crops of volumes resampled to 1 mm isotropic; variants: demo, smoke.

    python -m medjax.main --config=configs/dinov2_reg_3d.py:demo --workdir=runs/demo3d
    python -m medjax.main --config=configs/dinov2_reg_3d.py --workdir=runs/knee3d \
        --config.data.manifest=knee_mri.csv

The dinov2_reg.py recipe with cubes for squares: cubic patches and crops, volumes resampled to
isotropic voxels (``config.data.target_spacing``) so a cube of voxels is a cube of tissue. ``smoke``
and ``demo`` are the 2D variants' scaled-down runs (schedules, teacher, head, batch) with 3D crop and
patch sizes.
"""

from __future__ import annotations

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the recipes beside this file
import config_lib  # noqa: E402
import dinov2_reg  # noqa: E402

VARIANTS = ("", "demo", "smoke")


def get_config(variant: str = "", *, registers: int = 4) -> ml_collections.ConfigDict:
    variant = config_lib.check_variant(variant, VARIANTS, "configs/dinov2_reg_3d.py")
    return apply_variant_3d(recipe_3d(registers=registers), variant)


def recipe_3d(*, registers: int = 4) -> ml_collections.ConfigDict:
    """ViT-S/16 on 2 x 96^3 + 8 x 48^3 crops of volumes at 1 mm isotropic: 216 + 27 tokens per crop."""
    c = dinov2_reg.recipe(registers=registers)
    c.model.spatial_dims = 3
    c.model.patch_size = 16
    c.crops.global_size = 96
    c.crops.local_size = 48
    c.train.batch_size_per_device = 32
    c.data.target_spacing = (1.0, 1.0, 1.0)
    c.data.num_workers = 8  # cutting 10 resized cubes per volume is the host's work
    c.data.volumes_in_memory = 64
    return c


def apply_variant_3d(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """``demo`` (minutes on a laptop CPU) and ``smoke`` (seconds, for tests) of the 3D recipe."""
    if not variant:
        return c
    dinov2_reg.apply_variant(c, variant)
    # The evaluations read 2D slices; a 3D run has none.
    c.evals.every, c.evals.final = 0, False
    if variant == "demo":
        # The demo volumes (128 x 128 x 16 at 1.75 x 1.75 x 3 mm, a 48 mm slab) at 3 mm isotropic:
        # 75 x 75 x 16 voxels. Patch 8: 4^3 = 64 tokens per global crop, 2^3 = 8 per local crop.
        c.model.patch_size = 8
        c.crops.global_size, c.crops.local_size = 32, 16
        c.data.target_spacing = (3.0, 3.0, 3.0)
    else:
        # 4 patients, 48 x 48 x 8 at 4.67 x 4.67 x 6 mm -> 6 mm isotropic: 37 x 37 x 8 voxels.
        c.model.patch_size = 6
        c.crops.global_size, c.crops.local_size = 24, 12
        c.data.demo_slices = 8
        c.data.target_spacing = (6.0, 6.0, 6.0)
    return c
