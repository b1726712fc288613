"""DINOv2 linear evaluation of a pretraining run (52 heads on frozen teacher features); variants: demo,
demo_cxr, smoke.

    python -m medjax.main --config=configs/linear_probe.py:demo --workdir=runs/demo_probe \
        --config.probe.checkpoint_dir=runs/demo
    python -m medjax.main --config=configs/linear_probe.py:demo_cxr --workdir=runs/demo_cxr_probe \
        --config.probe.checkpoint_dir=runs/demo_cxr      # a configs/dinov2_reg.py:demo_cxr run

The backbone (model and crop settings) comes from the run's checkpoint; this file sets the
probe and the data it is evaluated on.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared pieces beside this file
import config_lib  # noqa: E402

VARIANTS = ("", "demo", "demo_cxr", "smoke")


def get_config(variant: str = ""):
    variant = config_lib.check_variant(variant, VARIANTS, "configs/linear_probe.py")
    c = ml_collections.ConfigDict()
    c.mode = "linear_probe"  # the job: linear probe and kNN of a pretraining run (medjax/probe)
    c.seed = 0  # seeds the heads' initialisation, the data order and the few-label draws

    c.probe = ml_collections.ConfigDict()
    # Required: the --workdir of a pretraining run (holds checkpoints/), or several separated by commas to
    # compare runs (e.g. DINOv2 vs MAE) side by side under one protocol, each beside its random init.
    c.probe.checkpoint_dir = ""
    c.probe.step = -1  # checkpoint step to probe; -1 = the latest
    c.probe.manifest = ""  # CSV manifest with a label column; empty = the demo dataset, slice-level lesion class
    c.probe.label_column = ""  # required with a manifest; with the demo, empty = lesion shown on the slice
    # The reference: batch 128, 10 "epochs" of 1250 iterations, val every 1250 iterations.
    c.probe.batch_size = 128
    c.probe.epochs = 10  # epochs of epoch_length iterations each head trains
    c.probe.epoch_length = 1250  # iterations per epoch; 0 = one pass over the training slices
    c.probe.eval_every = 1250  # iterations between val evaluations; 0 = once per epoch
    # label_column: several comma-separated 0/1 columns = a multi-label task
    c.probe.selection = "accuracy"  # accuracy | balanced_accuracy (multi-class) | mean_auc (multi-label)
    c.probe.features = "precomputed"  # precomputed (fast) | augmented (random resized crop + flip per step)
    # Few labels: also train on these fractions of the training patients (whole patients, stratified),
    # once per seed; () = only the full training set.
    c.probe.label_fractions = (0.01, 0.1, 0.25, 0.5, 1.0)
    c.probe.fraction_seeds = 3  # patient draws (and probe runs) per label fraction below 1
    c.probe.random_baseline = True  # also probe a randomly initialised backbone
    c.probe.knn_k = (10, 20, 100, 200)  # kNN on the CLS token (DINOv2's, T = 0.07) with these k; () = none
    c.probe.feature_batch = 64  # images per backbone call while precomputing features
    # k-fold cross-validation on the manifest's fold column (folds 0..k-1): run k = cv_folds probes, fold i
    # test and fold i+1 (mod k) val, each in WORKDIR/fold_<i>, then mean ± std of the test metrics; 0 = off
    c.probe.cv_folds = 0

    # The evaluation data; same keys and meaning as the pretraining config's data section.
    c.data = config_lib.data_config()
    if variant == "demo":
        # A few thousand demo slices: passes over the training set rather than 1250-step epochs.
        c.probe.epochs = 30
        c.probe.epoch_length = 0
        c.probe.eval_every = 0
        c.probe.label_column = config_lib.DEMO_EVAL_LABEL  # series type per slice; "" = the slice-level lesion class
        config_lib.use_demo_data(c.data)
    elif variant == "demo_cxr":
        from medjax.data.demo_cxr import FINDINGS  # the chest X-ray demo's finding columns

        # The six findings as one multi-label task: sigmoid heads, best head by val mean AUC, uncertain (-1)
        # labels left out (config.data.uncertain_labels); a few dozen training films, so passes over them, and
        # the few-label curve at 1 %, 10 %, 100 % of the training patients, three draws each.
        c.probe.epochs = 30
        c.probe.epoch_length = 0
        c.probe.eval_every = 0
        c.probe.label_column = ",".join(FINDINGS)
        c.probe.selection = "mean_auc"
        c.probe.label_fractions = (0.01, 0.1, 1.0)
        c.probe.fraction_seeds = 3
        c.probe.knn_k = ()  # kNN votes over classes and does not apply to findings
        config_lib.use_demo_cxr_data(c.data)
    elif variant == "smoke":
        c.probe.batch_size = 16
        c.probe.epochs = 3
        c.probe.epoch_length = 4
        c.probe.eval_every = 4
        c.probe.feature_batch = 32
        c.probe.label_fractions = (0.5, 1.0)
        c.probe.fraction_seeds = 2
        config_lib.use_smoke_data(c.data)
    return c
