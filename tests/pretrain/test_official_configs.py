"""The official train configs (configs/train/vitl14.yaml, vitl16_short.yaml, vitg14.yaml merged over
ssl_default_config.yaml) reproduced key by key by configs/dinov2.py's variants of the same names.

The table of official values is generated from the official files by
tests/reference/make_official_config_table.py. Every official key is either compared with the medjax
key that does its job, or listed in ``NOT_TRAINING_KEYS`` with the reason it has no counterpart; a key
the official files gain and this table does not place fails the test.
"""

import json
import pathlib

import pytest

from tests.helpers import load_config

TABLE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "official_train_configs.json"

FFN = {"mlp": "mlp", "swiglu": "swiglu", "swiglufused": "swiglu"}  # both official names build SwiGLUFFNFused
CENTERING = {"centering": "softmax", "sinkhorn_knopp": "sinkhorn_knopp"}

# official key -> (medjax key, official value -> medjax value)
SAME = {
    "dino.loss_weight": "loss.dino_weight",
    "dino.head_n_prototypes": "head.n_prototypes",
    "dino.head_bottleneck_dim": "head.bottleneck_dim",
    "dino.head_nlayers": "head.nlayers",
    "dino.head_hidden_dim": "head.hidden_dim",
    "dino.koleo_loss_weight": "loss.koleo_weight",
    "ibot.loss_weight": "loss.ibot_weight",
    "ibot.mask_sample_probability": "loss.mask_probability",
    "ibot.separate_head": "head.ibot_separate_head",
    "ibot.head_n_prototypes": "head.ibot_n_prototypes",
    "ibot.head_bottleneck_dim": "head.ibot_bottleneck_dim",
    "ibot.head_nlayers": "head.ibot_nlayers",
    "ibot.head_hidden_dim": "head.ibot_hidden_dim",
    "train.batch_size_per_gpu": "train.batch_size_per_device",
    "train.seed": "seed",
    "train.OFFICIAL_EPOCH_LENGTH": "train.epoch_length",
    "student.arch": "model.arch",
    "student.patch_size": "model.patch_size",
    "student.drop_path_rate": "model.drop_path_rate",
    "student.layerscale": "model.layerscale",
    "student.drop_path_uniform": "model.drop_path_uniform",
    "student.pretrained_weights": "model.init_weights",
    "student.num_register_tokens": "model.num_register_tokens",
    "student.interpolate_antialias": "model.interpolate_antialias",
    "student.interpolate_offset": "model.interpolate_offset",
    "teacher.momentum_teacher": "teacher.momentum_teacher",
    "teacher.final_momentum_teacher": "teacher.final_momentum_teacher",
    "teacher.warmup_teacher_temp": "teacher.warmup_teacher_temp",
    "teacher.teacher_temp": "teacher.teacher_temp",
    "teacher.warmup_teacher_temp_epochs": "teacher.warmup_teacher_temp_epochs",
    "optim.epochs": "optim.epochs",
    "optim.weight_decay": "optim.weight_decay",
    "optim.weight_decay_end": "optim.weight_decay_end",
    "optim.base_lr": "optim.base_lr",
    "optim.warmup_epochs": "optim.warmup_epochs",
    "optim.min_lr": "optim.min_lr",
    "optim.clip_grad": "optim.clip_grad",
    "optim.freeze_last_layer_epochs": "optim.freeze_last_layer_epochs",
    "optim.scaling_rule": "optim.scaling_rule",
    "optim.patch_embed_lr_mult": "optim.patch_embed_lr_mult",
    "optim.layerwise_decay": "optim.layerwise_decay",
    "optim.adamw_beta1": "optim.adamw_beta1",
    "optim.adamw_beta2": "optim.adamw_beta2",
    "crops.global_crops_scale": "crops.global_scale",
    "crops.local_crops_number": "crops.n_local",
    "crops.local_crops_scale": "crops.local_scale",
    "crops.global_crops_size": "crops.global_size",
    "crops.local_crops_size": "crops.local_size",
}
CONVERTED = {
    "student.ffn_layer": ("model.ffn_layer", FFN.get),
    "train.centering": ("loss.centering", CENTERING.get),
}
# Official keys with no medjax counterpart, and why none is needed.
NOT_TRAINING_KEYS = {
    "MODEL.WEIGHTS": "weights an official evaluation loads; medjax's probe reads --config.probe.checkpoint_dir",
    "compute_precision.": "FSDP mixed-precision settings (fp16 with a loss scaler); medjax computes in "
                          "config.model.dtype (float32, or bfloat16 with float32 parameters: no loss scaling)",
    "train.dataset_path": "ImageNet; medjax reads config.data.manifest",
    "train.output_dir": "medjax writes to --workdir",
    "train.saveckp_freq": "checkpoint cadence (every 20 epochs); medjax: config.train.checkpoint_every steps",
    "train.num_workers": "data-loader processes of the machine; medjax: config.data.num_workers",
    "train.cache_dataset": "ImageNet loader option; medjax: config.data.cache_dir",
    "student.block_chunks": "FSDP wrapping of blocks in chunks; jax.sharding splits each parameter instead",
    "student.qkv_bias": "always on in medjax's ViT (the only value the official configs use)",
    "student.proj_bias": "always on in medjax's ViT (the only value the official configs use)",
    "student.ffn_bias": "always on in medjax's ViT (the only value the official configs use)",
    "optim.lr": "0 in the files: the trainer computes it from base_lr and scaling_rule (as medjax does)",
    "evaluation.eval_period_iterations": "the official saves teacher weights for a later evaluation; "
                                         "medjax: config.evals.every",
}


def _official():
    return json.loads(TABLE.read_text())["configs"]


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def _reason(key: str):
    return next((why for prefix, why in NOT_TRAINING_KEYS.items() if key == prefix or
                 (prefix.endswith(".") and key.startswith(prefix))), None)


def compare(official: dict, config) -> tuple[list, list, int]:
    """Official keys nothing places, ``key=official vs medjax`` for each difference, keys compared."""
    unplaced, differ, compared = [], [], 0
    for key, value in official.items():
        if key in SAME:
            ours, want = _get(config, SAME[key]), value
        elif key in CONVERTED:
            target, convert = CONVERTED[key]
            ours, want = _get(config, target), convert(value)
        elif key == "ibot.mask_ratio_min_max":
            ours, want = [config.loss.mask_ratio_min, config.loss.mask_ratio_max], value
        elif _reason(key):
            continue
        else:
            unplaced.append(key)
            continue
        compared += 1
        ours = list(ours) if isinstance(ours, tuple) else ours
        same = ours == pytest.approx(want, rel=1e-12) if isinstance(want, (int, float, list)) else ours == want
        if not same:
            differ.append(f"{key}={value!r} vs {ours!r}")
    return unplaced, differ, compared


@pytest.mark.parametrize("name", ["vitl14", "vitl16_short", "vitg14"])
def test_official_train_config_key_by_key(name):
    # configs/dinov2.py: the official train configs have no registers.
    unplaced, differ, compared = compare(_official()[name], load_config("dinov2", name))
    assert not unplaced, f"official keys medjax does not place: {unplaced}"
    assert not differ, f"{name}: {differ}"
    assert compared == 51  # every official training key (88 in all, 37 are infrastructure)


def test_register_variant_differs_only_in_registers_and_interpolation():
    plain, reg = load_config("dinov2", "vitl14").to_dict(), load_config("dinov2_reg", "vitl14").to_dict()
    diff = {f"{s}.{k}" for s in plain if isinstance(plain[s], dict) for k in plain[s] if plain[s][k] != reg[s][k]}
    assert diff == {"model.num_register_tokens", "model.interpolate_antialias", "model.interpolate_offset"}


def test_a_changed_value_is_reported_with_its_official_key():
    official = _official()["vitl14"]
    config = load_config("dinov2", "vitl14")
    config.optim.base_lr, config.crops.local_size, config.model.ffn_layer = 4e-3, 96, "mlp"
    _, differ, _ = compare(official, config)
    assert differ == ["student.ffn_layer='swiglufused' vs 'mlp'", "optim.base_lr=0.0002 vs 0.004",
                      "crops.local_crops_size=98 vs 96"]
    _, differ, _ = compare(official, load_config("dinov2", ""))  # the ViT-S/14 default is not ViT-L/14
    assert "student.arch='vit_large' vs 'vit_small'" in differ
