"""Evaluation metrics in plain numpy: classification (kNN, probe, fine-tuning) and segmentation.

Each function states its edge-case rule, because on small medical test sets the
edge cases (a class never predicted, a label with no positives, an empty
organ mask) are common and silently change the numbers:

* precision of a class that is never predicted is 0, recall of a class with no
  support is 0, F1 is 0 when precision + recall is 0 (scikit-learn's
  ``zero_division=0``);
* AUCs are rank based with average ranks for tied scores (equal to the area
  under the trapezoidal ROC curve, as ``sklearn.metrics.roc_auc_score``); a
  class or label without both positives and negatives has no AUC and is left
  out of the mean and reported;
* Dice leaves out background unless asked; a class empty in both prediction
  and ground truth gives NaN (left out of means, MONAI's convention) or 1.0;
* HD95 is NaN when both masks are empty and inf when exactly one is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# ---------------------------------------------------------------- classification


def _labels(y) -> np.ndarray:
    return np.asarray(y).astype(np.int64).reshape(-1)


def accuracy(y, pred) -> float:
    """Fraction of samples whose predicted class equals the true class."""
    y, pred = _labels(y), _labels(pred)
    return float(np.mean(y == pred)) if y.size else float("nan")


def confusion_matrix(y, pred, num_classes: int) -> np.ndarray:
    """Counts ``cm[true, predicted]`` as an int64 ``(num_classes, num_classes)`` array."""
    y, pred = _labels(y), _labels(pred)
    bad = (y < 0) | (y >= num_classes) | (pred < 0) | (pred >= num_classes)
    if bad.any():
        raise ValueError(
            f"labels must lie in [0, {num_classes}); found {np.unique(np.concatenate([y[bad], pred[bad]]))}."
        )
    return np.bincount(y * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def balanced_accuracy(y, pred) -> float:
    """Mean recall over the classes present in ``y`` (sklearn's ``balanced_accuracy_score``).

    Classes that only occur among the predictions have no recall and are not
    averaged; their false positives still lower the recall of the true classes.
    """
    y, pred = _labels(y), _labels(pred)
    n = int(max(y.max(initial=0), pred.max(initial=0))) + 1
    cm = confusion_matrix(y, pred, n)
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present])) if present.any() else float("nan")


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def precision_recall_f1(y, pred, num_classes: int) -> dict:
    """Per-class precision, recall, F1 and support, plus their macro averages.

    Per-class arrays cover all ``num_classes`` classes. A zero denominator gives
    0 (a never-predicted class has precision 0). The macro averages are taken
    over the classes that occur in ``y`` or in ``pred``, like scikit-learn's
    default label set: a class absent from this test set does not count as 0.
    """
    cm = confusion_matrix(y, pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * tp, predicted + support)  # = 2PR/(P+R), 0 when tp == 0
    seen = (predicted + support) > 0
    macro = lambda v: float(v[seen].mean()) if seen.any() else float("nan")  # noqa: E731
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
    }


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse.reshape(-1)]


def roc_auc_binary(y_true01, score) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic.

    Equals P(score of a random positive > score of a random negative) with ties
    counted as 1/2, which is exactly sklearn's trapezoidal ``roc_auc_score``.
    Raises ValueError when ``y_true01`` lacks positives or negatives.
    """
    y = np.asarray(y_true01).reshape(-1).astype(bool)
    score = np.asarray(score, np.float64).reshape(-1)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both positive and negative samples; this set has only one class.")
    ranks = _average_ranks(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _per_column_auc(Y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, list[int]]:
    aucs = np.full(Y.shape[1], np.nan)
    excluded = []
    for j in range(Y.shape[1]):
        n_pos = int(Y[:, j].sum())
        if 0 < n_pos < Y.shape[0]:
            aucs[j] = roc_auc_binary(Y[:, j], scores[:, j])
        else:
            excluded.append(j)
    return aucs, excluded


def macro_ovr_auc(y, probs) -> float:
    """One-vs-rest AUC per class, averaged (sklearn ``multi_class='ovr', average='macro'``).

    Classes that are absent from ``y`` (or are all of it) have no AUC and are
    skipped, where sklearn would raise; ``classification_report`` lists them.
    NaN when no class has an AUC.
    """
    y = _labels(y)
    probs = np.asarray(probs, np.float64)
    onehot = y[:, None] == np.arange(probs.shape[1])[None, :]
    aucs, _ = _per_column_auc(onehot, probs)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def label_aucs(Y, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(auc, positives, negatives)`` per column of multi-label targets ``Y`` (n, L): 1 positive, 0
    negative, negative values not labelled (masked: left out of that column, as an uncertain label under
    "ignore"). A column without both classes among its labelled rows has NaN AUC."""
    Y = np.asarray(Y)
    scores = np.asarray(scores, np.float64)
    if Y.shape != scores.shape or Y.ndim != 2:
        raise ValueError(f"targets {Y.shape} and scores {scores.shape} must both have shape (samples, labels).")
    positives, negatives = (Y == 1).sum(0), (Y == 0).sum(0)
    aucs = np.full(Y.shape[1], np.nan)
    for j in np.flatnonzero((positives > 0) & (negatives > 0)):
        kept = Y[:, j] >= 0
        aucs[j] = roc_auc_binary(Y[kept, j] == 1, scores[kept, j])
    return aucs, positives, negatives


def mean_label_auc(Y, scores, columns=None) -> tuple[float, np.ndarray, list[int]]:
    """Mean per-label AUC for multi-label targets ``Y`` (n, L) in {0, 1}, negative entries masked.

    Returns ``(mean, per_label, excluded)``: labels without both classes among their labelled
    rows have NaN in ``per_label``, are listed in ``excluded`` and are not averaged. ``columns``:
    average these labels only (e.g. the ones scored on every split), NaN when none of them has an AUC.
    """
    aucs, _, _ = label_aucs(Y, scores)
    excluded = [int(j) for j in np.flatnonzero(~np.isfinite(aucs))]
    averaged = aucs if columns is None else aucs[np.asarray(columns, np.int64)]
    mean = float(np.nanmean(averaged)) if np.isfinite(averaged).any() else float("nan")
    return mean, aucs, excluded


def top_k_accuracy(y, scores, k: int) -> float:
    """Fraction of samples whose true class is among the ``k`` highest scores.

    Ties are broken like sklearn's ``top_k_accuracy_score`` (stable sort, the
    higher class index ranks first among equal scores).
    """
    y = _labels(y)
    order = np.argsort(np.asarray(scores), axis=1, kind="mergesort")[:, ::-1][:, :k]
    return float(np.mean((order == y[:, None]).any(axis=1)))


def classification_report(y, pred, probs=None, class_names: Sequence[str] | None = None) -> dict:
    """Every classification metric above in one JSON-serialisable dict.

    Keys: ``num_samples``, ``accuracy``, ``balanced_accuracy``,
    ``macro_precision``, ``macro_recall``, ``macro_f1``, ``confusion_matrix``
    (nested lists, rows = true class), ``per_class`` (list of dicts with name,
    support, precision, recall, f1 and, with ``probs``, the one-vs-rest AUC),
    and with ``probs``: ``macro_auc`` and ``auc_excluded_classes``.
    """
    y, pred = _labels(y), _labels(pred)
    if class_names is not None:
        num_classes = len(class_names)
    elif probs is not None:
        num_classes = np.asarray(probs).shape[1]
    else:
        num_classes = int(max(y.max(initial=0), pred.max(initial=0))) + 1
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    prf = precision_recall_f1(y, pred, num_classes)
    report = {
        "num_samples": int(y.size),
        "accuracy": accuracy(y, pred),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "macro_precision": prf["macro_precision"],
        "macro_recall": prf["macro_recall"],
        "macro_f1": prf["macro_f1"],
        "confusion_matrix": confusion_matrix(y, pred, num_classes).tolist(),
    }
    class_auc = None
    if probs is not None:
        probs = np.asarray(probs, np.float64)
        if probs.shape != (y.size, num_classes):
            raise ValueError(f"probs has shape {probs.shape}; expected ({y.size}, {num_classes}).")
        class_auc, excluded = _per_column_auc(y[:, None] == np.arange(num_classes)[None, :], probs)
        report["macro_auc"] = float(np.nanmean(class_auc)) if np.isfinite(class_auc).any() else float("nan")
        report["auc_excluded_classes"] = [names[c] for c in excluded]
    report["per_class"] = [
        {
            "name": names[c],
            "support": int(prf["support"][c]),
            "precision": float(prf["precision"][c]),
            "recall": float(prf["recall"][c]),
            "f1": float(prf["f1"][c]),
            **({"auc": float(class_auc[c])} if class_auc is not None else {}),
        }
        for c in range(num_classes)
    ]
    return report


def save_confusion_matrix_png(cm, class_names: Sequence[str], path: str, title: str = "") -> str:
    """Draws the confusion matrix: colour and percentage are row-normalised (recall per true class).

    Each cell shows the count and the share of its true class. Cell text is
    dropped above 30 classes, where it could not be read anyway.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    n = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    share = _safe_div(cm, np.broadcast_to(rows, cm.shape))
    size = min(4.0 + 0.6 * n, 30.0)
    fig = Figure(figsize=(size + 1.5, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion matrix ({int(cm.sum())} samples)")
    if n <= 30:
        fontsize = 10 if n <= 10 else 7
        for i in range(n):
            for j in range(n):
                color = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, f"{int(cm[i, j])}\n{100 * share[i, j]:.1f}%", ha="center", va="center",
                        color=color, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# ---------------------------------------------------------------- segmentation


def dice_per_class(pred, target, num_classes: int, *, include_background: bool = False,
                   empty_rule: str = "nan") -> np.ndarray:
    """Dice 2|P∩G| / (|P| + |G|) per class for one integer label map (2D or 3D).

    Entry ``i`` is class ``i`` with ``include_background=True`` and class ``i + 1``
    otherwise (label 0 is background). Ground truth empty but prediction not:
    0. Both empty: NaN with ``empty_rule="nan"`` (use ``np.nanmean`` to average;
    an organ absent from a scan neither helps nor hurts) or 1.0 with
    ``empty_rule="one"`` (a correct "absent" counts as perfect).
    """
    if empty_rule not in ("nan", "one"):
        raise ValueError(f"empty_rule must be 'nan' or 'one', not {empty_rule!r}.")
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {target.shape} must have the same shape.")
    start = 0 if include_background else 1
    dice = np.empty(num_classes - start)
    for i, c in enumerate(range(start, num_classes)):
        p, g = pred == c, target == c
        denom = p.sum() + g.sum()
        if denom == 0:
            dice[i] = np.nan if empty_rule == "nan" else 1.0
        else:
            dice[i] = 2.0 * np.logical_and(p, g).sum() / denom
    return dice


def _surface(mask: np.ndarray) -> np.ndarray:
    # Voxels of the mask with a face-neighbour outside it; the image border counts as outside.
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def hd95(pred_mask, gt_mask, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between mask surfaces, in mm.

    Distances from each surface voxel of one mask to the nearest surface voxel
    of the other are measured with the voxel ``spacing`` (mm per axis; 1 if
    None). As MONAI, the 95th percentile is taken per direction and the larger
    of the two is returned (medpy instead pools both directions). Both masks
    empty: NaN. Exactly one empty: inf (the distance is undefined and a
    missed or hallucinated structure must not look good).
    """
    pred_mask = np.asarray(pred_mask, bool)
    gt_mask = np.asarray(gt_mask, bool)
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(f"prediction {pred_mask.shape} and ground truth {gt_mask.shape} must have the same shape.")
    spacing = (1.0,) * pred_mask.ndim if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != pred_mask.ndim:
        raise ValueError(f"spacing {spacing} needs one value per axis of the {pred_mask.ndim}D masks.")
    has_pred, has_gt = pred_mask.any(), gt_mask.any()
    if not has_pred and not has_gt:
        return float("nan")
    if not has_pred or not has_gt:
        return float("inf")
    sp, sg = _surface(pred_mask), _surface(gt_mask)
    to_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]
    return float(max(np.percentile(to_gt, 95), np.percentile(to_pred, 95)))


def hd95_per_class(pred, target, num_classes: int, spacing: Sequence[float] | None = None, *,
                   include_background: bool = False) -> np.ndarray:
    """``hd95`` per class of integer label maps, indexed like ``dice_per_class``."""
    pred, target = np.asarray(pred), np.asarray(target)
    start = 0 if include_background else 1
    return np.array([hd95(pred == c, target == c, spacing) for c in range(start, num_classes)])
