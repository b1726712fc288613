"""Writes tests/fixtures/train_reference.npz from the reference DINOv2 code: schedules and param groups.

Run by hand (torch is not a medjax dependency):

    pip install torch==2.13.0 && pip install --no-deps dinov2==0.0.1.dev2 omegaconf
    python tests/reference/make_train_fixtures.py

* ``CosineScheduler`` arrays for the lr (with warm-up), the last-layer lr (first
  epoch zeroed, as ssl_meta_arch does), weight decay, teacher momentum and teacher
  temperature, on a short run;
* the lr / weight-decay multipliers and last-layer flags that
  ``get_params_groups_with_decay`` gives each parameter of a small ViT and DINO head.
"""

import json
import os

import numpy as np
from dinov2.layers import DINOHead
from dinov2.models import vision_transformer as vits
from dinov2.utils.param_groups import get_params_groups_with_decay
from dinov2.utils.utils import CosineScheduler

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "train_reference.npz")

EPOCHS, EPOCH_LEN = 10, 7
LR, MIN_LR, WARMUP = 0.002, 1e-6, 2
WD, WD_END = 0.04, 0.4
MOM, MOM_END = 0.992, 1.0
TEMP_WARM, TEMP, TEMP_EPOCHS = 0.04, 0.07, 3
FREEZE = 1
DEPTH, DECAY, PATCH_MULT = 3, 0.9, 0.2


def schedules():
    total = EPOCHS * EPOCH_LEN
    lr = CosineScheduler(LR, MIN_LR, total, warmup_iters=WARMUP * EPOCH_LEN, start_warmup_value=0)
    last = CosineScheduler(LR, MIN_LR, total, warmup_iters=WARMUP * EPOCH_LEN, start_warmup_value=0)
    last.schedule[: FREEZE * EPOCH_LEN] = 0  # as ssl_meta_arch / train.py
    wd = CosineScheduler(WD, WD_END, total)
    mom = CosineScheduler(MOM, MOM_END, total)
    temp = CosineScheduler(
        TEMP, TEMP, TEMP_EPOCHS * EPOCH_LEN, warmup_iters=TEMP_EPOCHS * EPOCH_LEN, start_warmup_value=TEMP_WARM
    )
    steps = range(total + 3)  # past the end too
    return {name: np.array([s[i] for i in steps], np.float64) for name, s in
            dict(lr=lr, last_layer_lr=last, weight_decay=wd, teacher_momentum=mom, teacher_temp=temp).items()}


def param_groups():
    modules = {
        "backbone": vits.DinoVisionTransformer(
            img_size=28, patch_size=7, embed_dim=48, depth=DEPTH, num_heads=3, init_values=1e-5, block_chunks=0
        ),
        "dino_head": DINOHead(in_dim=48, out_dim=32, hidden_dim=64, bottleneck_dim=16),
    }
    rows = []
    for prefix, module in modules.items():
        for g in get_params_groups_with_decay(module, lr_decay_rate=DECAY, patch_embed_lr_mult=PATCH_MULT):
            rows.append([f"{prefix}.{g['name']}", g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]])
    return rows


if __name__ == "__main__":
    arrays = schedules()
    arrays["param_groups_json"] = np.array(json.dumps(param_groups()))
    np.savez(OUT, **arrays)
    print(f"wrote {OUT}")
