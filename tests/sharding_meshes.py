"""A few pretraining steps on meshes of 8 simulated CPU devices, compared with one device.

    JAX_PLATFORMS=cpu python -m tests.sharding_meshes OUT.json   (from the repository root)

Run as its own process (``tests/test_sharding.py`` does): the device count must
be set before JAX starts its backend. Every run uses the real trainer pieces
(``init_sharded_state``, ``BatchPlacer``, ``jit_train_step``) on the same three
global batches of 16 images from the real Grain pipeline; only the mesh and the
per-device batch differ (the mixed mesh with Sinkhorn-Knopp centring, the others with
the softmax centre). OUT.json gets, per case, the largest relative
difference to the one-device run of each metric and of every state leaf, and
how many state leaves were split over the ``fsdp`` axis.
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from medjax import sharding  # noqa: E402
from tests.phantom import DemoSlices  # noqa: E402
from medjax.objectives import dino, ibot, koleo  # noqa: E402
from medjax.schedules import as_step_input, pretrain_schedules  # noqa: E402
from medjax import optim  # noqa: E402
from medjax.pretrain.trainer import init_sharded_state, jit_train_step, make_train_step  # noqa: E402
from medjax.pretrain.batches import BatchPlacer, pretrain_iterator  # noqa: E402
from medjax.pretrain.loss_model import build_models  # noqa: E402
from tests.sharding_compare import rel_diff, state_diff  # noqa: E402
from tests.helpers import smoke_config  # noqa: E402

GLOBAL_BATCH = 16
STEPS = 3
METRICS = ("loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss", "grad_norm",
           "teacher_entropy", "teacher_batch_entropy")


def base_config(centering: str):
    # LayerScale 0.1 instead of 1e-5: at 1e-5 every image's CLS token is nearly the same at
    # initialisation, and KoLeo's nearest neighbour (and its duplicate threshold) then flips with
    # float32 rounding, which no layout can reproduce. The recipe is otherwise the :smoke one.
    config = smoke_config(layerscale=0.1)
    config.loss.centering = centering
    # KoLeo over the whole batch: the per-device form depends on the per-device batch by design (as the
    # reference's does on the GPU count); ``global_reductions`` checks it on 8 devices.
    config.loss.koleo_batch = "global"
    config.mesh.fsdp_min_size = 256  # split the smoke model's parameters too, not just big ones
    return config


def host_batches(config):
    source = DemoSlices(num_patients=4, slices_per_patient=4, size=48, seed=0)
    it = pretrain_iterator(config, source, GLOBAL_BATCH, num_workers=0, process_index=0, process_count=1)
    return [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(STEPS)]


def run(config, batches, data: int, fsdp: int, initial=None):
    """Steps on a data x fsdp mesh; returns (metrics per step, final state, number of split leaves).

    The state starts from ``initial`` (a host copy) laid out on the mesh, or from
    ``init_sharded_state`` (one compilation less per mesh: the two-process test
    covers a sharded initialisation)."""
    n = data * fsdp
    config = config.copy_and_resolve_references()
    config.mesh.data, config.mesh.fsdp = data, fsdp
    config.train.batch_size_per_device = GLOBAL_BATCH // n
    mesh = sharding.make_mesh(data, fsdp, devices=jax.devices()[:n])
    models = build_models(config)
    adam = optim.make_adam(config.optim.adamw_beta1, config.optim.adamw_beta2)
    init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    if initial is None:
        state, shardings = init_sharded_state(models, config, init_rng, adam, mesh)
        initial = jax.device_get(state)
    else:
        shardings = sharding.param_shardings(initial, mesh, config.mesh.fsdp_min_size)
        state = jax.device_put(initial, shardings)
    rules = optim.ParamRules.from_params(state.student, depth=models.backbone.depth,
                                         layerwise_decay=config.optim.layerwise_decay,
                                         patch_embed_lr_mult=config.optim.patch_embed_lr_mult)
    place = BatchPlacer(mesh, n_global=config.crops.n_global, n_local=config.crops.n_local)
    step = jit_train_step(make_train_step(models, config, rules, adam), shardings, place.shardings, mesh)
    schedules = as_step_input(pretrain_schedules(config, GLOBAL_BATCH))
    metrics = []
    for batch in batches:
        state, m = step(state, place(batch), step_rng, schedules)
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    split = sum(any(a is not None for a in s.spec) for s in jax.tree.leaves(shardings))
    assert all(s.spec == leaf.sharding.spec for s, leaf in zip(jax.tree.leaves(shardings), jax.tree.leaves(state)))
    return metrics, jax.tree.map(np.asarray, jax.device_get(state)), split, initial


def compare(reference, other) -> dict:
    (m_ref, s_ref, _, _), (m, s, split, _) = reference, other
    worst, worst_key, leaves = state_diff(s_ref, s)
    return {
        "metrics": {k: max(rel_diff(a[k], b[k]) for a, b in zip(m_ref, m)) for k in METRICS if k in m_ref[0]},
        "losses": [b["loss"] for b in m],
        "state": worst,
        "worst_leaf": worst_key,
        "split_leaves": split,
        "leaves": leaves,
    }


def global_reductions() -> dict:
    """Sinkhorn-Knopp and the centre updates on a batch split over 8 devices vs on one device."""
    logits = jax.random.normal(jax.random.PRNGKey(3), (32, 64)) * 3.0
    valid = np.arange(32) % 5 != 0  # iBOT buffer with padding rows
    center = np.linspace(-1, 1, 64, dtype=np.float32)[None]
    functions = {
        "sinkhorn_knopp": lambda x, v: dino.sinkhorn_knopp(x, 0.04),
        "sinkhorn_knopp_masked": lambda x, v: dino.sinkhorn_knopp(x, 0.04, valid=v),
        "update_center": lambda x, v: dino.update_center(center, x, 0.9),
        "update_masked_center": lambda x, v: ibot.update_masked_center(center, x, v, 0.9),
    }
    mesh = sharding.make_mesh(2, 4)
    split = sharding.batch_sharding(mesh)
    out = {}
    for name, fn in functions.items():
        one = np.asarray(jax.jit(fn)(logits, valid))
        sharded = jax.jit(fn, in_shardings=(split, split))(jax.device_put(logits, split), jax.device_put(valid, split))
        out[name] = rel_diff(one, sharded)
    out.update(koleo_per_device(split))
    return out


def koleo_per_device(split) -> dict:
    """KoLeo per device (groups of 2 images per crop, 8 devices) vs the per-group losses on one device."""
    tokens = np.random.default_rng(5).normal(size=(2 * 16, 8)).astype(np.float32)  # 2 crops x 16 images
    term = jax.jit(jax.value_and_grad(lambda x: koleo.koleo_term(x, 2, group_size=2)), in_shardings=split)
    value, grad = term(jax.device_put(tokens, split))
    by_hand = jax.value_and_grad(
        lambda x: sum(jnp.mean(jnp.stack([koleo.koleo_loss(c[g:g + 2]) for g in range(0, 16, 2)]))
                      for c in jnp.split(x, 2)))
    want, want_grad = jax.jit(by_hand)(tokens)
    whole = float(jax.jit(lambda x: koleo.koleo_term(x, 2))(tokens))
    return {"koleo_per_device": rel_diff(np.asarray(want), np.asarray(value)),
            "koleo_per_device_grad": rel_diff(np.asarray(want_grad), np.asarray(grad)),
            "koleo_per_device_vs_global": abs(float(value) - whole)}


def main(out_path):
    config = base_config("softmax")
    batches = host_batches(config)
    reference = run(config, batches, 1, 1)
    initial = reference[3]
    results = {"steps": {}, "functions": global_reductions()}
    for data, fsdp in ((8, 1), (1, 8)):
        other = run(config, batches, data, fsdp, initial=initial)
        results["steps"][f"data={data} fsdp={fsdp}"] = compare(reference, other)
    sinkhorn = base_config("sinkhorn_knopp")
    reference = run(sinkhorn, batches, 1, 1, initial=initial)
    results["steps"]["data=2 fsdp=4 sinkhorn_knopp"] = compare(reference, run(sinkhorn, batches, 2, 4, initial=initial))
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
