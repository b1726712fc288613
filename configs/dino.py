"""The DINO v1 objective (no iBOT, no KoLeo, no registers) on the dinov2_reg.py recipe's ViT and data;
same variants.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the recipes beside this file
import dinov2_reg  # noqa: E402


def get_config(variant: str = ""):
    return dinov2_reg.get_config(variant, registers=0, ibot=False, koleo=False, config_file="configs/dino.py")
