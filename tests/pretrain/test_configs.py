"""Every config file and variant builds a valid config and model; variants change what they say."""


import pytest

from medjax.models.backbone import backbone_kwargs
from medjax.pretrain.loss_model import build_models
from medjax.pretrain.validate import validate
from tests.helpers import load_config as load, load_config_module

VARIANTS = load_config_module("dinov2_reg").VARIANTS


@pytest.mark.parametrize("name", ["dinov2_reg", "dinov2", "dino"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_valid_and_builds(name, variant):
    config = load(name, variant)
    validate(config)
    models = build_models(config)
    assert models.backbone.img_size == config.crops.global_size
    assert config.crops.global_size <= config.data.demo_image_size  # the demo fallback fits the crops


def test_recipe_defaults_are_the_official_ones():
    c = load("dinov2_reg")
    assert (c.model.arch, c.model.patch_size, c.model.num_register_tokens) == ("vit_small", 14, 4)
    assert (c.crops.global_size, c.crops.local_size, c.crops.n_global, c.crops.n_local) == (224, 96, 2, 8)
    assert (c.loss.dino_weight, c.loss.ibot_weight, c.loss.koleo_weight) == (1.0, 1.0, 0.1)
    assert (c.teacher.warmup_teacher_temp, c.teacher.teacher_temp, c.teacher.momentum_teacher) == (0.04, 0.07, 0.992)
    assert (c.optim.base_lr, c.optim.weight_decay, c.optim.weight_decay_end, c.optim.layerwise_decay) == (
        0.004, 0.04, 0.4, 0.9)
    assert c.head.n_prototypes == 65536 and c.model.layerscale == 1e-5
    assert c.model.interpolate_antialias and c.model.interpolate_offset == 0.0  # as the released _reg models


def test_variants_differ_where_they_should():
    assert load("dinov2", "").model.num_register_tokens == 0
    dino = load("dino", "")
    assert dino.loss.ibot_weight == 0 and dino.loss.koleo_weight == 0 and dino.loss.mask_probability == 0
    large = load("dinov2_reg", "vitl14")
    assert (large.model.arch, large.head.n_prototypes, large.loss.centering) == ("vit_large", 131072, "sinkhorn_knopp")
    giant = load("dinov2_reg", "vitg14")
    assert backbone_kwargs(giant)["ffn_layer"] == "swiglu"
    bench = load("dinov2_reg", "bench")
    assert (bench.model.embed_dim, bench.model.depth, bench.model.num_heads) == (192, 4, 3)
    assert (bench.crops.global_size, bench.crops.local_size, bench.crops.n_local) == (112, 56, 4)
    assert bench.train.batch_size_per_device == 16 and bench.head.n_prototypes == 4096
