"""What every trained segmentation model leaves behind, whatever it is (ViT heads, the U-Net baseline):
test and val metrics on the scans' own grids, its checkpoint, and a few test cases drawn and saved."""

from __future__ import annotations

import os

import numpy as np

from medjax import metrics
from medjax.checkpoint import Checkpointer, tree_fingerprint
from medjax.segment import evaluate2d, evaluate3d, report


def evaluate_and_save(predict, splits: dict, s, *, three_d: bool, workdir: str, run_name: str, model_name: str,
                      title: str, state: dict, meta: dict, cls_names, overlays: bool) -> dict:
    """``predict(split name) -> (labels on each case's own grid, class probabilities or None)``; returns
    the run's ``test`` and ``val`` summaries, ``per_case`` values and ``classification`` report (multi-task).
    The state is saved under models/<run_name>; overlays and prediction files are named after ``model_name``."""
    ev = evaluate3d if three_d else evaluate2d  # the same evaluate calls
    names = [str(n) for n in s.class_names]
    test = splits["test"]
    native, probs = predict("test")
    levels = ev.evaluate(native, test, len(names), s.empty_rule)
    out = {"test": evaluate2d.summarise(levels, names), "per_case": evaluate2d.per_case_table(levels, names)}
    # Val at the scans' resolution too: more patients than test on small datasets (never used to select).
    val_native, _ = predict("val")
    out["val"] = evaluate2d.summarise(ev.evaluate(val_native, splits["val"], len(names), s.empty_rule), names)
    if probs is not None:  # on the test rows that have a class
        known = test.labels >= 0
        out["classification"] = metrics.classification_report(test.labels[known], probs[known].argmax(-1),
                                                               probs[known], cls_names)
    ckpt = Checkpointer(os.path.join(workdir, "models", run_name), async_save=False)
    ckpt.save(meta["steps"], state, None, {"fingerprint": tree_fingerprint(state), **meta})
    ckpt.close()
    if overlays and three_d:
        evaluate3d.save_outputs(workdir, model_name, test, native, s.overlay_cases, names, f"{title}, test")
    elif overlays:
        cases = report.pick_cases(test, s.overlay_cases, score=np.nan_to_num(levels["slice"]["dice"], nan=-1.0).max(axis=1))
        slice_dice = {c: levels["slice"]["dice"][c] for c in cases}
        report.save_overlays(os.path.join(workdir, f"overlays_{model_name}.png"), test, native, cases, names,
                             f"{title}, test", dice_of=slice_dice.get)
        report.save_predictions(os.path.join(workdir, "predictions", model_name), test, native, cases, len(names))
    return out


def say_result(result: dict, say) -> None:
    """The run's test Dice per patient (and accuracy), training speed and wall time, in one line."""
    t = result["test"]["patient"]["classes"]
    c = result.get("classification")
    say("  test Dice per patient: " + ", ".join(f"{n} {v['dice_mean']:.3f} ± {v['dice_std']:.3f}" for n, v in t.items())
        + (f"; accuracy {c['accuracy']:.3f}" if c else "")
        + f" ({result['minutes_per_epoch']:.3g} min per epoch, {result['minutes']:.1f} min in all)")
