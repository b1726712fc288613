"""Benchmark of the 52-head linear probe step: one fused jitted step vs one jitted call per head.

    python -m medjax.bench.probe --dim 384 --classes 10 --batch 256 --steps 50

Random features stand in for the backbone's (``cls4`` (batch, 4, dim) and
``patch_mean`` (batch, dim)); the backbone forward is not timed, only the probe
update. Both variants compile before timing (two warm-up calls each), and every
timed step or round ends with ``block_until_ready``. The figure reported is the
median over ``--steps`` (robust to other processes sharing the CPU); the mean
is printed beside it. The last line is ``ms_per_step=X`` for the fused step.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from medjax.probe import linear_heads

_DIM = flags.DEFINE_integer("dim", 384, "Feature width D of the backbone.")
_CLASSES = flags.DEFINE_integer("classes", 10, "Number of classes C.")
_BATCH = flags.DEFINE_integer("batch", 256, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps (fused) and rounds of 52 heads (sequential).")
_MULTILABEL = flags.DEFINE_bool("multilabel", False, "Sigmoid BCE on random 0/1 targets instead of softmax.")


def _time(fn, steps: int, warmup: int = 2) -> list[float]:
    """Milliseconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1e3 * (time.perf_counter() - t))
    return times


def benchmark(dim: int, classes: int, batch: int, steps: int, multilabel: bool = False) -> dict:
    k_cls, k_patch, k_labels, k_init = jax.random.split(jax.random.PRNGKey(0), 4)
    features = {"cls4": jax.random.normal(k_cls, (batch, 4, dim), jnp.float32),
                "patch_mean": jax.random.normal(k_patch, (batch, dim), jnp.float32)}
    if multilabel:
        labels = jax.random.bernoulli(k_labels, 0.3, (batch, classes)).astype(jnp.float32)
    else:
        labels = jax.random.randint(k_labels, (batch,), 0, classes)
    total = steps + 2
    holder = {"state": linear_heads.init_state(k_init, dim, classes, batch)}
    holder["heads"] = linear_heads.unstack_heads(jax.tree.map(jnp.copy, holder["state"]))

    counters = {"fused": 0, "sequential": 0}

    def fused():
        scale = linear_heads.cosine_factor(counters["fused"], total)
        counters["fused"] += 1
        holder["state"], losses = linear_heads.train_step(holder["state"], features, labels, scale,
                                                          multilabel=multilabel)
        return losses

    def sequential():
        scale = linear_heads.cosine_factor(counters["sequential"], total)
        counters["sequential"] += 1
        holder["heads"], losses = linear_heads.sequential_train_step(holder["heads"], features, labels, scale,
                                                                     multilabel=multilabel)
        return holder["heads"], losses

    fused_ms = _time(fused, steps)
    sequential_ms = _time(sequential, steps)
    return {"fused_median": statistics.median(fused_ms), "fused_mean": statistics.fmean(fused_ms),
            "sequential_median": statistics.median(sequential_ms),
            "sequential_mean": statistics.fmean(sequential_ms)}


def main(argv):
    del argv
    r = benchmark(_DIM.value, _CLASSES.value, _BATCH.value, _STEPS.value, _MULTILABEL.value)
    n_heads = len(linear_heads.head_names())
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dim={_DIM.value} "
          f"classes={_CLASSES.value} batch={_BATCH.value} steps={_STEPS.value} heads={n_heads}")
    print(f"fused {n_heads}-head step:      median {r['fused_median']:.3f} ms/step (mean {r['fused_mean']:.3f})")
    print(f"sequential per-head loop: median {r['sequential_median']:.3f} ms/round of {n_heads} heads "
          f"(mean {r['sequential_mean']:.3f})")
    print(f"speed-up: {r['sequential_median'] / r['fused_median']:.2f}x")
    print(f"ms_per_step={r['fused_median']:.3f}")


if __name__ == "__main__":
    app.run(main)
