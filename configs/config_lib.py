"""Pieces every experiment in configs/ shares: the data section, the in-run evaluations, the mesh and
the multi-process settings, the demo data's size, and the variant check.

An experiment file imports this module by putting its own folder on ``sys.path`` first, so a copy
of configs/ works from anywhere.
"""

from __future__ import annotations

import ml_collections

DEMO_EVAL_LABEL = "contrast"  # the demo's evaluation task: MRI series type (T1 / T2 / FLAIR) per slice


def check_variant(variant: str, variants, config_file: str) -> str:
    """``variant`` (None -> ""), or one sentence naming the file's variants."""
    variant = variant or ""
    if variant not in variants:
        known = ", ".join(v for v in variants if v)
        raise ValueError(f"Unknown variant {variant!r} of {config_file}; choose one of {known} (or none).")
    return variant


def data_config() -> ml_collections.ConfigDict:
    """Where the images come from and how they are read; the same keys for every job."""
    d = ml_collections.ConfigDict()
    d.manifest = ""  # CSV manifest of the user's scans; empty = the built-in demo dataset
    d.extra_columns = ""  # comma-separated manifest columns to accept besides the known ones
    # JSON: which folds of the manifest's integer fold column are test and val, e.g. '{"test": [0], "val": [1]}'
    # (folds not named -> train); empty = the manifest's split column
    d.folds = ""
    d.uncertain_labels = "ignore"  # a -1 (uncertain) cell of a 0/1 label column: ignore (left out of loss and AUC) | zeros | ones
    d.slice_axis = "axial"  # axial | coronal | sagittal: 2D slices cut from each volume
    d.skip_background = True  # True: slices that are almost all background are left out of the index
    # Intensity normalisation per volume, JSON: {"method": "percentile", "low": .., "high": ..} (MRI,
    # X-ray) or {"method": "ct_window", "preset": "soft_tissue"} / {"method": "ct_window", "level": 40,
    # "width": 400} (CT); see medjax.data.intensity.
    d.normalisation = '{"method": "percentile", "low": 0.5, "high": 99.5}'
    d.target_spacing = ()  # e.g. (1.0, 1.0, 3.0) mm: resample volumes (masks nearest) before slicing
    d.skip_bad = False  # True: skip unreadable rows (they are listed), False: stop at the first
    d.volume_index = -1  # volume of a 4D file (fMRI/diffusion NIfTI, folder of Siemens mosaics) to use; -1 = refuse 4D
    d.mask_resample = False  # True: a mask on another grid than its image is resampled onto it (nearest neighbour)
    d.mask_values = ""  # JSON map of stored mask values to labels, e.g. '{"255": 1}'; empty = values as they are
    d.volumes_in_memory = 8  # decoded volumes kept in an LRU (shuffled slices revisit volumes)
    d.cache_dir = ""  # if set, normalised slices are cached there in ArrayRecord shards
    d.num_workers = 2  # Grain worker processes preparing batches; 0 = in the main process
    d.index_workers = -1  # processes reading rows to build an index and writing the slice cache; -1 = one per core, 0 = here
    d.index_dir = ""  # if set, index builds keep each finished row there, so an interrupted build resumes
    d.index_from_headers = True  # True: without background skipping or masks, slices are counted from file headers
    d.demo_dir = ""  # where the demo dataset is written; empty = WORKDIR/demo_data
    d.demo_kind = "mri"  # built-in demo dataset: mri (brain MRI series) | cxr (chest X-ray films, lung masks)
    d.demo_patients = 60  # built-in demo dataset: number of synthetic patients
    d.demo_slices = 16  # built-in demo dataset: axial slices per series (mri only)
    d.demo_image_size = 256  # built-in demo dataset: rows and columns of each slice or film
    return d


def use_demo_data(data: ml_collections.ConfigDict) -> None:
    """The ``:demo`` runs' dataset; every job's ``:demo`` variant reads the same files."""
    data.demo_patients = 40
    data.demo_image_size = 128
    data.volumes_in_memory = 128  # all 120 demo series (1 MB each): no re-decoding
    data.num_workers = 0


def use_demo_cxr_data(data: ml_collections.ConfigDict) -> None:
    """The ``:demo_cxr`` runs' dataset: the synthetic chest X-ray films of 60 patients (40 / 10 / 10 by split,
    about 110 films at 128 px). An evaluation ``:demo`` config reuses a ``:demo_cxr`` run's files with
    ``--config.data.demo_kind=cxr --config.data.demo_patients=60``."""
    data.demo_kind = "cxr"
    data.demo_patients = 60
    data.demo_image_size = 128
    data.volumes_in_memory = 128  # every film stays decoded (64 KB each)
    data.num_workers = 0


def use_smoke_data(data: ml_collections.ConfigDict) -> None:
    """The evaluation ``:smoke`` variants' 12 small patients (one demo folder for all of them)."""
    data.demo_patients = 12
    data.demo_slices = 8
    data.demo_image_size = 48
    data.num_workers = 0


def evals_config() -> ml_collections.ConfigDict:
    """The ``evals`` section of a pretraining config: the teacher (or encoder) probed during the run."""
    e = ml_collections.ConfigDict()
    e.every = 0  # steps between evaluations of the backbone; 0 = none during the run
    e.final = False  # at the last step: pretrained vs random init, eval/results.md, printed table
    e.knn = True  # score the backbone by kNN on its CLS token
    e.linear_probe = True  # score the backbone by the 52 linear heads
    e.manifest = ""  # labelled CSV manifest; empty = config.data.manifest (or the demo dataset)
    e.label_column = ""  # empty with the demo = lesion class shown on the slice
    e.selection = "accuracy"  # accuracy | balanced_accuracy | mean_auc: best head on val
    e.knn_k = (10, 20, 100, 200)  # neighbour counts of the kNN evaluation
    e.probe_epochs = 10  # passes over the training slices per linear-probe fit
    e.batch_size = 128  # images per batch of the evaluation (features and linear heads)
    # Other pretraining runs (--workdirs, comma-separated) put beside this one in the final table when they
    # exist and read the same inputs, e.g. a DINOv2 run beside an MAE run; others are named and left out.
    e.compare_runs = ""
    return e


def mesh_config() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.data = -1  # -1 = all remaining devices
    m.fsdp = 1  # > 1: parameters and optimizer state split over this many devices (FSDP)
    m.fsdp_min_size = 2**14  # state leaves with fewer elements stay replicated
    return m


def distributed_config() -> ml_collections.ConfigDict:
    """Several processes (hosts): see medjax/distributed.py and launch/README.md. Under SLURM (srun)
    everything is detected; elsewhere give process 0's host:port and each process's id."""
    d = ml_collections.ConfigDict()
    d.coordinator_address = ""  # host:port of process 0; "" = SLURM or a single process
    d.num_processes = 1  # processes (hosts) taking part; ignored under SLURM
    d.process_id = 0  # this process's rank among num_processes; ignored under SLURM
    d.initialization_timeout = 300  # seconds to wait for the coordinator and the other processes
    return d
