"""The DINOv2 pretraining recipe as a ConfigDict, and its scaled-down variants.

`configs/dinov2_reg.py`, `configs/dinov2.py` and `configs/dino.py` are thin
files over `recipe()`: the defaults below are the official DINOv2 ones
(ssl_default_config.yaml), so a variant only states what it changes.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from medjax.distributed import check_distributed_config

DEMO_EVAL_LABEL = "contrast"  # the demo's evaluation task: MRI series type (T1 / T2 / FLAIR) per slice
VARIANTS = ("", "demo", "smoke", "bench", "vits14", "vitb14", "vitl14", "vitg14")


def recipe(*, registers: int, ibot: bool = True, koleo: bool = True) -> ml_collections.ConfigDict:
    """The full-size recipe: ViT-S/14, 2x224 + 8x96 crops, DINO + iBOT + KoLeo."""
    c = ml_collections.ConfigDict()
    c.mode = "pretrain"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.arch = "vit_small"  # vit_tiny | vit_small | vit_base | vit_large | vit_giant2
    # Explicit sizes override the arch's; None keeps the arch's value.
    c.model.embed_dim = config_dict.placeholder(int)
    c.model.depth = config_dict.placeholder(int)
    c.model.num_heads = config_dict.placeholder(int)
    c.model.patch_size = 14
    c.model.in_chans = 1  # grayscale slices; 3 for RGB-initialised weights
    c.model.num_register_tokens = registers
    c.model.ffn_layer = "mlp"
    c.model.layerscale = 1e-5
    c.model.drop_path_rate = 0.3
    c.model.drop_path_uniform = True
    # Register models were released with antialiased interpolation and no offset.
    c.model.interpolate_antialias = registers > 0
    c.model.interpolate_offset = 0.0 if registers > 0 else 0.1
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.remat = False
    # Official DINOv2 backbone weights (.pth/.npz/.safetensors) to start student and teacher from
    # (continued pretraining); the model settings above must match their architecture. "" = random init.
    c.model.init_weights = ""
    c.model.spatial_dims = 2  # 2: slices; 3: volumes (cubic patches and crops; configs/dinov2_reg_3d.py)

    c.head = ml_collections.ConfigDict()
    c.head.n_prototypes = 65536
    c.head.hidden_dim = 2048
    c.head.bottleneck_dim = 256
    c.head.nlayers = 3
    c.head.ibot_separate_head = False
    c.head.ibot_n_prototypes = 65536  # used only with a separate iBOT head

    c.loss = ml_collections.ConfigDict()
    c.loss.dino_weight = 1.0
    c.loss.ibot_weight = 1.0 if ibot else 0.0
    c.loss.koleo_weight = 0.1 if koleo else 0.0
    c.loss.centering = "softmax"  # softmax (EMA centre) | sinkhorn_knopp
    c.loss.student_temp = 0.1
    c.loss.center_momentum = 0.9
    c.loss.mask_probability = 0.5 if ibot else 0.0
    c.loss.mask_ratio_min = 0.1
    c.loss.mask_ratio_max = 0.5

    c.teacher = ml_collections.ConfigDict()
    c.teacher.momentum_teacher = 0.992
    c.teacher.final_momentum_teacher = 1.0
    c.teacher.warmup_teacher_temp = 0.04
    c.teacher.teacher_temp = 0.07
    c.teacher.warmup_teacher_temp_epochs = 30

    c.optim = ml_collections.ConfigDict()
    c.optim.epochs = 100
    c.optim.base_lr = 0.004  # at global batch 1024, scaled by scaling_rule
    c.optim.scaling_rule = "sqrt_wrt_1024"
    c.optim.min_lr = 1e-6
    c.optim.warmup_epochs = 10
    c.optim.weight_decay = 0.04
    c.optim.weight_decay_end = 0.4
    c.optim.clip_grad = 3.0
    c.optim.freeze_last_layer_epochs = 1
    c.optim.layerwise_decay = 0.9
    c.optim.patch_embed_lr_mult = 0.2
    c.optim.adamw_beta1 = 0.9
    c.optim.adamw_beta2 = 0.999

    c.crops = ml_collections.ConfigDict()
    c.crops.global_size = 224
    c.crops.local_size = 96
    c.crops.n_global = 2
    c.crops.n_local = 8
    c.crops.global_scale = (0.32, 1.0)
    c.crops.local_scale = (0.05, 0.32)
    c.crops.ratio = (3.0 / 4.0, 4.0 / 3.0)
    # Intensity augmentations for grayscale scans (no RGB colour jitter or solarize);
    # see medjax.data.augment.MultiCropConfig for what each does.
    c.crops.flip_p = 0.5
    c.crops.intensity_p = 0.8
    c.crops.brightness = 0.4
    c.crops.contrast = 0.4
    c.crops.gamma_p = 0.3
    c.crops.gamma_range = (0.7, 1.5)
    c.crops.global_blur_p = (1.0, 0.1)  # the reference's intended values (its code inverts them)
    c.crops.local_blur_p = 0.5
    c.crops.blur_sigma = (0.1, 2.0)
    c.crops.noise_p = 0.2
    c.crops.noise_std = (0.005, 0.05)
    c.crops.mean = (0.449,)
    c.crops.std = (0.226,)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size_per_device = 64
    c.train.epoch_length = 1250  # iterations per "epoch", as the official OFFICIAL_EPOCH_LENGTH
    c.train.log_every = 20
    c.train.checkpoint_every = 1250
    c.train.keep_checkpoints = 3
    c.train.plot_every = 1250
    c.train.stop_at_step = -1  # >= 0: stop (and checkpoint) there; schedules still span the whole run

    c.data = ml_collections.ConfigDict()
    c.data.manifest = ""  # CSV manifest of the user's scans; empty = the built-in demo dataset
    c.data.extra_columns = ""  # comma-separated manifest columns to accept besides the known ones
    c.data.slice_axis = "axial"  # axial | coronal | sagittal: 2D slices cut from each volume
    c.data.skip_background = True
    # Intensity normalisation per volume, JSON: {"method": "percentile", "low": .., "high": ..} (MRI,
    # X-ray) or {"method": "ct_window", "preset": "soft_tissue"} / {"method": "ct_window", "level": 40,
    # "width": 400} (CT); see medjax.data.intensity.
    c.data.normalisation = '{"method": "percentile", "low": 0.5, "high": 99.5}'
    c.data.target_spacing = ()  # e.g. (1.0, 1.0, 3.0) mm: resample volumes (masks nearest) before slicing
    c.data.skip_bad = False  # True: skip unreadable rows (they are listed), False: stop at the first
    c.data.volumes_in_memory = 8  # decoded volumes kept in an LRU (shuffled slices revisit volumes)
    c.data.cache_dir = ""  # if set, normalised slices are cached there in ArrayRecord shards
    c.data.num_workers = 2
    c.data.demo_dir = ""  # where the demo dataset is written; empty = WORKDIR/demo_data
    c.data.demo_patients = 60
    c.data.demo_slices = 16
    c.data.demo_image_size = 256

    add_eval_config(c)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all remaining devices
    c.mesh.fsdp = 1  # > 1: parameters and optimizer state split over this many devices (FSDP)
    c.mesh.fsdp_min_size = 2**14  # state leaves with fewer elements stay replicated

    # Several processes (hosts): see medjax/distributed.py and launch/README.md. Under SLURM (srun)
    # everything is detected; elsewhere give process 0's host:port and each process's id.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # host:port of process 0; "" = SLURM or a single process
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.initialization_timeout = 300  # seconds to wait for the coordinator and the other processes
    return c


def add_eval_config(c: ml_collections.ConfigDict) -> None:
    """The ``evals`` section of a pretraining config (off by default)."""
    c.evals = ml_collections.ConfigDict()
    c.evals.every = 0  # steps between evaluations of the teacher; 0 = none during the run
    c.evals.final = False  # at the last step: pretrained vs random init, eval/results.md, printed table
    c.evals.knn = True
    c.evals.linear_probe = True
    c.evals.manifest = ""  # labelled CSV manifest; empty = config.data.manifest (or the demo dataset)
    c.evals.label_column = ""  # empty with the demo = lesion class shown on the slice
    c.evals.selection = "accuracy"  # accuracy | balanced_accuracy | mean_auc: best head on val
    c.evals.knn_k = (10, 20, 100, 200)
    c.evals.probe_epochs = 10  # passes over the training slices per linear-probe fit
    c.evals.batch_size = 128


def validate_eval_config(c) -> None:
    e = c.evals
    if e.every < 0:
        raise ValueError(f"config.evals.every={e.every} must be 0 (no evaluations during the run) or positive.")
    if (e.every or e.final) and not (e.knn or e.linear_probe):
        raise ValueError("config.evals asks for evaluations but both config.evals.knn and "
                         "config.evals.linear_probe are False; enable one or set config.evals.every=0.")
    if (e.every or e.final) and c.model.depth is not None and c.model.depth < 4 and e.linear_probe:
        raise ValueError(f"config.model.depth={c.model.depth}: the linear probe reads the last 4 blocks, so "
                         "evaluations need a backbone of at least 4 blocks (or config.evals.linear_probe=False).")


def apply_variant(c: ml_collections.ConfigDict, variant: str, config_file: str) -> ml_collections.ConfigDict:
    """Scales the recipe: ``demo`` (minutes on a laptop CPU), ``smoke`` (seconds), ``bench``, sizes."""
    if variant not in VARIANTS:
        known = ", ".join(repr(v) for v in VARIANTS if v)
        raise ValueError(f"Unknown variant {variant!r} of {config_file}; choose one of {known} (or none).")
    sizes = {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large", "vitg14": "vit_giant2"}
    if variant in sizes:
        c.model.arch = sizes[variant]
        if variant in ("vitl14", "vitg14"):  # the official ViT-L/g settings
            c.model.drop_path_rate = 0.4
            c.head.n_prototypes = c.head.ibot_n_prototypes = 131072
            c.head.bottleneck_dim = 384
            c.teacher.momentum_teacher = 0.994
            c.optim.weight_decay_end = 0.2
            c.optim.layerwise_decay = 1.0
            c.loss.centering = "sinkhorn_knopp"
        if variant == "vitg14":
            c.model.ffn_layer = "swiglu"
    elif variant == "demo":
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
        c.evals.label_column = DEMO_EVAL_LABEL
        use_demo_data_of_demo_variant(c.data)
        c.train.log_every = 10
        c.train.checkpoint_every = 60
        c.train.plot_every = 60
    elif variant == "smoke":
        _scale_down(c, embed=32, depth=2, heads=2, global_size=28, local_size=14, n_local=2,
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


def use_demo_data_of_demo_variant(data: ml_collections.ConfigDict) -> None:
    """The ``:demo`` data settings; evaluations of a demo run use them to read the same files."""
    data.demo_patients = 40
    data.demo_image_size = 128
    data.volumes_in_memory = 128  # all 120 demo series (1 MB each): no re-decoding
    data.num_workers = 0


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


_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.ffn_layer": ("mlp", "swiglu"),
    "loss.centering": ("softmax", "sinkhorn_knopp"),
    "optim.scaling_rule": ("sqrt_wrt_1024", "linear_wrt_256", "none"),
}
_POSITIVE = (
    "model.patch_size", "model.in_chans", "head.n_prototypes", "head.hidden_dim", "head.bottleneck_dim",
    "head.nlayers", "crops.global_size", "crops.local_size", "train.batch_size_per_device",
    "train.epoch_length", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.plot_every", "optim.epochs",
)
_FRACTIONS = (
    "loss.mask_probability", "loss.mask_ratio_min", "loss.mask_ratio_max", "loss.center_momentum",
    "teacher.momentum_teacher", "teacher.final_momentum_teacher",
)


def _get(c, dotted):
    for part in dotted.split("."):
        c = c[part]
    return c


def validate_pretrain_config(c) -> None:
    """Raises ValueError with one sentence naming the first bad value and what would be valid."""
    validate_eval_config(c)
    for key, allowed in _CHOICES.items():
        if _get(c, key) not in allowed:
            raise ValueError(f"config.{key}={_get(c, key)!r} is not valid; choose one of {', '.join(allowed)}.")
    for key in _POSITIVE:
        if _get(c, key) <= 0:
            raise ValueError(f"config.{key}={_get(c, key)!r} must be a positive number.")
    for key in _FRACTIONS:
        if not 0.0 <= _get(c, key) <= 1.0:
            raise ValueError(f"config.{key}={_get(c, key)!r} must lie in [0, 1].")
    if c.crops.n_global != 2:
        raise ValueError(
            f"config.crops.n_global={c.crops.n_global}; DINOv2 crosses exactly 2 global crops, so it must be 2."
        )
    if c.crops.n_local < 0:
        raise ValueError(f"config.crops.n_local={c.crops.n_local} must be 0 or more.")
    for kind in ("global", "local"):
        if _get(c, f"crops.{kind}_size") < c.model.patch_size:
            raise ValueError(
                f"config.crops.{kind}_size={_get(c, f'crops.{kind}_size')} is smaller than one patch "
                f"(config.model.patch_size={c.model.patch_size})."
            )
    if c.loss.mask_ratio_min > c.loss.mask_ratio_max:
        raise ValueError("config.loss.mask_ratio_min is larger than config.loss.mask_ratio_max.")
    if c.loss.ibot_weight > 0 and c.loss.mask_probability <= 0:
        raise ValueError(
            "config.loss.ibot_weight > 0 needs masked images: set config.loss.mask_probability > 0 "
            "(0.5 is the official value) or config.loss.ibot_weight=0."
        )
    if c.loss.koleo_weight > 0 and c.train.batch_size_per_device < 2:
        raise ValueError(
            "KoLeo needs at least 2 images per device and step: raise config.train.batch_size_per_device "
            "or set config.loss.koleo_weight=0."
        )
    for key in ("embed_dim", "depth", "num_heads"):
        if c.model[key] is not None and c.model[key] <= 0:
            raise ValueError(f"config.model.{key}={c.model[key]} must be a positive number.")
    if c.model.spatial_dims not in (2, 3):
        raise ValueError(f"config.model.spatial_dims={c.model.spatial_dims!r} must be 2 (slices) or 3 (volumes).")
    if c.model.spatial_dims == 3 and (c.evals.every or c.evals.final):
        raise ValueError("The kNN and linear-probe evaluations read 2D slices, so they cannot run during 3D "
                         "pretraining (config.model.spatial_dims=3); set config.evals.every=0 and "
                         "config.evals.final=False.")
    if c.model.spatial_dims == 3 and c.data.cache_dir:
        raise ValueError("config.data.cache_dir caches 2D slices; 3D pretraining (config.model.spatial_dims=3) "
                         "reads whole volumes, so leave config.data.cache_dir empty.")
    for axis in ("data", "fsdp"):
        if c.mesh[axis] == 0 or c.mesh[axis] < -1:
            raise ValueError(
                f"config.mesh.{axis}={c.mesh[axis]} must be a positive number or -1 (all remaining devices)."
            )
    if c.mesh.data == -1 and c.mesh.fsdp == -1:
        raise ValueError("Only one of config.mesh.data and config.mesh.fsdp may be -1 (all remaining devices).")
    if c.mesh.fsdp_min_size < 0:
        raise ValueError(f"config.mesh.fsdp_min_size={c.mesh.fsdp_min_size} must be 0 or more.")
    check_distributed_config(c.distributed)
    if c.model.embed_dim is not None and c.model.num_heads is not None and c.model.embed_dim % c.model.num_heads:
        raise ValueError(
            f"config.model.embed_dim={c.model.embed_dim} is not divisible by config.model.num_heads={c.model.num_heads}."
        )
