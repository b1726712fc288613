"""The one route for what a medjax job tells its user: progress lines and warnings on stdout.

Only process 0 speaks (every process of a multi-host run executes the same code), lines are flushed
at once so progress shows under SLURM and in notebooks, and a function that reports progress takes
``say`` (default :func:`say`) so a caller can pass :func:`silent` where the lines would be noise
(an evaluation inside a training run). Errors a user can cause are raised as exceptions with one
sentence and printed by ``medjax.main``.
"""

from __future__ import annotations

import os
import sys
import traceback


def _process_index() -> int:
    # JAX is asked only when the process has imported it: data worker processes (index builds, Grain)
    # never do, so they start in a fraction of a second instead of importing JAX for this question.
    jax = sys.modules.get("jax")
    return jax.process_index() if jax is not None else 0


def say(message: str) -> None:
    """A progress line (process 0 only)."""
    if _process_index() == 0:
        print(message, flush=True)


def warn(message: str) -> None:
    """A line that starts with ``WARNING:``: something the user should know before trusting a result."""
    say(f"WARNING: {message}")


def silent(message: str) -> None:
    """``say`` for callers that want no lines."""
    del message


def raised_by_medjax(error: BaseException) -> bool:
    """Whether the innermost Python frame that raised ``error`` is medjax's (or a config file's) code. A
    user's mistake is named by a medjax check; a ValueError raised inside numpy or orbax is a bug that
    ``medjax.main`` shows whole (an error raised in compiled code counts as its Python caller's)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return True
    package = os.path.dirname(os.path.abspath(__file__))
    innermost = os.path.abspath(frames[-1].filename)
    return innermost.startswith(package + os.sep) or os.path.basename(os.path.dirname(innermost)) == "configs"
