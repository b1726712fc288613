"""The one route for what a medjax job tells its user: progress lines and warnings on stdout.

Only process 0 speaks (every process of a multi-host run executes the same code), lines are flushed
at once so progress shows under SLURM and in notebooks, and a function that reports progress takes
``say`` (default :func:`say`) so a caller can pass :func:`silent` where the lines would be noise
(an evaluation inside a training run). Errors a user can cause are raised as exceptions with one
sentence and printed by ``medjax.main``.
"""

from __future__ import annotations

import jax


def say(message: str) -> None:
    """A progress line (process 0 only)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def warn(message: str) -> None:
    """A line that starts with ``WARNING:``: something the user should know before trusting a result."""
    say(f"WARNING: {message}")


def silent(message: str) -> None:
    """``say`` for callers that want no lines."""
    del message
