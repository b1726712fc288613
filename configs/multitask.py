"""Multi-task: one backbone trained with a segmentation decoder and a classification head; variants: demo, smoke,
demo_cxr (lungs and the 3-class diagnosis of the synthetic chest X-rays; films without a diagnosis train the
lungs only), and for 3D backbones (whole volumes, one label per volume) demo3d, smoke3d.

    python -m medjax.main --config=configs/multitask.py:demo --workdir=runs/demo_multitask \
        --config.segment.checkpoint_dir=runs/demo
    python -m medjax.main --config=configs/multitask.py:demo3d --workdir=runs/demo3d_multitask \
        --config.segment.checkpoint_dir=runs/demo3d  # a configs/dinov2_reg_3d.py:demo run
    python -m medjax.main --config=configs/multitask.py:demo_cxr --workdir=runs/demo_cxr_multitask \
        --config.segment.checkpoint_dir=runs/demo_cxr  # a configs/dinov2_reg.py:demo_cxr run

The segmentation recipe (segment.py) with the classification head switched on
(config.segment.classification_weight > 0; the loss is dice_weight * Dice + ce_weight * CE
+ classification_weight * classification CE) and the backbone fine-tuned, so that the two
heads share what they train.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the recipes beside this file
import segment  # noqa: E402


def get_config(variant: str = ""):
    return segment.get_config(variant, multitask=True, config_file="configs/multitask.py")
