"""Backbones, heads and official-weight conversion."""

from medjax.models.convert import backbone_params_from_state_dict, head_params_from_state_dict
from medjax.models.heads import DINOHead
from medjax.models.pos_embed import interpolate_pos_embed
from medjax.models.vit import MODELS, VisionTransformer, build_backbone

__all__ = [
    "MODELS",
    "DINOHead",
    "VisionTransformer",
    "backbone_params_from_state_dict",
    "build_backbone",
    "head_params_from_state_dict",
    "interpolate_pos_embed",
]
