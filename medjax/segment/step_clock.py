"""Wall time of a model's training steps, for the minutes-per-epoch column of the results.

The first step is left out (it compiles the step, seconds to minutes that say nothing about
training speed) and so are the val evaluations between steps. The clock waits for the device
only where it starts and stops (after the first step, around each evaluation, at the end), so
the steps in between stay asynchronous as in an untimed run; the time includes making the
batches (augmentation on the host), which is part of training.
"""

from __future__ import annotations

import time

import jax


class StepClock:
    def __init__(self):
        self.seconds = 0.0
        self.steps = 0  # timed steps (all but the first)
        self._since = None

    def stepped(self, step: int, output) -> None:
        """After training step ``step`` (0-based) returned ``output``."""
        if step == 0:
            jax.block_until_ready(output)
            self._since = time.perf_counter()
        else:
            self.steps += 1

    def pause(self, output) -> None:
        """Before an evaluation, and at the end: waits for ``output`` and stops the clock."""
        if self._since is not None:
            jax.block_until_ready(output)
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def resume(self) -> None:
        """After an evaluation."""
        if self._since is None:
            self._since = time.perf_counter()

    def minutes_per_epoch(self, batch: int, examples: int) -> float:
        """Minutes per pass over ``examples`` training images at ``batch`` per step; NaN with no timed step."""
        if not self.steps:
            return float("nan")
        return self.seconds / self.steps * examples / batch / 60.0
