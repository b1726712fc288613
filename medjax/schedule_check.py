"""Whether a pretraining schedule makes sense for the data it runs on, said before the run starts.

A recipe's schedule is written for its dataset: the official DINOv2 recipe's 125,000 steps of 1,024 images
are ~9 passes over ImageNet-22k, but 100,000 passes over a 20-image folder, weeks of compute that only
memorise it. The thresholds:

- more than ``MAX_PASSES`` (1,000) passes over the training images: absurd, the schedule keys are named;
- a global batch larger than the training set is refused by the data loaders already.
"""

from __future__ import annotations

MAX_PASSES = 1000  # passes over the training images beyond which a schedule is taken for a mistake


def passes(total_steps: int, global_batch: int, train_images: int) -> float:
    """How many times the schedule shows each training image, on average."""
    return total_steps * global_batch / max(train_images, 1)


def absurd_schedule(total_steps: int, global_batch: int, train_images: int, steps_from: str) -> list[str]:
    """Warnings (one sentence each, empty when sensible) for a schedule of ``total_steps`` steps of
    ``global_batch`` images over ``train_images`` training images; ``steps_from`` names the keys that set
    the number of steps (e.g. "config.optim.epochs x config.train.epoch_length")."""
    seen = passes(total_steps, global_batch, train_images)
    if seen <= MAX_PASSES:
        return []
    return [f"The schedule is absurd for this data: {total_steps:,} steps of {global_batch} images are {seen:,.0f} "
            f"passes over the {train_images:,} training images (more than {MAX_PASSES:,}); lower {steps_from} "
            "or train on more images."]
