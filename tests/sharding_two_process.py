"""One-process reference for the two-process pretraining run of ``tests/test_sharding.py``.

    JAX_PLATFORMS=cpu python -m tests.sharding_two_process WORKDIR OUT.json   (from the repository root)

The two-process run (``python -m medjax.main`` twice, ``OVERRIDES`` below plus
the coordinator flags, one CPU device each) trains 3 steps with a global batch
of 8: each process reads its 4 images per step from Grain (process p of 2) and
the trainer assembles the global batch. Exact batch equality with a one-process
*Grain* run is impossible by design: Grain gives each process every other
record of the shuffled stream and masks each process's batch on its own (as
the reference code masks each GPU's batch). So this script rebuilds the same
global batches by hand from the two processes' Grain streams over the demo data
that run wrote (crops concatenated crop by crop, masked-patch buffer recomputed
from the merged masks, independently of the trainer's index offsets), trains 3
steps on one device, and writes the largest relative differences to the run's
logged losses and to its step-3 checkpoint.
"""

import dataclasses
import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from medjax import sharding
from medjax.data.masking import mask_index_arrays
from medjax.reporting import read_metrics
from medjax.schedules import as_step_input, pretrain_schedules
from medjax import optim
from medjax.pretrain.trainer import init_sharded_state, jit_train_step, make_train_step
from medjax.data.sources import training_source
from medjax.pretrain.batches import BatchPlacer, pretrain_iterator
from medjax.pretrain.loss_model import LossConfig, build_models
from tests.sharding_compare import rel_diff, state_diff
from tests.helpers import smoke_config

STEPS = 3
PROCESSES = 2
# Both runs: LayerScale 0.1 so that KoLeo is well conditioned at initialisation (see
# tests/sharding_meshes.py); the parameters split over the two processes (FSDP) to exercise
# a sharded initialisation, sharded steps and a collective checkpoint.
OVERRIDES = {"model.layerscale": 0.1, "mesh.data": 1, "mesh.fsdp": 2, "mesh.fsdp_min_size": 256,
             "train.stop_at_step": STEPS}


def config_with_overrides():
    config = smoke_config()
    for key, value in OVERRIDES.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def merge(batches, n_global: int, n_local: int) -> dict:
    """The processes' host batches -> one crop-major global host batch (what one process would hold)."""

    def crop_major(key, n_crops):
        per_process = [np.split(np.asarray(b[key]), n_crops) for b in batches]
        return np.concatenate([part[c] for c in range(n_crops) for part in per_process])

    masks = crop_major("masks", n_global)
    bound = sum(len(b["mask_indices"]) for b in batches)
    indices, weights, _ = mask_index_arrays(masks, bound)
    return {"global_crops": crop_major("global_crops", n_global), "local_crops": crop_major("local_crops", n_local),
            "masks": masks, "mask_indices": indices, "mask_weights": weights}


def main(workdir, out_path):
    config = config_with_overrides()
    per_process = config.train.batch_size_per_device  # one device per process in the two-process run
    global_batch = per_process * PROCESSES
    config.train.batch_size_per_device = global_batch
    config.mesh.data, config.mesh.fsdp = 1, 1
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])

    source = training_source(config, workdir)  # the demo data the two-process run wrote
    streams = [pretrain_iterator(config, source, per_process, num_workers=0, process_index=p,
                                 process_count=PROCESSES) for p in range(PROCESSES)]
    models = build_models(config)
    adam = optim.make_adam(config.optim.adamw_beta1, config.optim.adamw_beta2)
    init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state, shardings = init_sharded_state(models, config, init_rng, adam, mesh)
    rules = optim.ParamRules.from_params(state.student, depth=models.backbone.depth,
                                         layerwise_decay=config.optim.layerwise_decay,
                                         patch_embed_lr_mult=config.optim.patch_embed_lr_mult)
    place = BatchPlacer(mesh, n_global=config.crops.n_global, n_local=config.crops.n_local)
    # KoLeo per device: in the two-process run each process's 4 images of a crop are one neighbour pool;
    # the merged batch holds them as consecutive rows, so the same pools are groups of `per_process`.
    loss_cfg = dataclasses.replace(LossConfig.from_config(config), koleo_group_size=per_process)
    step = jit_train_step(make_train_step(models, config, rules, adam, loss_cfg), shardings, place.shardings, mesh)
    schedules = as_step_input(pretrain_schedules(config, global_batch))
    losses = []
    for _ in range(STEPS):
        batch = merge([next(s) for s in streams], config.crops.n_global, config.crops.n_local)
        state, metrics = step(state, place(batch), step_rng, schedules)
        losses.append({k: float(v) for k, v in jax.device_get(metrics).items() if k.endswith("loss")})

    logged = {row["step"]: row for row in read_metrics(os.path.join(workdir, "metrics.jsonl"))}
    loss_diff = {k: max(rel_diff(losses[i][k], logged[i + 1][k]) for i in range(STEPS)) for k in losses[0]}
    path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    worst, worst_key, leaves = state_diff(state, saved)
    result = {"losses": losses, "logged_steps": sorted(logged), "loss_diff": loss_diff, "state_diff": worst,
              "worst_leaf": worst_key, "leaves": leaves}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
