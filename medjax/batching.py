"""Rows in batches: a jitted function over many rows in fixed-size batches, and training batch order.

The last batch is padded with zero rows to the full batch size, so one
compiled shape serves every batch; the padding rows are dropped from the
outputs. Training batches are consecutive runs of per-epoch permutations, all
of one size (one compile).
"""

from __future__ import annotations

import jax
import numpy as np


def padded_batches(arrays: dict, batch: int):
    """``(start, stop, inputs)`` for consecutive rows of ``arrays`` (a dict of equally long arrays);
    ``inputs`` holds ``batch`` rows of each, the last batch padded with zeros."""
    n = len(next(iter(arrays.values())))
    for i in range(0, n, batch):
        j = min(i + batch, n)
        part = {k: v[i:j] for k, v in arrays.items()}
        pad = batch - (j - i)
        if pad:
            part = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in part.items()}
        yield i, j, part


def map_batched(fn, x: np.ndarray, batch: int) -> dict:
    """``fn`` (array -> dict of arrays) over the rows of ``x`` in padded batches: its outputs as numpy,
    padding removed, concatenated over the batches."""
    parts = []
    for i, j, part in padded_batches({"x": x}, batch):
        parts.append({k: np.asarray(v)[: j - i] for k, v in jax.device_get(fn(part["x"])).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def epoch_batches(n: int, batch: int, rng: np.random.Generator):
    """Row indices of endless training batches of ``min(batch, n)`` rows: consecutive runs of a permutation
    of the ``n`` rows, a fresh permutation when the rest of one would not fill a batch."""
    batch = min(batch, n)
    order, pos = rng.permutation(n), 0
    while True:
        if pos + batch > n:
            order, pos = rng.permutation(n), 0
        yield order[pos:pos + batch]
        pos += batch
