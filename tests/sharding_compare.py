"""How the sharding tests compare two runs: largest relative differences, per leaf."""

import jax
import numpy as np


def rel_diff(a, b) -> float:
    """max |a - b| / max |a| (at least 1e-6 in the denominator)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-6)) if a.size else 0.0


def without_key_bias(path, x):
    """The attention key bias has an exactly zero gradient (it shifts every logit of a query by the
    same amount, which softmax ignores); Adam turns the rounding noise of that zero into lr-sized
    steps, so it differs between any two summation orders. Its third of qkv/bias is left out."""
    if jax.tree_util.keystr(path).endswith("['attn']['qkv']['bias']"):
        third = x.shape[-1] // 3
        return np.concatenate([x[..., :third], x[..., 2 * third:]], axis=-1)
    return x


def state_diff(reference, other) -> tuple[float, str, int]:
    """(largest per-leaf relative difference, that leaf's path, number of leaves) of two host pytrees."""
    reference, other = (jax.tree_util.tree_map_with_path(without_key_bias, jax.device_get(t))
                        for t in (reference, other))
    flat = jax.tree_util.tree_flatten_with_path(jax.tree.map(rel_diff, reference, other))[0]
    key, worst = max(((jax.tree_util.keystr(p), v) for p, v in flat), key=lambda kv: kv[1])
    return worst, key, len(flat)
