"""Continued pretraining from a backbone without heads: with the head warm-up and without.

    python -m medjax.bench.continued --run=runs/demo --out=runs/continued [--epochs=5] \
        [--override=config.optim.warmup_epochs=0 ...]

Meta's released DINOv2 weights hold a backbone and no DINO/iBOT heads. This reproduces that start on the
demo: the teacher backbone of a finished ``configs/dinov2_reg.py:demo`` run (``--run``) is written in the
official layout, heads dropped, and pretraining continues from it on the same demo slices twice, with
``config.model.head_warmup_epochs=1`` (the default) and with 0, for ``--epochs`` epochs of 12 steps,
each scored by kNN (k = 20, the demo's series-type task, the run's own protocol) after every epoch.
The table compares both trajectories with the start backbone's kNN (the run's final evaluation).
"""

from __future__ import annotations

import os
import subprocess
import sys

from absl import app, flags, logging

from medjax import runs
from medjax.models.convert import save_official
from medjax.reporting import read_metrics

_RUN = flags.DEFINE_string("run", None, "Workdir of a finished configs/dinov2_reg.py:demo run.", required=True)
_OUT = flags.DEFINE_string("out", None, "Folder for the exported backbone and the two continued runs.",
                           required=True)
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Epochs (of the demo's 12 steps) of each continued run.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "More KEY=VALUE settings for both continued runs, e.g. "
                                       "config.optim.warmup_epochs=0 (no lr warm-up: the harshest start).")
KNN = "eval/knn_k20_accuracy"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ lies there


def knn_by_step(workdir: str) -> dict[int, float]:
    return {r["step"]: r[KNN] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if KNN in r}


def continue_from(weights: str, demo_data: str, workdir: str, warmup_epochs: int, epochs: int,
                  overrides=()) -> dict[int, float]:
    """One continued :demo run from ``weights``; its kNN accuracy after every epoch."""
    cmd = [sys.executable, "-m", "medjax.main", "--config=configs/dinov2_reg.py:demo", f"--workdir={workdir}",
           f"--config.model.init_weights={weights}", f"--config.model.head_warmup_epochs={warmup_epochs}",
           f"--config.optim.epochs={epochs}", f"--config.data.demo_dir={demo_data}", "--config.evals.every=12",
           "--config.evals.linear_probe=False", "--config.evals.final=False", *(f"--{o}" for o in overrides)]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return knn_by_step(workdir)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    run = runs.open_run(_RUN.value, -1, key="--run")
    start = knn_by_step(_RUN.value)
    if run.step not in start:
        raise SystemExit(f"{_RUN.value} has no {KNN} at step {run.step}; run it with configs/dinov2_reg.py:demo "
                         "(its final evaluation scores the teacher by kNN).")
    os.makedirs(_OUT.value, exist_ok=True)
    weights = os.path.abspath(os.path.join(_OUT.value, "start_backbone.npz"))
    save_official(weights, run.params, model=run.backbone)
    demo_data = os.path.abspath(os.path.join(_RUN.value, "demo_data"))
    curves = {w: continue_from(weights, demo_data, os.path.abspath(os.path.join(_OUT.value, f"warmup_{w}")), w,
                               _EPOCHS.value, _OVERRIDES.value) for w in (1, 0)}
    print(f"\nkNN accuracy (k = 20, test) of the start backbone ({_RUN.value}, step {run.step}): "
          f"{start[run.step]:.3f}")
    steps = sorted(set(curves[1]) | set(curves[0]))
    print("| continued run | " + " | ".join(f"step {s}" for s in steps) + " | lowest |")
    print("|---|" + "---|" * (len(steps) + 1))
    for w, label in ((1, "head warm-up, 1 epoch"), (0, "no warm-up")):
        cells = [f"{curves[w][s]:.3f}" if s in curves[w] else "-" for s in steps]
        print(f"| {label} | " + " | ".join(cells) + f" | {min(curves[w].values()):.3f} |")


if __name__ == "__main__":
    app.run(main)
