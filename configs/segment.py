"""Segmentation on frozen or fine-tuned backbone patch tokens (linear head, upsampling decoder), beside a
supervised U-Net trained from scratch (config.segment.baselines); variants: demo, demo_cxr (lungs on the
synthetic chest X-rays), smoke, and for 3D backbones (whole volumes) demo3d, smoke3d. multitask.py is this
recipe with a classification head beside the decoder.

    python -m medjax.main --config=configs/segment.py:demo --workdir=runs/demo_segment \
        --config.segment.checkpoint_dir=runs/demo
    python -m medjax.main --config=configs/segment.py:demo_cxr --workdir=runs/demo_cxr_segment \
        --config.segment.checkpoint_dir=runs/demo_cxr  # a configs/dinov2_reg.py:demo_cxr run
    python -m medjax.main --config=configs/segment.py:demo3d --workdir=runs/demo3d_segment \
        --config.segment.checkpoint_dir=runs/demo3d  # a configs/dinov2_reg_3d.py:demo run

The backbone (model and normalisation) comes from the pretraining run's checkpoint (or from
official DINOv2 weights, config.segment.official_weights); this file sets the heads, the loss,
the label fractions and the data.
"""

from __future__ import annotations

import os
import sys

import ml_collections

from medjax.segment.validate import DEMO_MASK_CLASSES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared pieces beside this file
import config_lib  # noqa: E402

VARIANTS = ("", "demo", "demo_cxr", "smoke", "demo3d", "smoke3d")


def get_config(variant: str = "", *, multitask: bool = False, config_file: str = "configs/segment.py"):
    variant = config_lib.check_variant(variant, VARIANTS, config_file)
    c = ml_collections.ConfigDict()
    c.mode = "segment"  # the job: segmentation (and multi-task) on a pretrained backbone (medjax/segment)
    c.seed = 0  # seeds the heads' initialisation, the data order and the few-label draws

    s = c.segment = ml_collections.ConfigDict()
    # Where the backbone comes from: a medjax pretraining run, or official DINOv2 weights.
    s.checkpoint_dir = ""  # the --workdir of a pretraining run (holds checkpoints/)
    s.step = -1  # checkpoint step; -1 = the latest
    s.official_weights = ""  # or: a .pth/.npz/.safetensors file of official DINOv2 or MAE weights
    s.official_kind = "dinov2"  # dinov2 | mae (the encoder of MAE weights, full or encoder-only)
    s.random_baseline = True  # also train from a randomly initialised backbone of the same architecture
    # 2: slices of a 2D backbone; 3: whole volumes of a 3D one (the pretraining run's config.model.spatial_dims
    # must agree). 3D: every manifest row is one example, image and mask resampled to the pretraining run's
    # config.data.target_spacing and normalised with its config.data.normalisation (this config's data
    # section gives only the demo data's size), in the axial (D, H, W) layout.
    s.spatial_dims = 2
    # Data: a manifest whose rows have a mask_path; empty = the built-in demo dataset, whose masks are
    # demo_masks: "lesion" (background, lesion) or "tissue" (background, csf, grey_matter, white_matter,
    # lesion: brain-tissue segmentation) of the brain-MRI demo, or "lungs" (background, right_lung,
    # left_lung) of the chest X-ray demo (config.data.demo_kind="cxr"); class_names must then be those classes.
    s.manifest = ""
    s.demo_masks = "lesion"  # demo masks: lesion | tissue (demo_kind mri) | lungs (demo_kind cxr)
    # A mask with no foreground at all (every pixel background) on a row that has a mask: "allow" (a slice
    # or scan that does not show the structure, e.g. no lesion; whole 2D images with one are named in a
    # warning) or "refuse" (the structure is always in view, e.g. lungs on a chest radiograph: such a mask
    # is a failed or missing label; every such file is named, with its manifest line).
    s.empty_masks = "allow"
    s.class_names = ("background", "lesion")  # mask label value i is class_names[i]; 0 is background
    s.image_size = 0  # model input (square); 0 = the pretraining run's global crop size
    # 3D model input (D, H, W) voxels at the target spacing, each a multiple of the patch size; () = the largest
    # volume's sides rounded up to one. Volumes are centred and zero-padded to it, those larger scaled down.
    s.volume_shape = ()
    # HD95's pixel spacing of a 2D image: its file's own, else its manifest row's pixel_spacing, else this key.
    s.assumed_spacing_mm = ()  # (row, col) mm when neither file nor manifest gives one (PNG/JPEG); () = 1 px
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
    s.ce_weight = 1.0  # weight of the cross-entropy loss
    s.classification_weight = 0.0  # weight of the classification head's loss; 0 = no classification head
    s.label_column = ""  # the classification target; with the demo, empty = lesion class shown on the slice
    # Optimisation: AdamW, linear warm-up then cosine decay, a fixed number of steps for every fraction.
    s.steps = 2000
    s.batch_size = 32  # images (volumes in 3D) per step
    s.lr = 1e-3  # peak AdamW learning rate
    s.warmup_steps = 100  # steps of the linear lr warm-up
    s.weight_decay = 1e-4  # AdamW weight decay
    s.eval_every = 200  # steps between val evaluations (training curves)
    # Supervised baselines trained from scratch on the same training subsets, evaluated and reported beside
    # the heads (2D only): "unet" = medjax.models.unet; () = none.
    s.baselines = ("unet",)
    s.unet_width = 64  # channels of the U-Net's first level, doubled at every level down (64: the classic size)
    s.unet_depth = 4  # U-Net pooling steps (4: the classic five levels); inputs are padded to a multiple of 2**depth
    # The U-Net's own AdamW (clipped at norm 1, warm-up then cosine decay); batch size, loss and augmentation
    # are the heads'. Trained from nothing, it needs more steps than a head on fixed tokens.
    s.unet_steps = 4000  # U-Net training steps per run
    s.unet_lr = 1e-3  # U-Net peak learning rate
    s.unet_weight_decay = 1e-4  # U-Net AdamW weight decay (conv kernels only)
    s.unet_warmup_steps = 100  # steps of the U-Net's linear lr warm-up
    # Augmentation (fine-tuned backbone and U-Net only; frozen tokens are computed once, unaugmented).
    # Horizontal (left-right) flip of image and mask together; refused with sided classes (a class name holding
    # "left" or "right"): a flipped right lung would be taught as the left one.
    s.flip_p = 0.5
    s.crop_scale = (0.6, 1.0)  # random resized crop area (3D: volume) range of image and mask (nearest); (1, 1) = off
    # Metrics: Dice per class, background excluded. Ground truth and prediction both empty:
    # "nan" = the case is left out of the mean (MONAI), "one" = it counts as a perfect 1.0.
    s.empty_rule = "nan"
    # Few labels: train on this fraction of the training patients (whole patients), one run per seed.
    s.label_fractions = (1.0,)
    s.fraction_seeds = (0,)  # one patient draw (and training run) per seed
    s.eval_batch = 64  # images (volumes) per batch when evaluating
    s.overlay_cases = 4  # test cases drawn as overlays (and saved as prediction PNGs) per init and head

    c.data = config_lib.data_config()  # same keys and meaning as the pretraining config's data section
    if multitask:
        s.classification_weight = 0.5
        s.backbone_lr_mult = 0.1  # one backbone shared by both heads only when it is trained
        s.baselines = ()  # the comparison is between inits of the shared backbone; the U-Net has no classifier
    if variant in ("demo", "demo3d"):
        # Brain tissue: the demo's lesions are a few pixels, smaller than a patch, and a CPU-length
        # pretraining does not learn them (BUILD_NOTES), while tissue depends on the contrast it learns.
        s.demo_masks = "tissue"
        s.class_names = DEMO_MASK_CLASSES["tissue"]
        if multitask:
            s.label_column = "contrast"  # T1 / T2 / FLAIR: a second task the pretraining can help with
    if variant == "demo":
        config_lib.use_demo_data(c.data)
        s.decoder_channels = (32, 16, 8)
        s.batch_size = 16
        _demo_schedule(s, multitask, warmup_steps=20, fraction_seeds=(0, 1))
        _demo_unet(s)
    elif variant == "demo_cxr":
        _demo_cxr(c, multitask)
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
        s.unet_width, s.unet_depth, s.unet_steps, s.unet_warmup_steps = 4, 2, 6, 2
        config_lib.use_smoke_data(c.data)
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


def _demo_unet(s) -> None:
    """The demo variants' U-Net: the classic five levels at an eighth of the classic width (8 channels first,
    0.49 M parameters), 150 steps of 16 slices (its val Dice on the chest X-ray demo's lungs levels off by
    step 100): a step at 112 px takes 0.57 s of CPU time, at width 16 three times that, which would make the
    U-Net most of a :demo_cxr run."""
    s.unet_width, s.unet_depth = 8, 4
    s.unet_steps, s.unet_warmup_steps, s.unet_lr = 150, 15, 2e-3


def _demo_cxr(c, multitask: bool) -> None:
    """Lung segmentation on the synthetic chest X-ray demo (python -m medjax.data.demo OUT --kind=cxr): right
    and left lung at each film's own 128 px grid, HD95 in mm from the manifest's pixel_spacing, the heads of a
    configs/dinov2_reg.py:demo_cxr run (its 112 px input) against random init and the U-Net. Multi-task adds
    the 3-class diagnosis (normal / pneumonia / covid)."""
    s = c.segment
    config_lib.use_demo_cxr_data(c.data)
    s.demo_masks = "lungs"
    s.class_names = DEMO_MASK_CLASSES["lungs"]
    s.empty_masks = "refuse"  # lungs are in view on every PA film: an empty lung mask is a failed label
    s.flip_p = 0.0  # lungs have sides: a flipped film would teach the right lung as the left one
    s.decoder_channels = (32, 16, 8)
    s.batch_size = 16
    s.eval_batch = 32
    if multitask:
        s.label_column = "diagnosis"
        s.steps, s.lr, s.warmup_steps, s.eval_every = 150, 1e-3, 15, 50
        return
    s.heads = ("linear", "decoder")
    s.steps, s.lr, s.warmup_steps, s.eval_every = 300, 3e-3, 20, 100
    s.label_fractions = (0.25, 1.0)
    s.fraction_seeds = (0,)
    _demo_unet(s)


def _volumes(c, variant: str) -> None:
    """3D: the data of the 3D pretraining variant the backbone comes from (configs/dinov2_reg_3d.py)."""
    c.segment.spatial_dims = 3
    c.segment.baselines = ()  # the U-Net baseline is 2D
    if variant == "demo3d":  # the :demo run's 40 patients (16 x 75 x 75 voxels at 3 mm)
        config_lib.use_demo_data(c.data)
    else:  # the 2D :smoke segmentation's 12 patients (8 x 37 x 37 voxels at 6 mm): one demo folder for both
        config_lib.use_smoke_data(c.data)
