"""Masked autoencoder (MAE) pretraining: the official recipe (facebookresearch/mae, main_pretrain.py and
PRETRAIN.md: ViT-B/16, mask ratio 0.75, normalised-pixel loss, 800 epochs with 40 of warm-up) key by key,
and its variants.

    python -m medjax.main --config=configs/mae.py:demo --workdir=runs/mae_demo

Variants: demo (minutes on a laptop CPU, then MAE vs random init), demo_cxr (the same on the synthetic chest
X-rays, no flips), demo3d (3D volumes), smoke (seconds,
for tests), bench (the benchmark model), vitb16, vitl16, vith14 (the official sizes). The encoder is
medjax's ViT (``config.model``, the same keys as configs/dinov2_reg.py), so every evaluation job opens an
MAE run as it opens a DINOv2 one.
"""

from __future__ import annotations

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared pieces beside this file
import config_lib  # noqa: E402

VARIANTS = ("", "demo", "demo_cxr", "demo3d", "smoke", "bench", "vitb16", "vitl16", "vith14")
SIZES = {"vitb16": ("vit_base", 16), "vitl16": ("vit_large", 16), "vith14": ("vit_huge", 14)}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    variant = config_lib.check_variant(variant, VARIANTS, "configs/mae.py")
    return apply_variant(recipe(), variant)


def recipe() -> ml_collections.ConfigDict:
    """ViT-B/16 at 224 px, decoder 512 x 8 blocks x 16 heads, mask 0.75, normalised-pixel loss."""
    c = ml_collections.ConfigDict()
    c.mode = "mae"  # the job: MAE pretraining (medjax/mae)
    c.seed = 0  # seeds the initial weights, the data order, the augmentations and the masks
    # True: resume a run although training settings (lr, schedule, batch, data, ...) changed since its
    # checkpoint, with a warning naming each; False: such a resume is refused.
    c.allow_config_change = False

    # The encoder: medjax's ViT with timm's blocks (no LayerScale), as the official MAE.
    c.model = ml_collections.ConfigDict()
    c.model.arch = "vit_base"  # vit_tiny | vit_small | vit_base | vit_large | vit_huge
    c.model.embed_dim = ml_collections.config_dict.placeholder(int)  # explicit sizes override the arch's
    c.model.depth = ml_collections.config_dict.placeholder(int)  # transformer blocks; None = the arch's
    c.model.num_heads = ml_collections.config_dict.placeholder(int)  # attention heads per block; None = the arch's
    c.model.patch_size = 16  # side of the square patch each token covers, in pixels
    c.model.in_chans = 1  # grayscale slices
    c.model.num_register_tokens = 0  # the official MAE has none
    c.model.ffn_layer = "mlp"  # block MLP: mlp | swiglu
    c.model.layerscale = 0.0  # none, as timm's blocks
    c.model.drop_path_rate = 0.0  # stochastic depth: probability a block's residual branch is dropped
    c.model.drop_path_uniform = False  # True: the same drop-path rate in every block; False: rising with depth
    c.model.interpolate_antialias = False  # antialiased resizing of the position table
    c.model.interpolate_offset = 0.1  # offset added before resizing the position table
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params and the loss stay float32)
    c.model.remat = False  # recompute block activations in the backward pass (see configs/dinov2_reg.py)
    # Official MAE weights (.pth/.npz/.safetensors: a full MaskedAutoencoderViT, or an encoder-only
    # mae_pretrain_vit_*.pth whose decoder then starts fresh) to continue pretraining from; "" = random init.
    c.model.init_weights = ""
    c.model.spatial_dims = 2  # 2: slices; 3: volumes (cubic patches, a 3D sin-cos table)

    c.decoder = ml_collections.ConfigDict()
    c.decoder.embed_dim = 512  # width of the MAE decoder
    c.decoder.depth = 8  # transformer blocks of the decoder
    c.decoder.num_heads = 16  # attention heads per decoder block

    c.mae = ml_collections.ConfigDict()
    c.mae.mask_ratio = 0.75  # share of patches hidden from the encoder
    c.mae.norm_pix_loss = True  # target = each patch normalised by its mean and (unbiased) variance

    c.optim = ml_collections.ConfigDict()
    c.optim.epochs = 800  # length of the run in epochs (train.epoch_length steps each)
    c.optim.warmup_epochs = 40  # epochs of the learning rate's linear warm-up
    c.optim.base_lr = 1.5e-4  # blr: lr = base_lr * global batch / 256
    c.optim.min_lr = 0.0  # learning rate at the end of the half-cycle cosine
    c.optim.weight_decay = 0.05  # none on biases and norms (1-D params); the sin-cos tables are frozen
    c.optim.adamw_beta1 = 0.9  # AdamW first-moment decay
    c.optim.adamw_beta2 = 0.95  # AdamW second-moment decay
    c.optim.clip_grad = 0.0  # 0 = none, as the official

    # One view per image: random resized crop (bicubic) + horizontal flip, normalised.
    c.crops = ml_collections.ConfigDict()
    c.crops.global_size = 224  # the model's input side (a cube's in 3D)
    c.crops.scale = (0.2, 1.0)  # area range of the random resized crop, as a fraction of the image
    c.crops.ratio = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio range of the random resized crop
    c.crops.flip_p = 0.5  # probability of a left-right flip
    c.crops.mean = (0.449,)  # per-channel mean subtracted from the normalised images
    c.crops.std = (0.226,)  # per-channel standard deviation the images are divided by

    c.train = ml_collections.ConfigDict()
    c.train.batch_size_per_device = 64  # images per device per step (global batch = this x devices)
    c.train.epoch_length = 0  # iterations per epoch; 0 = one pass over the training images (official)
    c.train.log_every = 20  # steps between metric lines (metrics.jsonl, TensorBoard, progress)
    c.train.checkpoint_every = 1000  # steps between checkpoints
    c.train.keep_checkpoints = 3  # checkpoints kept on disk (the oldest are deleted)
    c.train.plot_every = 1000  # also redraws reconstructions.png
    c.train.reconstructions = 4  # val images shown masked / reconstructed / original
    c.train.stop_at_step = -1  # >= 0: stop (and checkpoint) there; schedules still span the whole run

    c.data = config_lib.data_config()
    c.evals = config_lib.evals_config()
    c.mesh = config_lib.mesh_config()
    c.distributed = config_lib.distributed_config()
    return c


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    if variant in SIZES:
        c.model.arch, c.model.patch_size = SIZES[variant]
    elif variant == "demo":
        # The DINOv2 demo's encoder (ViT-Tiny width, 6 blocks, patch 14 at 112 px: 64 patches, 16 seen) on the
        # demo's 128 px slices, a 2-block decoder; 16 passes over the 1344 training slices (672 steps of 32).
        # The short run takes larger steps than the official blr (still scaled by batch): peak lr 1.25e-3.
        _scale_down(c, embed=192, depth=6, heads=3, patch=14, size=112, decoder=(128, 2, 4), batch=32, epochs=16)
        c.optim.base_lr = 1e-2
        config_lib.use_demo_data(c.data)
        c.evals.final = True
        c.evals.label_column = config_lib.DEMO_EVAL_LABEL
        c.evals.compare_runs = "runs/demo"  # the README's DINOv2 demo run, when it is there
        c.train.log_every = 21
        c.train.checkpoint_every = c.train.plot_every = 168
    elif variant == "demo_cxr":
        # The demo's model on the chest X-ray demo's 128 px films (about 75 in train, 2-3 steps of 32 per pass):
        # 150 passes, about 350 steps. No left-right flips: a chest film is not symmetric (heart, aortic knob
        # and gastric bubble on the patient's left). Ends with MAE vs random init on the 3-class diagnosis.
        _scale_down(c, embed=192, depth=6, heads=3, patch=14, size=112, decoder=(128, 2, 4), batch=32, epochs=150)
        c.optim.base_lr = 1e-2
        c.crops.flip_p = 0.0
        config_lib.use_demo_cxr_data(c.data)
        c.evals.final = True
        c.evals.label_column = "diagnosis"
        c.train.log_every = 20
        c.train.checkpoint_every = c.train.plot_every = 100
    elif variant == "demo3d":
        # The 3D demo volumes at 3 mm isotropic (75 x 75 x 16 voxels), 32^3 cubes of 8^3 patches: 64 tokens.
        # 84 training volumes: 5 steps per pass, 60 passes (300 steps, about 1 min on 2 CPU cores).
        _scale_down(c, embed=192, depth=6, heads=3, patch=8, size=32, decoder=(96, 2, 4), batch=16, epochs=60)
        c.optim.base_lr = 1e-2
        c.model.spatial_dims = 3
        c.data.target_spacing = (3.0, 3.0, 3.0)
        config_lib.use_demo_data(c.data)
        c.train.checkpoint_every = c.train.plot_every = 50
    elif variant == "smoke":
        _scale_down(c, embed=32, depth=2, heads=2, patch=7, size=28, decoder=(16, 1, 2), batch=4, epochs=3)
        c.train.epoch_length = 2
        c.data.demo_patients = 4
        c.data.demo_slices = 4
        c.data.demo_image_size = 48
        c.data.num_workers = 0
        c.train.log_every = 2
        c.train.checkpoint_every = 3
        c.train.plot_every = 6
        c.train.reconstructions = 2
    elif variant == "bench":
        # ViT-Tiny/16 at 224 px with the official decoder, batch 16: the benchmark step.
        _scale_down(c, embed=192, depth=12, heads=3, patch=16, size=224, decoder=(512, 8, 16), batch=16, epochs=1)
        c.train.epoch_length = 50
        c.data.demo_image_size = 256
        c.data.num_workers = 0
    return c


def _scale_down(c, *, embed, depth, heads, patch, size, decoder, batch, epochs):
    """The same recipe at a size that fits a CPU; the warm-up keeps its official share (5 %)."""
    c.model.arch = "vit_tiny"
    c.model.embed_dim, c.model.depth, c.model.num_heads = embed, depth, heads
    c.model.patch_size = patch
    c.crops.global_size = size
    c.decoder.embed_dim, c.decoder.depth, c.decoder.num_heads = decoder
    c.train.batch_size_per_device = batch
    c.optim.epochs = epochs
    c.optim.warmup_epochs = max(1, round(0.05 * epochs))
