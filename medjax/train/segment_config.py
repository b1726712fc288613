"""The segmentation (and multi-task) trainer's config: ``configs/segment.py`` and ``configs/multitask.py``.

Both files are thin: ``segment_config(variant, multitask=...)`` sets every key,
and ``validate_segment_config`` names the first bad value in one sentence.
"""

from __future__ import annotations

import ml_collections

from medjax.data.demo import TISSUE_CLASSES
from medjax.train.pretrain_config import recipe, use_demo_data_of_demo_variant

VARIANTS = ("", "demo", "smoke", "demo3d", "smoke3d")
HEADS = ("linear", "decoder")
DEMO_MASK_CLASSES = {"lesion": ("background", "lesion"), "tissue": TISSUE_CLASSES}
EMPTY_RULES = ("nan", "one")


def segment_config(variant: str = "", *, multitask: bool = False, config_file: str = "configs/segment.py"):
    variant = variant or ""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} of {config_file}; choose demo, smoke, demo3d or smoke3d "
                         "(or none).")
    c = ml_collections.ConfigDict()
    c.mode = "segment"
    c.seed = 0

    s = c.segment = ml_collections.ConfigDict()
    # Where the backbone comes from: a medjax pretraining run, or official DINOv2 weights.
    s.checkpoint_dir = ""  # the --workdir of a pretraining run (holds checkpoints/)
    s.step = -1  # checkpoint step; -1 = the latest
    s.official_weights = ""  # or: a .pth/.npz/.safetensors file of official DINOv2 weights
    s.random_baseline = True  # also train from a randomly initialised backbone of the same architecture
    # 2: slices of a 2D backbone; 3: whole volumes of a 3D one (the pretraining run's config.model.spatial_dims
    # must agree). 3D: every manifest row is one example, image and mask resampled to the pretraining run's
    # config.data.target_spacing and normalised with its config.data.normalisation (this config's data
    # section gives only the demo data's size), in the axial (D, H, W) layout.
    s.spatial_dims = 2
    # Data: a manifest whose rows have a mask_path; empty = the built-in demo dataset, whose masks are
    # demo_masks: "lesion" (background, lesion) or "tissue" (background, csf, grey_matter, white_matter,
    # lesion: brain-tissue segmentation); class_names must then be those classes.
    s.manifest = ""
    s.demo_masks = "lesion"
    s.class_names = ("background", "lesion")  # mask label value i is class_names[i]; 0 is background
    s.image_size = 0  # model input (square); 0 = the pretraining run's global crop size
    # 3D model input (D, H, W) voxels at the target spacing, each a multiple of the patch size; () = the largest
    # volume's sides rounded up to one. Volumes are centred and zero-padded to it, those larger scaled down.
    s.volume_shape = ()
    s.assumed_spacing_mm = ()  # (row, col) mm for 2D images whose files carry no pixel spacing (PNG/JPEG)
    # Heads: "linear" = DINOv2's linear segmentation (frozen backbone, 1x1 classifier on the patch
    # tokens, logits upsampled bilinearly); "decoder" = progressive upsampling conv decoder.
    s.heads = ("decoder",)
    s.n_last_blocks = 1  # patch tokens of the last n blocks (normed), concatenated
    s.decoder_channels = (128, 64, 32)  # one x2 upsampling + 3x3 conv stage per entry, the last at half size
    s.image_skip = True  # the decoder also sees the input image at every stage
    s.backbone_lr_mult = 0.0  # decoder only: 0 = frozen backbone (tokens computed once); > 0 = fine-tuned
    s.drop_path_rate = 0.0  # backbone drop path while fine-tuning
    # Loss: dice_weight * soft Dice (per class, background excluded) + ce_weight * cross-entropy,
    # + classification_weight * cross-entropy of the classification head (multi-task; 0 = off).
    s.dice_weight = 1.0
    s.ce_weight = 1.0
    s.classification_weight = 0.0
    s.label_column = ""  # the classification target; with the demo, empty = lesion class shown on the slice
    # Optimisation: AdamW, linear warm-up then cosine decay, a fixed number of steps for every fraction.
    s.steps = 2000
    s.batch_size = 32
    s.lr = 1e-3
    s.warmup_steps = 100
    s.weight_decay = 1e-4
    s.eval_every = 200  # steps between val evaluations (training curves)
    # Augmentation (fine-tuned backbone only; frozen tokens are computed once, unaugmented).
    s.flip_p = 0.5  # horizontal (left-right) flip of image and mask together
    s.crop_scale = (0.6, 1.0)  # random resized crop area (3D: volume) range of image and mask (nearest); (1, 1) = off
    # Metrics: Dice per class, background excluded. Ground truth and prediction both empty:
    # "nan" = the case is left out of the mean (MONAI), "one" = it counts as a perfect 1.0.
    s.empty_rule = "nan"
    # Few labels: train on this fraction of the training patients (whole patients), one run per seed.
    s.label_fractions = (1.0,)
    s.fraction_seeds = (0,)
    s.eval_batch = 64
    s.overlay_cases = 4  # test cases drawn as overlays (and saved as prediction PNGs) per init and head

    c.data = recipe(registers=4).data  # same keys and meaning as the pretraining config's data section
    if multitask:
        s.classification_weight = 0.5
        s.backbone_lr_mult = 0.1  # one backbone shared by both heads only when it is trained
    if variant in ("demo", "demo3d"):
        # Brain tissue: the demo's lesions are a few pixels, smaller than a patch, and a CPU-length
        # pretraining does not learn them (BUILD_NOTES), while tissue depends on the contrast it learns.
        s.demo_masks = "tissue"
        s.class_names = DEMO_MASK_CLASSES["tissue"]
        if multitask:
            s.label_column = "contrast"  # T1 / T2 / FLAIR: a second task the pretraining can help with
    if variant == "demo":
        use_demo_data_of_demo_variant(c.data)
        s.decoder_channels = (32, 16, 8)
        s.batch_size = 16
        _demo_schedule(s, multitask, warmup_steps=20, fraction_seeds=(0, 1))
    elif variant == "smoke":
        s.heads = ("decoder",) if multitask else ("linear", "decoder")
        s.decoder_channels = (16, 8)
        s.steps = 6
        s.warmup_steps = 2
        s.batch_size = 8
        s.eval_every = 3
        s.eval_batch = 32
        s.overlay_cases = 2
        s.label_fractions = (1.0,) if multitask else (0.5, 1.0)
        c.data.demo_patients = 12
        c.data.demo_slices = 8
        c.data.demo_image_size = 48
        c.data.num_workers = 0
    elif variant == "demo3d":
        _volumes(c, variant)
        # 16 x 80 x 80 inputs: the 8 x 40 x 40 stage's 3x3x3 conv is most of a decoder step on a CPU
        # (0.1 s at batch 4 with these channels, 0.2 s with (32, 16, 8)).
        s.decoder_channels = (16, 8, 4)
        s.batch_size = 4
        s.eval_batch = 16
        # 150 steps left the decoder's loss falling fast (multi-task at 150 steps and lr 1e-3 labelled no
        # voxel white matter); one seed per fraction keeps the run near 5 min. Multi-task fine-tunes the 3D
        # backbone: ~0.4 s per step of 4 volumes on 2 CPU cores.
        _demo_schedule(s, multitask, warmup_steps=30, fraction_seeds=(0,), multitask_steps=300, multitask_lr=3e-3)
    elif variant == "smoke3d":
        _volumes(c, variant)
        s.heads = ("decoder",) if multitask else ("linear", "decoder")
        s.decoder_channels = (8, 4)
        s.steps = 4
        s.warmup_steps = 1
        s.batch_size = 4
        s.eval_every = 2
        s.eval_batch = 8
        s.overlay_cases = 2
        s.label_fractions = (1.0,) if multitask else (0.5, 1.0)
    return c


def _demo_schedule(s, multitask: bool, *, warmup_steps: int, fraction_seeds: tuple, multitask_steps: int = 150,
                   multitask_lr: float = 1e-3) -> None:
    """The demo variants' budget: multi-task one fine-tuned backbone; segmentation 300 steps per run of
    both heads on 10 % and 100 % of the training patients."""
    if multitask:
        s.steps, s.lr = multitask_steps, multitask_lr
        s.warmup_steps, s.eval_every = multitask_steps // 10, multitask_steps // 3
    else:
        s.heads = ("linear", "decoder")
        s.steps, s.lr, s.warmup_steps, s.eval_every = 300, 3e-3, warmup_steps, 100
        s.label_fractions = (0.1, 1.0)
        s.fraction_seeds = fraction_seeds


def _volumes(c, variant: str) -> None:
    """3D: the data of the 3D pretraining variant the backbone comes from (configs/dinov2_reg_3d.py)."""
    c.segment.spatial_dims = 3
    c.data.num_workers = 0
    if variant == "demo3d":  # the :demo run's 40 patients (16 x 75 x 75 voxels at 3 mm)
        use_demo_data_of_demo_variant(c.data)
    else:  # the 2D :smoke segmentation's 12 patients (8 x 37 x 37 voxels at 6 mm): one demo folder for both
        c.data.demo_patients = 12
        c.data.demo_slices = 8
        c.data.demo_image_size = 48


def validate_segment_config(config) -> None:
    """One sentence naming the first bad value."""
    s = config.segment
    if bool(s.checkpoint_dir) == bool(s.official_weights):
        raise ValueError("Set exactly one of config.segment.checkpoint_dir (the --workdir of a pretraining run) "
                         "and config.segment.official_weights (a file of official DINOv2 weights).")
    if len(s.class_names) < 2 or len(set(s.class_names)) != len(s.class_names):
        raise ValueError(f"config.segment.class_names={tuple(s.class_names)} must name background and at least "
                         "one structure, each once (mask value i is class_names[i]).")
    if s.demo_masks not in DEMO_MASK_CLASSES:
        raise ValueError(f"config.segment.demo_masks={s.demo_masks!r} is not valid; choose lesion or tissue.")
    if not s.manifest and tuple(s.class_names) != DEMO_MASK_CLASSES[s.demo_masks]:
        raise ValueError(f"config.segment.class_names={tuple(s.class_names)} does not match the demo's "
                         f"{s.demo_masks} masks; set it to {DEMO_MASK_CLASSES[s.demo_masks]} (or give "
                         "config.segment.manifest).")
    if not s.heads or any(h not in HEADS for h in s.heads) or len(set(s.heads)) != len(s.heads):
        raise ValueError(f"config.segment.heads={tuple(s.heads)} must list one or more of {', '.join(HEADS)}, "
                         "each once.")
    if s.empty_rule not in EMPTY_RULES:
        raise ValueError(f"config.segment.empty_rule={s.empty_rule!r} is not valid; choose nan (both-empty cases "
                         "left out) or one (counted as 1.0).")
    for key in ("steps", "batch_size", "eval_every", "eval_batch", "n_last_blocks"):
        if s[key] <= 0:
            raise ValueError(f"config.segment.{key}={s[key]!r} must be a positive number.")
    for key in ("lr", "dice_weight", "ce_weight", "classification_weight", "backbone_lr_mult", "weight_decay",
                "warmup_steps", "drop_path_rate", "image_size", "overlay_cases"):
        if s[key] < 0:
            raise ValueError(f"config.segment.{key}={s[key]!r} must be 0 or more.")
    if s.dice_weight + s.ce_weight <= 0:
        raise ValueError("config.segment.dice_weight and ce_weight are both 0; the segmentation needs a loss.")
    if not s.decoder_channels or min(s.decoder_channels) <= 0:
        raise ValueError(f"config.segment.decoder_channels={tuple(s.decoder_channels)} must be positive "
                         "channel counts, one per upsampling stage.")
    if not 0.0 <= s.flip_p <= 1.0:
        raise ValueError(f"config.segment.flip_p={s.flip_p!r} must lie in [0, 1].")
    if len(s.crop_scale) != 2 or not 0.0 < s.crop_scale[0] <= s.crop_scale[1] <= 1.0:
        raise ValueError(f"config.segment.crop_scale={tuple(s.crop_scale)} must be (low, high) with "
                         "0 < low <= high <= 1.")
    if not s.label_fractions or any(not 0.0 < f <= 1.0 for f in s.label_fractions):
        raise ValueError(f"config.segment.label_fractions={tuple(s.label_fractions)} must hold fractions in "
                         "(0, 1], e.g. (0.1, 1.0).")
    if not s.fraction_seeds:
        raise ValueError("config.segment.fraction_seeds is empty; give at least one seed, e.g. (0,).")
    if s.spatial_dims not in (2, 3):
        raise ValueError(f"config.segment.spatial_dims={s.spatial_dims!r} must be 2 (slices) or 3 (volumes).")
    if s.spatial_dims == 3 and s.official_weights:
        raise ValueError("config.segment.official_weights are 2D DINOv2 weights but config.segment.spatial_dims=3; "
                         "segment volumes with config.segment.checkpoint_dir of a 3D pretraining run, or slices "
                         "with a 2D variant.")
    if s.volume_shape and (len(s.volume_shape) != 3 or min(s.volume_shape) <= 0 or s.spatial_dims != 3):
        raise ValueError(f"config.segment.volume_shape={tuple(s.volume_shape)} must be empty or (D, H, W) voxels, "
                         "with config.segment.spatial_dims=3.")
    if s.assumed_spacing_mm and (len(s.assumed_spacing_mm) != 2 or min(s.assumed_spacing_mm) <= 0):
        raise ValueError(f"config.segment.assumed_spacing_mm={tuple(s.assumed_spacing_mm)} must be empty or "
                         "(row, col) millimetres.")
