"""Weighted k-nearest-neighbour classification of frozen features (the DINO kNN protocol).

For each test feature: cosine similarity to every train feature (both
L2-normalised), the ``k`` most similar train samples vote for their class with
weight ``exp(similarity / T)``, and the class with the largest summed weight
wins. Class probabilities are the summed weights divided by their total.

As in DINOv2's ``eval_knn``, the neighbours are found once for the largest k
and every smaller k uses a prefix of that sorted list, so several k cost one
similarity pass. The test set is processed in fixed-size chunks (the last one
padded) so a single compiled function serves any number of test samples and
the similarity matrix never exceeds ``batch_size x num_train``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from medjax import metrics


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)`` along the last axis (torch's ``F.normalize``)."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


@partial(jax.jit, static_argnames=("ks", "num_classes"))
def _vote_chunk(train_n, train_labels, test_chunk, temperature, *, ks: tuple[int, ...], num_classes: int):
    """Class probabilities of one test chunk for every k in ``ks`` (sorted ascending)."""
    test_n = l2_normalize(test_chunk)
    sims = jnp.dot(test_n, train_n.T, precision=jax.lax.Precision.HIGHEST)
    top_sims, idx = jax.lax.top_k(sims, ks[-1])
    neighbour_labels = train_labels[idx]
    # Shifting by the best similarity keeps exp() finite; it cancels in the normalisation.
    weights = jnp.exp((top_sims - top_sims[:, :1]) / temperature)
    rows = jnp.arange(test_chunk.shape[0])[:, None]
    probs = []
    for k in ks:
        scores = jnp.zeros((test_chunk.shape[0], num_classes), jnp.float32)
        scores = scores.at[rows, neighbour_labels[:, :k]].add(weights[:, :k])
        probs.append(scores / scores.sum(axis=1, keepdims=True))
    return tuple(probs)


def _check_inputs(train_features, train_labels, test_features, num_classes: int):
    train_features = np.asarray(train_features, np.float32)
    test_features = np.asarray(test_features, np.float32)
    train_labels = np.asarray(train_labels).astype(np.int32).reshape(-1)
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"features must be (samples, dim) with the same dim; got train {train_features.shape}, "
            f"test {test_features.shape}."
        )
    if train_labels.shape[0] != train_features.shape[0]:
        raise ValueError(f"{train_labels.shape[0]} train labels for {train_features.shape[0]} train features.")
    if train_labels.size and (train_labels.min() < 0 or train_labels.max() >= num_classes):
        raise ValueError(f"train labels must lie in [0, {num_classes}); found {np.unique(train_labels)}.")
    if train_features.shape[0] == 0:
        raise ValueError("the kNN classifier needs at least one train feature.")
    return train_features, train_labels, test_features


def _knn_probs(train_features, train_labels, test_features, num_classes: int, ks: Sequence[int],
               temperature: float, batch_size: int) -> dict[int, np.ndarray]:
    train_features, train_labels, test_features = _check_inputs(
        train_features, train_labels, test_features, num_classes)
    ks = tuple(sorted(set(int(k) for k in ks)))
    if ks[0] < 1 or ks[-1] > train_features.shape[0]:
        raise ValueError(f"k must lie in [1, {train_features.shape[0]}] (the train set size); got {ks}.")
    train_n = l2_normalize(jnp.asarray(train_features))
    labels = jnp.asarray(train_labels)
    n = test_features.shape[0]
    batch_size = max(1, min(batch_size, n))
    out = {k: np.empty((n, num_classes), np.float32) for k in ks}
    for start in range(0, n, batch_size):
        chunk = test_features[start:start + batch_size]
        size = chunk.shape[0]
        if size < batch_size:  # pad to the compiled shape
            chunk = np.concatenate([chunk, np.zeros((batch_size - size, chunk.shape[1]), np.float32)])
        probs = _vote_chunk(train_n, labels, jnp.asarray(chunk), jnp.float32(temperature),
                            ks=ks, num_classes=num_classes)
        for k, p in zip(ks, probs):
            out[k][start:start + size] = np.asarray(p)[:size]
    return out


def knn_classify(train_features, train_labels, test_features, num_classes: int, k: int = 20,
                 temperature: float = 0.07, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes ``(n_test,)`` and class probabilities ``(n_test, num_classes)``.

    Features need not be normalised (it is done here). ``k`` must not exceed
    the number of train features; ``knn_evaluate`` clips it instead.
    """
    probs = _knn_probs(train_features, train_labels, test_features, num_classes, (k,), temperature,
                       batch_size)[k]
    return probs.argmax(axis=1), probs


def knn_evaluate(train_features, train_labels, test_features, test_labels, num_classes: int,
                 ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07, batch_size: int = 256,
                 class_names: Sequence[str] | None = None) -> dict[int, dict]:
    """kNN metrics for every requested k, from one neighbour search.

    Returns ``{k: report}`` keyed by the requested k, where ``report`` is
    ``metrics.classification_report`` (accuracy, balanced accuracy, macro
    F1/AUC, per-class table, ...) plus ``k`` (the requested value), ``k_used``
    (the value used: a k above the train set size is clipped to it, logged,
    and flagged by ``clipped``) and ``top5_accuracy`` when there are more than
    5 classes (DINOv2 reports top-1 and top-5).
    """
    n_train = np.asarray(train_features).shape[0]
    used = {int(k): min(int(k), n_train) for k in ks}
    for k, k_used in used.items():
        if k_used < k:
            logging.warning("kNN: k=%d exceeds the %d train samples; using k=%d.", k, n_train, k_used)
    probs = _knn_probs(train_features, train_labels, test_features, num_classes, tuple(used.values()),
                       temperature, batch_size)
    test_labels = np.asarray(test_labels).astype(np.int64).reshape(-1)
    results = {}
    for k, k_used in used.items():
        p = probs[k_used]
        report = metrics.classification_report(test_labels, p.argmax(axis=1), p, class_names)
        report.update(k=k, k_used=k_used, clipped=k_used < k, temperature=float(temperature))
        if num_classes > 5:
            report["top5_accuracy"] = metrics.top_k_accuracy(test_labels, p, 5)
        results[k] = report
    return results
