"""Backbones, heads, the supervised CNN baselines and official-weight conversion."""

from medjax.models.cnns import build_cnn
from medjax.models.convert import backbone_params_from_state_dict, head_params_from_state_dict
from medjax.models.convert_cnn import load_cnn
from medjax.models.densenet import DenseNet
from medjax.models.heads import DINOHead
from medjax.models.pos_embed import interpolate_pos_embed
from medjax.models.resnet import ResNet
from medjax.models.vit import MODELS, VisionTransformer, build_backbone

__all__ = [
    "MODELS",
    "DINOHead",
    "DenseNet",
    "ResNet",
    "VisionTransformer",
    "backbone_params_from_state_dict",
    "build_backbone",
    "build_cnn",
    "head_params_from_state_dict",
    "interpolate_pos_embed",
    "load_cnn",
]
