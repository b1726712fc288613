"""DINOv2 without register tokens: the dinov2_reg.py recipe (ViT-S/14) with none; same variants.

    python -m medjax.main --config=configs/dinov2.py:demo --workdir=runs/demo_noreg
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the recipes beside this file
import dinov2_reg  # noqa: E402


def get_config(variant: str = ""):
    return dinov2_reg.get_config(variant, registers=0, config_file="configs/dinov2.py")
