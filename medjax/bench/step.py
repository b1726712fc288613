"""Benchmark of the pretraining step: seconds/step, images/s, FLOP/s vs this machine's matmul peak.

    python -m medjax.bench.step --config=configs/dinov2_reg.py:bench [--steps=20] [--workdir=runs/bench]
    python -m medjax.bench.step --config=configs/mae.py:bench       (the MAE step)

The step runs on one real batch from the pipeline (data time excluded), after
one compiling call, with the trainer's state layout (FSDP when config.mesh.fsdp > 1). FLOPs per step come from XLA's cost analysis of the
compiled step; the peak is the best of several large float32 (or bfloat16,
matching config.model.dtype) matmuls timed in the same process. Memory: XLA's
buffer accounting of the compiled step (state + batch, temporaries) and the
process's peak resident memory after the timed steps (which also holds the
Python runtime, the compiled code and the input pipeline's first batch).
"""

from __future__ import annotations

import resource
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from medjax import optim, sharding
from medjax.models.backbone import DTYPES
from medjax.pretrain.batches import PretrainData
from medjax.pretrain.loss_model import build_models
from medjax.pretrain.trainer import init_sharded_state, jit_train_step, make_train_step
from medjax.schedules import as_step_input, pretrain_schedules

CONFIG = config_flags.DEFINE_config_file("config", "configs/dinov2_reg.py:bench", "Pretraining config.")
STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
WORKDIR = flags.DEFINE_string("workdir", "runs/bench", "Where the demo data is written if no manifest is set.")


def matmul_peak_flops(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """Best dense-matmul FLOP/s of an n x n product on the default device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def step_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def step_memory_mib(compiled) -> dict:
    """XLA's own accounting of the compiled step's buffers, in MiB (deterministic, unlike resident memory):
    the arguments (train state + batch), the outputs, and the temporaries (activations kept for the
    backward pass, gradients, workspace) that the step needs on top of them at its peak."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    mib = 1024.0**2
    return {
        "state_and_batch_mib": stats.argument_size_in_bytes / mib,
        "outputs_mib": stats.output_size_in_bytes / mib,
        "aliased_mib": stats.alias_size_in_bytes / mib,  # outputs written over donated arguments
        "temporaries_mib": stats.temp_size_in_bytes / mib,
    }


def peak_resident_mib() -> float:
    """The process's peak resident set size so far (Linux reports KiB), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def dinov2_step(config, workdir: str):
    """``(jitted step, state, batch, inputs, global batch)`` of the DINOv2 trainer: one step is
    ``jitted(state, batch, *inputs)``."""
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    global_batch = config.train.batch_size_per_device * mesh.size
    models = build_models(config)
    adam = optim.make_adam(config.optim.adamw_beta1, config.optim.adamw_beta2)
    state, state_shardings = init_sharded_state(models, config, jax.random.PRNGKey(0), adam, mesh)
    rules = optim.ParamRules.from_params(
        state.student,
        depth=models.backbone.depth,
        layerwise_decay=config.optim.layerwise_decay,
        patch_embed_lr_mult=config.optim.patch_embed_lr_mult,
    )
    data = PretrainData(config, mesh, workdir)
    batch = data.next_batch()
    data.close()
    jitted = jit_train_step(make_train_step(models, config, rules, adam), state_shardings, data.shardings,
                            mesh)  # exactly the trainer's layout
    inputs = (jax.random.PRNGKey(1), as_step_input(pretrain_schedules(config, global_batch)))
    return jitted, state, batch, inputs, global_batch


def mae_step(config, workdir: str):
    """The same for the MAE trainer (encoder on the visible patches, decoder, loss, AdamW)."""
    from medjax.mae import trainer as mae
    from medjax.mae.batches import MAEData
    from medjax.models.backbone import mae_from_config
    from medjax.schedules import HalfCycleCosine

    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    global_batch = config.train.batch_size_per_device * mesh.size
    model = mae_from_config(config)
    lr = HalfCycleCosine(config.optim.base_lr * global_batch / 256, config.optim.min_lr, 100, 0)
    tx = mae.make_optimizer(config, lr)
    state, state_shardings = mae.init_sharded_state(model, config, jax.random.PRNGKey(0), tx, mesh)
    data = MAEData(config, mesh, workdir)
    batch = data.next_batch()
    data.close()
    jitted = mae.jit_train_step(mae.make_train_step(model, config, tx, lr), state_shardings, data.shardings, mesh)
    return jitted, state, batch, (jax.random.PRNGKey(1),), global_batch


def benchmark(config, steps: int, workdir: str) -> dict:
    make = mae_step if config.mode == "mae" else dinov2_step
    jitted, state, batch, inputs, global_batch = make(config, workdir)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch, *inputs).compile()
    compile_s = time.perf_counter() - t0
    flops = step_flops(compiled)
    state, metrics = compiled(state, batch, *inputs)  # warm-up call
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, *inputs)
    jax.block_until_ready(metrics)
    sec = (time.perf_counter() - t0) / steps
    peak_rss = peak_resident_mib()  # before the matmul probe below allocates its own arrays
    peak = matmul_peak_flops(DTYPES[config.model.dtype])
    return {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "compile_s": compile_s,
        "sec_per_step": sec,
        "images_per_sec": global_batch / sec,
        "step_gflop": flops / 1e9,
        "achieved_gflops": flops / sec / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "fraction_of_peak": flops / sec / peak,
        "loss": float(metrics["loss"]),
        **step_memory_mib(compiled),
        "peak_resident_mib": peak_rss,
    }


def main(argv):
    del argv
    result = benchmark(CONFIG.value, STEPS.value, WORKDIR.value)
    for key, value in result.items():
        print(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")


if __name__ == "__main__":
    app.run(main)
