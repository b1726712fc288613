"""Where metrics go: CLU writers (TensorBoard), metrics.jsonl, a progress line, PNG plots.

Only the main process (``jax.process_index() == 0``) writes files; the others
log to nothing. ``metrics.jsonl`` has one JSON object per logged step so
results can be read without TensorBoard; ``training_overview.png`` draws every
logged scalar against the step.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402


def _hide_accelerators_from_tensorflow() -> None:
    # CLU's writers import TensorFlow; it must never reserve GPU memory JAX needs.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")


class Reporter:
    """Writes scalars to TensorBoard + metrics.jsonl and prints a progress line."""

    def __init__(self, workdir: str, *, total_steps: int, images_per_step: int, is_main: bool = True):
        self.workdir = workdir
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.is_main = is_main
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._writer = None
        if is_main:
            _hide_accelerators_from_tensorflow()
            from clu import metric_writers

            self._writer = metric_writers.create_default_writer(
                os.path.join(workdir, "tensorboard"), just_logging=False, asynchronous=True
            )
        self._last_time = None
        self._last_step = None

    def start(self, step: int) -> None:
        """Marks the start of timed training (after compilation) at ``step``."""
        self._last_time, self._last_step = time.perf_counter(), step

    def write(self, step: int, scalars: dict) -> dict:
        """Records ``scalars`` at ``step`` and adds throughput; returns what was written."""
        scalars = {k: float(v) for k, v in scalars.items()}
        now = time.perf_counter()
        if self._last_time is not None and step > self._last_step:
            seconds = (now - self._last_time) / (step - self._last_step)
            scalars["sec_per_step"] = seconds
            scalars["images_per_sec"] = self.images_per_step / seconds
        self._last_time, self._last_step = now, step
        if self.is_main:
            self._writer.write_scalars(step, scalars)
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
        return scalars

    def progress(self, step: int, scalars: dict, note: str = "") -> None:
        """One line per logged window; ``note`` (e.g. a collapse warning) is appended after a "!"."""
        if not self.is_main:
            return
        line = f"step {step:>6d}/{self.total_steps}  loss {scalars.get('loss', float('nan')):.4f}"
        if "images_per_sec" in scalars:
            eta = (self.total_steps - step) * scalars["sec_per_step"]
            line += f"  {scalars['images_per_sec']:.1f} img/s  ETA {_duration(eta)}"
        if note:
            line += f"  ! {note}"
        print(line, flush=True)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class NonFiniteLossError(RuntimeError):
    """The loss or the parameters became NaN/inf; the run stops without saving."""


def mean_metrics(pending: list) -> dict:
    """Host copy of a log window's ``[(step, metrics)]``: losses, entropies and gradient norms averaged,
    the rest from the last step; a step whose ``finite`` flag is 0 stops the run (NonFiniteLossError)."""
    host = [(step, jax.device_get(m)) for step, m in pending]
    for step, m in host:
        if not m["finite"]:
            losses = {k: float(v) for k, v in m.items() if k.endswith("loss")}
            raise NonFiniteLossError(
                f"Non-finite loss or parameters at step {step}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in sorted(losses.items()))
                + "; the run stopped and the last checkpoint was kept. Lower config.optim.base_lr, "
                "raise config.optim.warmup_epochs or use float32 (config.model.dtype)."
            )
    out = {k: float(v) for k, v in host[-1][1].items() if k != "finite"}
    for k in out:
        if k.endswith("loss") or k.endswith("entropy") or k == "grad_norm":
            out[k] = float(np.mean([m[k] for _, m in host]))
    return out


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def read_metrics(jsonl_path: str) -> list[dict]:
    """All rows of a metrics.jsonl; a resumed run's repeated steps keep their last value."""
    rows = {}
    with open(jsonl_path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


# Panels of the overview, each a group of related scalars; anything else gets its own panel.
_PANELS = (
    ("losses", ("loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss")),
    ("learning rate", ("lr", "last_layer_lr")),
    ("weight decay", ("weight_decay",)),
    ("teacher momentum", ("teacher_momentum",)),
    ("teacher temperature", ("teacher_temp",)),
    (
        "collapse signals (nats; uniform = log K, one-hot = 0)",
        ("teacher_entropy", "teacher_batch_entropy", "log_prototypes"),
    ),
    ("gradient norm", ("grad_norm",)),
    ("throughput (images/s)", ("images_per_sec",)),
)


def _shade_collapse_warnings(ax, rows: list[dict]) -> None:
    """Red bands over the logged windows a collapse watch flagged (``collapse_warning`` = 1)."""
    previous, labelled = 0, False
    for r in rows:
        if r.get("collapse_warning", 0) > 0:
            ax.axvspan(previous, r["step"], color="tab:red", alpha=0.15, linewidth=0,
                       label=None if labelled else "collapse warning")
            labelled = True
        previous = r["step"]


def plot_training_overview(jsonl_path: str, png_path: str, title: str = "") -> None:
    """Draws every scalar of metrics.jsonl against the step into one PNG."""
    rows = read_metrics(jsonl_path)
    if not rows:
        return
    keys = sorted({k for r in rows for k in r} - {"step", "sec_per_step"})
    panels, used = [], set()
    for name, members in _PANELS:
        present = [k for k in members if k in keys]
        if present:
            panels.append((name, present))
            used.update(present)
    # Evaluations of the teacher (config.evals): accuracies in one panel, AUCs in another, markers on.
    for name, suffix in (("evaluation: accuracy (kNN test, linear val/test)", "_accuracy"),
                         ("evaluation: mean AUC (linear val/test)", "_auc")):
        present = [k for k in keys if k.startswith("eval/") and k.endswith(suffix) and "balanced" not in k
                   and k not in used]
        if present:
            panels.append((name, present))
            used.update(present)
    used.update(k for k in keys if k.startswith("eval/") and "balanced" in k)  # in eval/results.md
    used.add("collapse_warning")  # shaded in the collapse panel, not a panel of its own
    panels += [(k, [k]) for k in keys if k not in used]
    cols = 3
    fig_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(fig_rows, cols, figsize=(5 * cols, 3.2 * fig_rows), squeeze=False)
    for ax, (name, members) in zip(axes.flat, panels):
        for k in members:
            pts = [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=k.removeprefix("eval/"), linewidth=1.4,
                        marker="o" if k.startswith("eval/") else None, markersize=3)
        if name == "gradient norm":
            ax.set_yscale("log")  # spans orders of magnitude early in training
        if "teacher_entropy" in members:
            _shade_collapse_warnings(ax, rows)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if len(members) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.98) if title else None)
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
