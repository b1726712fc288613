"""k-fold cross-validation of an evaluation job (the linear probe, fine-tuning) on a manifest's fold column.

With ``config.<job>.cv_folds = k`` the job runs k times on one manifest whose integer ``fold`` column holds
exactly the folds 0..k-1: run i tests on fold i, selects on fold (i + 1) mod k and trains on the other
k - 2 folds (``config.data.folds`` set to that rotation), in ``WORKDIR/fold_<i>`` with all of the job's
usual outputs. Every test metric the job reports is then summarised over the k runs as mean and sample
standard deviation (n - 1 in the denominator), written to ``WORKDIR/results.json`` and ``results.md`` and
printed. A patient's rows sit in one fold (``load_manifest`` refuses a patient in two splits), so no run
tests on a patient it trained on.

The job passes its own ``run`` (called once per fold with ``cv_folds`` at 0, so every fold is an ordinary
run of the job) and a function from its results to ``{row: {metric: value}}``.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
from collections.abc import Callable

from medjax import console
from medjax.data.fractions import summarise
from medjax.data.job_manifest import FOLDS_KEY, manifest_path
from medjax.data.manifest import manifest_folds

STD = "sample standard deviation over the folds (n - 1 in the denominator)"


def rotation(k: int, i: int) -> dict[str, list[int]]:
    """Run ``i`` of ``k``: fold i is test, fold (i + 1) mod k val, the others train."""
    return {"test": [i], "val": [(i + 1) % k]}


def check_cv_folds(value, key: str) -> None:
    """``cv_folds`` is 0 (off) or at least 3 (a test, a val and a training fold per run): one sentence."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value in (1, 2):
        raise ValueError(f"{key}={value!r} must be 0 (no cross-validation) or a number of folds of at least 3 "
                         "(each run needs a test, a val and a training fold).")


def cv_manifest(config, section: str) -> str:
    """The manifest the folds come from (``config.<section>.manifest``), checked: it has a fold column with
    exactly the folds 0..k-1 and no split column, and ``config.data.folds`` is left to the rotation."""
    k, path = config[section].cv_folds, config[section].manifest
    key = f"config.{section}.cv_folds"
    if config.data.folds.strip():
        raise ValueError(f"{key}={k} sets {FOLDS_KEY} for each of its runs; leave {FOLDS_KEY} empty.")
    if not path:
        raise ValueError(f"{key}={k} needs config.{section}.manifest: a CSV manifest with a fold column (folds "
                         f"0..{k - 1}, all rows of a patient in one fold); the built-in demo dataset has none.")
    manifest_path(path, f"config.{section}.manifest", " with a fold column")
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = [h.strip() for h in next(csv.reader(f), [])]
    folds = manifest_folds(path)
    if folds is None:
        raise ValueError(f"{key}={k} needs a 'fold' column in {path} (folds 0..{k - 1}, all rows of a patient in "
                         "one fold); add one.")
    if "split" in header:
        raise ValueError(f"{path} has a 'split' column besides its fold column; {key} makes the splits from the "
                         "folds, so remove the split column.")
    if folds != tuple(range(k)):
        raise ValueError(f"{key}={k} needs the fold column of {path} to hold exactly the folds 0..{k - 1}, but it "
                         f"holds {', '.join(map(str, folds)) or 'none'}; set {key} to the number of folds or "
                         "renumber them.")
    return path


def summarise_folds(per_fold: list[dict]) -> dict:
    """``{row: {metric: {mean, std, values}}}`` over the folds (NaN where a fold lacks the metric)."""
    rows = list(dict.fromkeys(row for fold in per_fold for row in fold))
    out = {}
    for row in rows:
        metrics = list(dict.fromkeys(m for fold in per_fold for m in fold.get(row, {})))
        out[row] = {m: summarise([fold.get(row, {}).get(m, math.nan) for fold in per_fold]) for m in metrics}
    return out


def summary_table(summary: dict) -> str:
    """One line per (row, metric): mean ± std and each fold's value."""
    lines = ["| run | test metric | mean ± std | per fold |", "|---|---|---|---|"]
    for row, metrics in summary.items():
        for metric, s in metrics.items():
            values = ", ".join(f"{v:.3f}" for v in s["values"])
            lines.append(f"| {row} | {metric} | {s['mean']:.3f} ± {s['std']:.3f} | {values} |")
    return "\n".join(lines) + "\n"


def run_folds(config, workdir: str, *, section: str, run_job: Callable, test_metrics: Callable,
              title: str, say=console.say) -> dict:
    """Runs the job once per fold of the rotation and writes the summary; returns its JSON record."""
    k = config[section].cv_folds
    path = cv_manifest(config, section)
    folds = []
    for i in range(k):
        fold_config = copy.deepcopy(config)
        fold_config[section].cv_folds = 0
        fold_config.data.folds = json.dumps(rotation(k, i))
        fold_dir = os.path.join(workdir, f"fold_{i}")
        os.makedirs(fold_dir, exist_ok=True)
        say(f"cross-validation run {i + 1}/{k}: fold {i} test, fold {(i + 1) % k} val, the others train "
            f"({FOLDS_KEY}='{fold_config.data.folds}'), in {fold_dir}")
        results = run_job(fold_config, fold_dir)
        folds.append({"fold": i, "folds": rotation(k, i), "workdir": os.path.abspath(fold_dir),
                      "test": test_metrics(results)})
    summary = summarise_folds([f["test"] for f in folds])
    record = {"title": title, "cv_folds": k, "manifest": os.path.abspath(path), "std": STD, "folds": folds,
              "summary": summary, "config": json.loads(config.to_json_best_effort())}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    text = (f"{title}, {k}-fold cross-validation of {os.path.abspath(path)}: run i tests on fold i, selects on "
            f"fold i+1 (mod {k}) and trains on the others; each run's outputs are in fold_<i>/. Test metrics, "
            f"mean ± {STD}:\n\n{summary_table(summary)}")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(f"# {title}: {k}-fold cross-validation\n\n{text}")
    say(text)
    return record
