"""DINOv2 with 4 register tokens: the official recipe (ssl_default_config.yaml, ViT-S/14, 2 x 224 global +
8 x 96 local crops, DINO + iBOT + KoLeo) and its variants, key by key.

    python -m medjax.main --config=configs/dinov2_reg.py:demo --workdir=runs/demo

Variants: demo (minutes on a laptop CPU), demo_cxr (the same on the synthetic chest X-rays, no flips),
smoke (seconds, for tests), bench (the benchmark model),
vits14, vitb14 (the official sizes with the default recipe), vitl14, vitl16_short, vitg14 (the official
train configs configs/train/*.yaml, every key, as tests/pretrain/test_official_configs.py checks on
configs/dinov2.py). dinov2.py, dino.py and dinov2_reg_3d.py are this recipe with fewer parts or with
cubes; a variant only states what it changes.
"""

from __future__ import annotations

import os
import sys

import ml_collections
from ml_collections import config_dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared pieces beside this file
import config_lib  # noqa: E402

VARIANTS = ("", "demo", "demo_cxr", "smoke", "bench", "vits14", "vitb14", "vitl14", "vitl16_short", "vitg14")


def get_config(variant: str = "", *, registers: int = 4, ibot: bool = True, koleo: bool = True,
               config_file: str = "configs/dinov2_reg.py") -> ml_collections.ConfigDict:
    variant = config_lib.check_variant(variant, VARIANTS, config_file)
    return apply_variant(recipe(registers=registers, ibot=ibot, koleo=koleo), variant)


def recipe(*, registers: int, ibot: bool = True, koleo: bool = True) -> ml_collections.ConfigDict:
    """The full-size recipe: ViT-S/14, 2x224 + 8x96 crops, DINO + iBOT + KoLeo."""
    c = ml_collections.ConfigDict()
    c.mode = "pretrain"  # the job: DINOv2 pretraining (medjax/pretrain)
    c.seed = 0  # seeds the initial weights, the data order, the augmentations and the masks
    # True: resume a run although training settings (lr, schedule, batch, data, ...) changed since its
    # checkpoint, with a warning naming each; False: such a resume is refused.
    c.allow_config_change = False

    c.model = ml_collections.ConfigDict()
    c.model.arch = "vit_small"  # vit_tiny | vit_small | vit_base | vit_large | vit_giant2
    # Explicit sizes override the arch's; None keeps the arch's value.
    c.model.embed_dim = config_dict.placeholder(int)  # token width; None = the arch's
    c.model.depth = config_dict.placeholder(int)  # transformer blocks; None = the arch's
    c.model.num_heads = config_dict.placeholder(int)  # attention heads per block; None = the arch's
    c.model.patch_size = 14  # side of the square patch each token covers, in pixels
    c.model.in_chans = 1  # grayscale slices; 3 for RGB-initialised weights
    c.model.num_register_tokens = registers  # register tokens beside the CLS token (0 = none)
    c.model.ffn_layer = "mlp"  # block MLP: mlp | swiglu (ViT-g)
    c.model.layerscale = 1e-5  # LayerScale initial value; 0 = no LayerScale
    c.model.drop_path_rate = 0.3  # stochastic depth: probability a block's residual branch is dropped
    c.model.drop_path_uniform = True  # True: the same drop-path rate in every block; False: rising with depth
    # Register models were released with antialiased interpolation and no offset.
    c.model.interpolate_antialias = registers > 0
    c.model.interpolate_offset = 0.0 if registers > 0 else 0.1  # offset added before resizing the position table
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    # Recompute block activations in the backward pass: less memory on accelerators, more time. On a CPU
    # it saves no memory (XLA:CPU runs the recomputation early; BUILD_NOTES.md, "Memory").
    c.model.remat = False
    # Official DINOv2 backbone weights (.pth/.npz/.safetensors) to start student and teacher from
    # (continued pretraining); the model settings above must match their architecture. "" = random init.
    c.model.init_weights = ""
    # With init_weights: epochs (of train.epoch_length steps) at the start during which the backbone stays
    # frozen while the new DINO/iBOT heads learn (the released weights have none); 0 = train all at once.
    c.model.head_warmup_epochs = 1
    c.model.spatial_dims = 2  # 2: slices; 3: volumes (cubic patches and crops; configs/dinov2_reg_3d.py)

    c.head = ml_collections.ConfigDict()
    c.head.n_prototypes = 65536  # DINO head's output classes (prototypes)
    c.head.hidden_dim = 2048  # width of the projection head's hidden layers
    c.head.bottleneck_dim = 256  # width of the head's bottleneck before the prototypes
    c.head.nlayers = 3  # layers of the projection head's MLP
    c.head.ibot_separate_head = False  # True: iBOT gets its own head; False: it shares the DINO head
    c.head.ibot_n_prototypes = 65536  # used only with a separate iBOT head
    c.head.ibot_hidden_dim = 2048  # separate iBOT head only: width of its hidden layers
    c.head.ibot_bottleneck_dim = 256  # separate iBOT head only: width of its bottleneck
    c.head.ibot_nlayers = 3  # separate iBOT head only: layers of its MLP

    c.loss = ml_collections.ConfigDict()
    c.loss.dino_weight = 1.0  # weight of the DINO (CLS token) loss
    c.loss.ibot_weight = 1.0 if ibot else 0.0  # weight of the iBOT (masked patch) loss; 0 = off
    c.loss.koleo_weight = 0.1 if koleo else 0.0  # weight of the KoLeo spreading regulariser; 0 = off
    # device: KoLeo's nearest neighbours are searched among each device's batch_size_per_device images, as
    # the reference does per GPU (so the loss depends on the per-device batch); global: the whole batch.
    c.loss.koleo_batch = "device"
    c.loss.centering = "softmax"  # softmax (EMA centre) | sinkhorn_knopp
    c.loss.student_temp = 0.1  # softmax temperature of the student's outputs
    c.loss.center_momentum = 0.9  # EMA momentum of the teacher's softmax centre
    c.loss.mask_probability = 0.5 if ibot else 0.0  # share of global crops whose patches iBOT masks
    c.loss.mask_ratio_min = 0.1  # smallest share of patches masked in a masked crop
    c.loss.mask_ratio_max = 0.5  # largest share of patches masked in a masked crop

    c.teacher = ml_collections.ConfigDict()
    c.teacher.momentum_teacher = 0.992  # teacher EMA momentum at the start (cosine to final_momentum_teacher)
    c.teacher.final_momentum_teacher = 1.0  # teacher EMA momentum at the end of the run
    c.teacher.warmup_teacher_temp = 0.04  # teacher temperature at the start of its warm-up
    c.teacher.teacher_temp = 0.07  # teacher temperature after the warm-up
    c.teacher.warmup_teacher_temp_epochs = 30  # epochs of the teacher temperature's linear warm-up

    c.optim = ml_collections.ConfigDict()
    c.optim.epochs = 100  # length of the run in epochs of train.epoch_length steps
    c.optim.base_lr = 0.004  # at global batch 1024, scaled by scaling_rule
    c.optim.scaling_rule = "sqrt_wrt_1024"  # how the lr scales with the global batch: sqrt_wrt_1024 | linear_wrt_256 | none
    c.optim.min_lr = 1e-6  # learning rate at the end of the cosine decay
    c.optim.warmup_epochs = 10  # epochs of the learning rate's linear warm-up
    c.optim.weight_decay = 0.04  # weight decay at the start (cosine to weight_decay_end)
    c.optim.weight_decay_end = 0.4  # weight decay at the end of the run
    c.optim.clip_grad = 3.0  # gradient norm clipped per module to this value
    c.optim.freeze_last_layer_epochs = 1  # epochs during which the heads' last layer is not updated
    c.optim.layerwise_decay = 0.9  # lr multiplier decay per block from the top (1 = none)
    c.optim.patch_embed_lr_mult = 0.2  # lr multiplier of the patch embedding
    c.optim.adamw_beta1 = 0.9  # AdamW first-moment decay
    c.optim.adamw_beta2 = 0.999  # AdamW second-moment decay

    c.crops = ml_collections.ConfigDict()
    c.crops.global_size = 224  # side of the global crops (the model's input size)
    c.crops.local_size = 96  # side of the local crops
    c.crops.n_global = 2  # global crops per image
    c.crops.n_local = 8  # local crops per image
    c.crops.global_scale = (0.32, 1.0)  # area range of a global crop, as a fraction of the image
    c.crops.local_scale = (0.05, 0.32)  # area range of a local crop, as a fraction of the image
    c.crops.ratio = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio range of the random resized crops
    # Intensity augmentations for grayscale scans (no RGB colour jitter or solarize);
    # see medjax.data.augment.MultiCropConfig for what each does.
    c.crops.flip_p = 0.5  # probability of a left-right flip
    c.crops.intensity_p = 0.8  # probability of the brightness/contrast jitter
    c.crops.brightness = 0.4  # brightness jitter strength
    c.crops.contrast = 0.4  # contrast jitter strength
    c.crops.gamma_p = 0.3  # probability of a gamma change
    c.crops.gamma_range = (0.7, 1.5)  # range of the random gamma
    c.crops.global_blur_p = (1.0, 0.1)  # the reference's intended values (its code inverts them)
    c.crops.local_blur_p = 0.5  # probability of a Gaussian blur of a local crop
    c.crops.blur_sigma = (0.1, 2.0)  # range of the blur's sigma, in pixels
    c.crops.noise_p = 0.2  # probability of additive Gaussian noise
    c.crops.noise_std = (0.005, 0.05)  # range of the noise's standard deviation
    c.crops.mean = (0.449,)  # per-channel mean subtracted from the normalised images
    c.crops.std = (0.226,)  # per-channel standard deviation the images are divided by

    c.train = ml_collections.ConfigDict()
    c.train.batch_size_per_device = 64  # images per device per step (global batch = this x devices)
    c.train.epoch_length = 1250  # iterations per "epoch", as the official OFFICIAL_EPOCH_LENGTH
    c.train.log_every = 20  # steps between metric lines (metrics.jsonl, TensorBoard, progress)
    c.train.checkpoint_every = 1250  # steps between checkpoints
    c.train.keep_checkpoints = 3  # checkpoints kept on disk (the oldest are deleted)
    c.train.plot_every = 1250  # steps between redraws of training_overview.png
    c.train.stop_at_step = -1  # >= 0: stop (and checkpoint) there; schedules still span the whole run

    c.data = config_lib.data_config()
    c.evals = config_lib.evals_config()
    c.mesh = config_lib.mesh_config()
    c.distributed = config_lib.distributed_config()
    return c


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """Scales the recipe: ``demo`` (minutes on a laptop CPU), ``smoke`` (seconds), ``bench``, sizes."""
    sizes = {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large", "vitl16_short": "vit_large",
             "vitg14": "vit_giant2"}
    if variant in sizes:
        c.model.arch = sizes[variant]
        if variant == "vitl16_short":  # configs/train/vitl16_short.yaml: the default recipe at ViT-L/16
            c.model.patch_size = 16
        if variant in ("vitl14", "vitg14"):  # configs/train/vitl14.yaml and vitg14.yaml, key by key
            c.model.drop_path_rate = 0.4
            c.model.ffn_layer = "swiglu"  # the official "swiglufused" (SwiGLUFFNFused, as medjax's swiglu)
            c.head.n_prototypes = c.head.ibot_n_prototypes = 131072
            c.head.bottleneck_dim = 384  # the DINO head's; the separate iBOT head keeps 256
            c.head.ibot_separate_head = True
            c.teacher.momentum_teacher = 0.994
            c.optim.epochs = 500
            c.optim.base_lr = 2e-4
            c.optim.warmup_epochs = 80
            c.optim.weight_decay_end = 0.2
            c.optim.layerwise_decay = 1.0
            c.crops.local_size = 98
            c.loss.centering = "sinkhorn_knopp"
            c.train.batch_size_per_device = 32 if variant == "vitl14" else 12
    elif variant in ("demo", "demo_cxr"):
        _scale_down(c, embed=192, depth=6, heads=3, global_size=112, local_size=56, n_local=6,
                    prototypes=4096, hidden=512, bottleneck=128, batch=32, epochs=10, epoch_length=12)
        c.optim.base_lr = 0.004 * 4  # short run: a larger step, still scaled by batch
        # 120 steps are far shorter than the official recipe's EMA and centring horizons: with them the
        # teacher collapses to uniform targets (BUILD_NOTES.md, "The demo recipe"). A faster teacher,
        # Sinkhorn-Knopp targets at a low temperature, fewer prototypes and a stronger KoLeo keep it
        # image-dependent within the run.
        c.teacher.momentum_teacher = 0.95
        c.teacher.warmup_teacher_temp = c.teacher.teacher_temp = 0.02
        c.loss.centering = "sinkhorn_knopp"
        c.head.n_prototypes = c.head.ibot_n_prototypes = 512
        c.loss.koleo_weight = 1.0
        # End with the answer: the teacher vs a random-init backbone on the demo's series-type task.
        c.evals.every = 60
        c.evals.final = True
        c.evals.label_column = config_lib.DEMO_EVAL_LABEL
        config_lib.use_demo_data(c.data)
        c.train.log_every = 10
        c.train.checkpoint_every = 60
        c.train.plot_every = 60
        if variant == "demo_cxr":
            # The same run on the chest X-ray demo's 128 px films (about 75 in train: 120 steps of 32 are
            # some 50 passes). No left-right flips: a chest film is not symmetric (heart, aortic knob and
            # gastric bubble on the patient's left), and a mirrored one shows an anatomy nobody has. The
            # evaluation task is the films' 3-class diagnosis (normal / pneumonia / covid).
            c.crops.flip_p = 0.0
            c.evals.label_column = "diagnosis"
            config_lib.use_demo_cxr_data(c.data)
    elif variant == "smoke":
        # 4 blocks: the linear probe's heads read the last 4 blocks, so a smoke run can be probed.
        _scale_down(c, embed=32, depth=4, heads=2, global_size=28, local_size=14, n_local=2,
                    prototypes=64, hidden=64, bottleneck=32, batch=4, epochs=3, epoch_length=2)
        c.model.patch_size = 7
        c.data.demo_patients = 4
        c.data.demo_slices = 4
        c.data.demo_image_size = 48
        c.data.num_workers = 0
        c.train.log_every = 2
        c.train.checkpoint_every = 3
        c.train.plot_every = 6
    elif variant == "bench":
        _scale_down(c, embed=192, depth=4, heads=3, global_size=112, local_size=56, n_local=4,
                    prototypes=4096, hidden=2048, bottleneck=256, batch=16, epochs=1, epoch_length=50)
        c.data.demo_image_size = 128
        c.data.num_workers = 0
    return c


def _scale_down(c, *, embed, depth, heads, global_size, local_size, n_local, prototypes, hidden,
                bottleneck, batch, epochs, epoch_length):
    """The same recipe at a size that fits a CPU; schedules keep their shape in epochs."""
    c.model.arch = "vit_tiny"
    c.model.embed_dim, c.model.depth, c.model.num_heads = embed, depth, heads
    c.model.drop_path_rate = 0.1
    c.crops.global_size, c.crops.local_size, c.crops.n_local = global_size, local_size, n_local
    c.head.n_prototypes = c.head.ibot_n_prototypes = prototypes
    c.head.hidden_dim, c.head.bottleneck_dim = hidden, bottleneck
    c.train.batch_size_per_device = batch
    c.train.epoch_length = epoch_length
    c.optim.epochs = epochs
    # Warm-ups keep roughly their official share of the run (10% lr, 30% teacher temperature).
    c.optim.warmup_epochs = max(1, round(0.1 * epochs))
    c.teacher.warmup_teacher_temp_epochs = max(1, round(0.3 * epochs))
    c.optim.freeze_last_layer_epochs = 1


