"""Segmentation on frozen or fine-tuned backbone patch tokens (linear head, upsampling decoder); variants: demo,
smoke, and for 3D backbones (whole volumes) demo3d, smoke3d.

    python -m medjax.main --config=configs/segment.py:demo --workdir=runs/demo_segment \
        --config.segment.checkpoint_dir=runs/demo
    python -m medjax.main --config=configs/segment.py:demo3d --workdir=runs/demo3d_segment \
        --config.segment.checkpoint_dir=runs/demo3d  # a configs/dinov2_reg_3d.py:demo run

The backbone (model and normalisation) comes from the pretraining run's checkpoint (or from
official DINOv2 weights, config.segment.official_weights); this file sets the heads, the loss,
the label fractions and the data. Every key is documented in medjax/train/segment_config.py.
"""

from medjax.train.segment_config import segment_config


def get_config(variant: str = ""):
    return segment_config(variant, config_file="configs/segment.py")
