"""Collapse of the DINO targets, caught while the run goes on, and what helped against it.

Two logged numbers tell it (``loss_model``): the teacher's per-image target entropy and the entropy of
the batch-mean target, both in nats (uniform = log K, one-hot = 0). Their difference is the information
a target carries about its image. A collapsed teacher gives every image the same target, either flat
(uniform: entropy near log K) or sharp (one mode: batch-mean entropy near 0); in both cases the
difference is near 0 and the student learns nothing about images. At initialisation every run looks
like that (LayerScale 1e-5 makes every image's CLS token alike), so a run is judged only after its
grace period; after it, a window is flagged when the targets are collapsed, or when the batch-mean
entropy has fallen below half of its best (a collapse to one mode on its way: images agreeing on fewer
and fewer prototypes), in this logged window and the one before (a single window of a recovering run is
not a collapse). The image information itself may fall without harm: a rising teacher temperature
flattens every target by design.

The thresholds come from the demo runs (BUILD_NOTES, "The demo recipe"): collapsed runs carried at most
0.4 % of log K of image information, image-specific ones at least 1.7 % (the chest X-ray demo; 4.5 % the
MRI demo). Sinkhorn-Knopp makes the batch mean exactly uniform, so there the information is log K minus
the teacher entropy, and a flat-looking teacher (98 % of log K) can still carry it; the bar is 1 %.
"""

from __future__ import annotations

import math

# What kept the :demo run (batch 32, 120 steps) image-specific where the official settings collapsed
# (BUILD_NOTES.md, "The demo recipe"; README, "Small batches").
SMALL_BATCH_ADVICE = ("settings that kept small-batch runs image-specific on the demo: "
                      "config.teacher.momentum_teacher=0.95, config.loss.centering=sinkhorn_knopp, "
                      "config.teacher.warmup_teacher_temp=0.02 and config.teacher.teacher_temp=0.02, "
                      "config.head.n_prototypes=512, config.loss.koleo_weight=1.0 (README, 'Small batches')")


INFORMATION_FLOOR = 0.01  # image information (batch-mean minus per-image entropy) below this share of log K


def collapse_kind(teacher_entropy: float, batch_entropy: float, log_k: float) -> str:
    """"one_mode", "uniform", "image_blind" (little image information, not flat), or "" (image-specific)."""
    if batch_entropy < 0.1 * log_k:
        return "one_mode"
    if batch_entropy - teacher_entropy < INFORMATION_FLOOR * log_k:
        return "uniform" if teacher_entropy > 0.9 * log_k else "image_blind"
    return ""


def collapse_verdict(teacher_entropy: float, batch_entropy: float, n_prototypes: int) -> str:
    """One line on the teacher's state: uniform, a single mode, little image information, or fine."""
    kind = collapse_kind(teacher_entropy, batch_entropy, math.log(n_prototypes))
    if kind == "one_mode":
        return "collapsed to one mode: every image gets the same sharp target (see training_overview.png)"
    if kind == "uniform":
        return ("collapsed to uniform: every image gets the same flat target (expected early in a run much "
                "shorter than the teacher's EMA horizon; see training_overview.png)")
    if kind == "image_blind":
        return (f"targets carry little information about the image yet ({batch_entropy - teacher_entropy:.2f} "
                "nats: the batch mean is nearly as spread as each target); judge the features by config.evals")
    return "not collapsed: targets are image-specific and spread over the prototypes"


WATCH_NOTES = {"one_mode": "collapse: one target for every image", "uniform": "collapse: uniform targets",
               "image_blind": "collapse: targets ignore the image"}  # progress-line notes per collapse kind


class CollapseWatch:
    """Reads each logged window's entropies; flags collapse after ``grace_steps`` steps when two windows in a
    row show it.

    ``check(step, row)`` adds ``collapse_warning`` (1 or 0) to the row (the overview plot shades the
    flagged steps) and returns a short note for the progress line ("" when all is well).
    """

    def __init__(self, n_prototypes: int, grace_steps: int):
        self.log_k = math.log(n_prototypes)
        self.grace_steps = grace_steps
        self.best_batch_entropy = 0.0
        self.previous_signal = ""
        self.first_flagged: int | None = None
        self.flagged_windows = 0

    def check(self, step: int, row: dict) -> str:
        teacher, batch = row.get("teacher_entropy"), row.get("teacher_batch_entropy")
        if teacher is None or batch is None or not (math.isfinite(teacher) and math.isfinite(batch)):
            return ""
        signal = ""
        if step > self.grace_steps:
            kind = collapse_kind(teacher, batch, self.log_k)
            if kind:
                signal = WATCH_NOTES[kind]
            elif batch < 0.5 * self.best_batch_entropy:
                signal = (f"collapsing: the batch-mean target entropy fell from {self.best_batch_entropy:.2f} "
                          f"to {batch:.2f} nats")
        self.best_batch_entropy = max(self.best_batch_entropy, batch)
        note = signal if signal and self.previous_signal else ""  # two windows in a row
        self.previous_signal = signal
        row["collapse_warning"] = float(bool(note))
        if note:
            self.flagged_windows += 1
            if self.first_flagged is None:
                self.first_flagged = step
        return note

    def summary(self) -> str:
        """What the run's summary says about collapse warnings ("" when there were none)."""
        if self.first_flagged is None:
            return ""
        return (f"collapse warnings in {self.flagged_windows} logged window(s) from step {self.first_flagged}; "
                f"{SMALL_BATCH_ADVICE}")
