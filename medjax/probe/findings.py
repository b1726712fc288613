"""Which findings of a multi-label probe can be scored, and why the others cannot.

A finding's AUC needs a positive and a negative labelled slice (masked entries, < 0, count as
neither). The mean AUC is taken over the findings that have both in val AND in test, so that
the val mean the best head is chosen by and the test mean it is reported with average the same
findings; the others are named with the reason ("no positive in test", ...), never dropped
silently. Few-label subsets may lack a finding's positives: that is a warning, not an error.
"""

from __future__ import annotations

import numpy as np

EVALUATED = ("val", "test")  # the splits a scored finding needs both classes in


def counts(labels: np.ndarray) -> tuple[list[int], list[int]]:
    """Positives and negatives per finding of multi-label rows (1, 0, masked < 0)."""
    labels = np.asarray(labels)
    return (labels == 1).sum(0).astype(int).tolist(), (labels == 0).sum(0).astype(int).tolist()


def scored_findings(splits: dict, names) -> dict:
    """``{"scored": [index], "left_out": {name: reason}, "counts": {split: {"positives", "negatives"}}}``."""
    table = {}
    for s in EVALUATED:
        pos, neg = counts(splits[s].labels)
        table[s] = {"positives": pos, "negatives": neg}
    scored, left_out = [], {}
    for j, name in enumerate(names):
        reasons = [f"no {kind} in {s}" for s in EVALUATED
                   for kind, key in (("positive", "positives"), ("negative", "negatives")) if table[s][key][j] == 0]
        if reasons:
            left_out[name] = ", ".join(reasons)
        else:
            scored.append(j)
    if not scored:
        raise ValueError("No finding of " + ", ".join(names) + " has both a positive and a negative labelled slice "
                         "in val and in test (" + "; ".join(f"{n}: {r}" for n, r in left_out.items()) + "), so no "
                         "AUC can be measured; move patients with and without those findings into val and test.")
    return {"scored": scored, "left_out": left_out, "counts": table}


def scored_columns(splits: dict) -> list[int]:
    """The indices of ``scored_findings`` (names are only for messages)."""
    names = [f"label {j}" for j in range(splits["val"].labels.shape[1])]
    return scored_findings(splits, names)["scored"]


def mean_over(findings: dict, names) -> str:
    """"mean over K of L findings" and, when some are left out, which and why."""
    text = f"mean over {len(findings['scored'])} of {len(names)} findings (both classes in val and test)"
    if findings["left_out"]:
        text += "; left out: " + ", ".join(f"{n} ({r})" for n, r in findings["left_out"].items())
    return text


def missing_positives(labels: np.ndarray, names) -> list[str]:
    """The findings without a positive row among ``labels`` (a few-label subset's)."""
    pos, _ = counts(labels)
    return [n for n, p in zip(names, pos) if p == 0]
