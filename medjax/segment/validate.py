"""The segmentation (and multi-task) job's config check: one sentence naming the first bad value."""

from __future__ import annotations

from medjax.data.demo import TISSUE_CLASSES
from medjax.data.demo_cxr import LUNG_CLASSES
from medjax.data.job_manifest import data_folds
from medjax.data.sources import demo_kind, index_options

HEADS = ("linear", "decoder")
BASELINES = ("unet",)
DEMO_MASK_CLASSES = {"lesion": ("background", "lesion"), "tissue": TISSUE_CLASSES, "lungs": LUNG_CLASSES}
DEMO_KIND_MASKS = {"mri": ("lesion", "tissue"), "cxr": ("lungs",)}  # config.data.demo_kind -> its demo_masks
EMPTY_RULES = ("nan", "one")
EMPTY_MASKS = ("allow", "refuse")


def sided(class_names) -> list[str]:
    """Class names that hold a body side ("left"/"right"): a left-right flip would swap what they mean."""
    return [n for n in class_names if "left" in str(n).lower() or "right" in str(n).lower()]


def validate(config) -> None:
    """One sentence naming the first bad value."""
    index_options(config)  # config.data's volume_index, mask_resample, mask_values
    data_folds(config)  # config.data.folds
    s = config.segment
    if bool(s.checkpoint_dir) == bool(s.official_weights):
        raise ValueError("Set exactly one of config.segment.checkpoint_dir (the --workdir of a pretraining run) "
                         "and config.segment.official_weights (a file of official DINOv2 weights).")
    if len(s.class_names) < 2 or len(set(s.class_names)) != len(s.class_names):
        raise ValueError(f"config.segment.class_names={tuple(s.class_names)} must name background and at least "
                         "one structure, each once (mask value i is class_names[i]).")
    if s.official_kind not in ("dinov2", "mae"):
        raise ValueError(f"config.segment.official_kind={s.official_kind!r} is not valid; choose dinov2 or mae.")
    if s.demo_masks not in DEMO_MASK_CLASSES:
        raise ValueError(f"config.segment.demo_masks={s.demo_masks!r} is not valid; choose lesion or tissue (brain-MRI "
                         "demo) or lungs (chest X-ray demo).")
    kind = demo_kind(config)  # config.data.demo_kind, checked
    if not s.manifest and s.demo_masks not in DEMO_KIND_MASKS[kind]:
        raise ValueError(f"config.segment.demo_masks={s.demo_masks!r} is not a mask set of the {kind!r} demo "
                         f"(config.data.demo_kind); choose {' or '.join(DEMO_KIND_MASKS[kind])}.")
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
    if s.flip_p > 0 and sided(s.class_names):
        raise ValueError(f"config.segment.flip_p={s.flip_p:g} flips images left-right, but config.segment.class_names "
                         f"{', '.join(sided(s.class_names))} have sides, so a flipped image would teach the right "
                         "one as the left (and show a mirrored anatomy); set config.segment.flip_p=0.")
    if s.empty_masks not in EMPTY_MASKS:
        raise ValueError(f"config.segment.empty_masks={s.empty_masks!r} is not valid; choose allow (an all-background "
                         "mask is a case without the structure) or refuse (it is a broken label).")
    if any(b not in BASELINES for b in s.baselines) or len(set(s.baselines)) != len(s.baselines):
        raise ValueError(f"config.segment.baselines={tuple(s.baselines)} must list {', '.join(BASELINES)} at most "
                         "once each, or be empty (no supervised baseline).")
    if s.baselines and s.spatial_dims == 3:
        raise ValueError(f"config.segment.baselines={tuple(s.baselines)} are 2D models but config.segment."
                         "spatial_dims=3; set config.segment.baselines=() for volumes.")
    for key in ("unet_width", "unet_depth", "unet_steps"):
        if s[key] <= 0:
            raise ValueError(f"config.segment.{key}={s[key]!r} must be a positive number.")
    for key in ("unet_lr", "unet_weight_decay", "unet_warmup_steps"):
        if s[key] < 0:
            raise ValueError(f"config.segment.{key}={s[key]!r} must be 0 or more.")
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
