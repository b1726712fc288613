"""Classification fine-tuning (backbone + one linear head per target column); variants: demo, demo_cxr, smoke,
demo3d, smoke3d, mae.

    python -m medjax.main --config=configs/finetune.py:demo --workdir=runs/demo_finetune \
        --config.finetune.checkpoint_dir=runs/demo
    python -m medjax.main --config=configs/finetune.py:demo_cxr --workdir=runs/demo_cxr_finetune \
        --config.finetune.checkpoint_dir=runs/demo_cxr  # a configs/dinov2_reg.py:demo_cxr run
    python -m medjax.main --config=configs/finetune.py:demo3d --workdir=runs/demo3d_finetune \
        --config.finetune.checkpoint_dir=runs/demo3d      # a configs/dinov2_reg_3d.py:demo run

init=checkpoint takes the model, crop size and normalisation from the pretraining run (a 3D run
also its volumes' target_spacing and normalisation); init=official from the weights file;
init=random builds config.model at image_size. A 3D backbone fine-tunes on whole volumes, one per
manifest row; the 3D variants set config.model.spatial_dims=3, which a 2D run's checkpoint refuses.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the recipes beside this file
import config_lib  # noqa: E402
import dinov2_reg  # noqa: E402
import dinov2_reg_3d  # noqa: E402

VARIANTS = ("", "demo", "demo_cxr", "smoke", "demo3d", "smoke3d", "mae")


def get_config(variant: str = ""):
    variant = config_lib.check_variant(variant, VARIANTS, "configs/finetune.py")
    c = ml_collections.ConfigDict()
    c.mode = "finetune"  # the job: classification fine-tuning (medjax/finetune)
    c.seed = 0  # seeds the heads' initialisation, the data order and the augmentations

    f = c.finetune = ml_collections.ConfigDict()
    f.init = "checkpoint"  # checkpoint | official | random
    f.checkpoint_dir = ""  # init=checkpoint: the --workdir of a pretraining run (holds checkpoints/)
    f.step = -1  # checkpoint step; -1 = the latest
    f.official_weights = ""  # init=official: official weights (.pth, .npz, .safetensors)
    f.official_kind = "dinov2"  # dinov2 (a DINOv2 backbone) | mae (the encoder of MAE weights, full or encoder-only)
    f.image_size = 0  # input side (a cube's for 3D); 0 = the pretraining crop size (checkpoint), or 224 (2D) / 96 (3D)
    # Also trained with the same budget: "random" (this ViT from random weights, every block trained), "resnet50",
    # "densenet121" (supervised CNNs, from scratch or from the weights below); () = none
    f.baselines = ("random",)  # random | resnet50 | densenet121, any of them (see above)
    f.resnet50_weights = ""  # torchvision/timm resnet50 weights (.pth, .safetensors, .npz); empty = from scratch
    f.densenet121_weights = ""  # torchvision/timm densenet121 weights (.pth, .safetensors, .npz); empty = from scratch
    f.cnn_optimizer = "sgd"  # the CNNs' optimiser: sgd (momentum 0.9, torchvision's recipe) | adamw (the ViT's betas)
    f.cnn_base_lr = 0.1  # the CNNs' lr at batch 256 (0.1 for SGD; about 1e-3 for AdamW), same warm-up and cosine
    f.cnn_weight_decay = 1e-4  # the CNNs' weight decay on conv and linear kernels (1e-4 SGD; about 0.05 AdamW)
    f.cnn_width = 1.0  # CNN channel multiplier (1 = ResNet-50 / DenseNet-121; smaller for quick tests)
    f.cnn_depth = 1.0  # CNN multiplier of blocks per stage / layers per dense block (1 = the published depth)
    # Data: a CSV manifest with label columns; empty = the demo dataset (lesion class shown on the slice;
    # in 3D the patient's).
    f.manifest = ""
    f.targets = ()  # label columns, one head each; empty with the demo = ("lesion",)
    f.label_fractions = (1.0,)  # fractions of the training patients whose labels are used, e.g. (0.01, 0.1, 1.0)
    f.fraction_seeds = (0,)  # one patient draw (and training run) per seed; results are mean ± std
    # What trains: the first freeze_blocks blocks and the embeddings stay fixed (0 = full fine-tuning).
    f.freeze_blocks = 0
    # Optimiser: AdamW, lr = base_lr * batch_size / 256, linear warm-up then cosine to min_lr.
    f.epochs = 30  # passes over the full training split; every label fraction gets the same number of steps
    f.batch_size = 64  # images (volumes in 3D) per step
    f.base_lr = 5e-4  # lr at batch 256 (scaled linearly with batch_size)
    f.min_lr = 1e-6  # lr at the end of the cosine decay
    f.warmup_epochs = 3  # passes of the linear lr warm-up
    f.weight_decay = 0.05  # AdamW weight decay (none on biases and norms)
    f.layerwise_decay = 0.75  # lr multiplier decay ** (depth + 1 - layer); 1 = none
    f.patch_embed_lr_mult = 1.0  # lr multiplier of the patch embedding
    f.clip_grad = 3.0  # global gradient norm; 0 = no clipping
    f.adamw_beta1 = 0.9  # AdamW first-moment decay
    f.adamw_beta2 = 0.999  # AdamW second-moment decay
    f.drop_path_rate = 0.1  # rising linearly over the blocks to this value
    f.class_weighted = True  # cross-entropy weighted by inverse class frequency in the training subset
    # The head's input: cls_patch (the last block's normed CLS + mean patch token) | avg (MAE: the mean
    # pre-norm patch token through a LayerNorm of its own).
    f.pooling = "cls_patch"
    f.label_smoothing = 0.0  # cross-entropy label smoothing (0.1 in MAE's recipe)
    f.mixup = 0.0  # Beta alpha of Mixup (0.8 in MAE's recipe); 0 = off
    f.cutmix = 0.0  # Beta alpha of CutMix (1.0 in MAE's recipe); 0 = off; both on: one of them per batch
    # Train transform: random resized crop (3D: box, scale = fraction of the voxels) + left-right flip;
    # eval: the whole slice (volume) resized.
    f.train_scale = (0.08, 1.0)
    f.train_ratio = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio range of the random resized crop
    f.flip_p = 0.5  # probability of a left-right flip
    f.eval_every = 0  # steps between val evaluations; 0 = once per pass over the full training split
    f.keep = "best_val"  # best_val (best mean val balanced accuracy over targets) | last
    f.eval_batch = 128  # images (volumes) per batch when evaluating
    # k-fold cross-validation on the manifest's fold column (folds 0..k-1): run k = cv_folds fine-tunings, fold
    # i test and fold i+1 (mod k) val, each in WORKDIR/fold_<i>, then mean ± std of the test metrics; 0 = off
    f.cv_folds = 0

    # The model built by init=random (otherwise only its spatial_dims is read) and the data section,
    # as in pretraining.
    if variant.endswith("3d"):
        base = dinov2_reg_3d.get_config(variant[:-2])
    else:
        base = dinov2_reg.get_config()
    c.model = base.model
    c.data = base.data
    if variant == "demo":
        # The demo run's slices; the slice-level lesion class (small findings: large crops only) and
        # the contrast (T1 / T2 / FLAIR), one head each, for 4 passes over the training slices.
        config_lib.use_demo_data(c.data)
        f.targets = ("lesion", "contrast")
        f.epochs = 4
        f.warmup_epochs = 1
        f.batch_size = 32
        f.base_lr = 4e-3
        f.train_scale = (0.5, 1.0)
    elif variant == "demo_cxr":
        # The chest X-ray demo's 3-class diagnosis (normal / pneumonia / covid) of its 128 px films, resized
        # to the pretraining run's 112 px crops: a configs/dinov2_reg.py:demo_cxr ViT (6 blocks) with its
        # first 3 blocks frozen, beside the same ViT from random weights with every block trained (the
        # frozen ViT's speed-up is measured against it) and the supervised standards ResNet-50 and
        # DenseNet-121 from scratch (or from torchvision/timm weights: resnet50_weights, densenet121_weights),
        # all on the same steps and batches. No left-right flips: a chest film is not symmetric. About 75
        # training films: 6 passes are 18 steps of 32; the full-size CNNs cost most of the run (a step of
        # 32 films takes seconds on 2 CPU cores, and each compiles once).
        f.targets = ("diagnosis",)
        f.freeze_blocks = 3
        f.baselines = ("random", "resnet50", "densenet121")
        f.epochs = 6
        f.warmup_epochs = 1
        f.batch_size = 32
        f.base_lr = 4e-3
        f.train_scale = (0.5, 1.0)
        f.flip_p = 0.0
        f.eval_batch = 64
        config_lib.use_demo_cxr_data(c.data)
    elif variant == "smoke":
        f.targets = ("lesion", "contrast")
        f.label_fractions = (0.5, 1.0)
        f.epochs = 1
        f.warmup_epochs = 0
        f.batch_size = 8
        f.eval_every = 6
        f.eval_batch = 32
        config_lib.use_smoke_data(c.data)
    elif variant == "demo3d":
        # The 3D demo run's model and volumes (3 mm isotropic, 75 x 75 x 16 voxels; the whole volume
        # is resized to the pretraining crop, 32^3). One example per series: the patient's lesion
        # class (first: few-label subsets are stratified by it) and the contrast, one head each.
        # 84 training volumes: 20 passes are 120 steps of 16 (1-2 min per init on 2 CPU cores). Peak
        # lr 2e-3: at the 2D demo's 2.5e-4 (base_lr 4e-3) the pretrained model ended at train loss
        # 1.63 and val contrast balanced accuracy 0.92 after 120 steps (2e-3: 1.42 and 1.0).
        f.targets = ("lesion", "contrast")
        # 10 % of the patients too: a whole volume's contrast is solved from random weights with all of
        # them, so the few-label runs are where a pretrained start can show.
        f.label_fractions = (0.1, 1.0)
        f.fraction_seeds = (0, 1)
        f.epochs = 20
        f.warmup_epochs = 2
        f.batch_size = 16
        f.base_lr = 3.2e-2
        f.train_scale = (0.5, 1.0)
        f.eval_batch = 32
    elif variant == "mae":
        # The official MAE fine-tuning recipe (FINETUNE.md, ViT-B): global average pooling + fc_norm, layer
        # decay 0.65, drop path 0.1, label smoothing 0.1, Mixup 0.8 / CutMix 1.0, blr 5e-4, 100 epochs with 5 of
        # warm-up, weight decay 0.05, no gradient clipping, no class weighting. Point checkpoint_dir at an MAE
        # run (configs/mae.py) or official_weights at MAE weights with official_kind=mae.
        f.pooling = "avg"
        f.layerwise_decay = 0.65
        f.drop_path_rate = 0.1
        f.label_smoothing = 0.1
        f.mixup, f.cutmix = 0.8, 1.0
        f.base_lr = 5e-4
        f.epochs, f.warmup_epochs = 100, 5
        f.weight_decay = 0.05
        f.clip_grad = 0.0
        f.class_weighted = False
        f.train_scale = (0.08, 1.0)
    elif variant == "smoke3d":
        # The 2D smoke's 12 demo patients (so both share one demo folder; 4 per split), 2 passes of
        # 2 steps.
        f.targets = ("lesion", "contrast")
        f.label_fractions = (0.5, 1.0)
        f.epochs = 2
        f.warmup_epochs = 0
        f.batch_size = 6
        f.eval_every = 2
        f.eval_batch = 8
        f.train_scale = (0.3, 1.0)
        c.data.demo_patients = 12
    return c
