"""What a linear probe leaves in its workdir: results.json, results.md and the plots a person looks at."""

from __future__ import annotations

import json
import os

from medjax.probe import findings as findings_lib
from medjax.probe import linear_heads

CONSTANT_TOLERANCE = 1e-6  # a few-label curve whose test means all lie this close is reported as unchanged
_METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "bal. acc", "mean_auc": "mean AUC",
                 "macro_f1": "macro F1", "macro_auc": "macro AUC"}


def _checkpoint_cell(record: dict) -> str:
    if record.get("step") is None:
        return f"seed {record['seed']}"
    return f"step {record['step']}" + ("" if record.get("latest", True) else " (not latest)")


def markdown_table(results: dict) -> str:
    """One row per backbone: the best head, its configuration, its val and test scores."""
    if results.get("multilabel"):
        cols = [("val", "mean_auc"), ("test", "mean_auc")]
    else:
        cols = [("val", "accuracy"), ("val", "balanced_accuracy"), ("test", "accuracy"),
                ("test", "balanced_accuracy"), ("test", "macro_f1"), ("test", "macro_auc")]
    head = ["backbone", "checkpoint", "best head", "blocks", "avgpool", "lr"] + [
        f"{split} {_METRIC_NAMES[m]}" for split, m in cols]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["backbones"].items():
        c = r["best_head_config"]
        cells = [name, _checkpoint_cell(r["checkpoint"]), r["best_head"], str(c["n_blocks"]), str(c["avgpool"]),
                 f"{c['lr']:g}"] + [f"{r[split][m]:.3f}" for split, m in cols]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _auc(value) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"  # NaN: no AUC on that split


def per_finding_table(results: dict) -> str:
    """Multi-label: one row per finding with its positives / negatives in val and test, the val / test AUC of
    each backbone's best head side by side, and whether the finding is in the mean (or why not)."""
    names, found = results["class_names"], results["findings"]
    backbones = results["backbones"]
    rows = ["| finding | val pos / neg | test pos / neg | " + " | ".join(f"{n} val / test AUC" for n in backbones)
            + " | in mean |", "|---|---|---|" + "---|" * (len(backbones) + 1)]
    for j, name in enumerate(names):
        c = found["counts"]
        cells = [f"{c[s]['positives'][j]} / {c[s]['negatives'][j]}" for s in ("val", "test")]
        cells += [f"{_auc(r['val']['per_label'][j]['auc'])} / {_auc(r['test']['per_label'][j]['auc'])}"
                  for r in backbones.values()]
        cells.append("yes" if j in found["scored"] else f"no: {found['left_out'][name]}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def constant_curves(results: dict) -> list[str]:
    """One warning per backbone whose few-label test metric is the same (within ``CONSTANT_TOLERANCE``) at
    every label fraction, with the likely causes."""
    out = []
    for name, r in results["backbones"].items():
        curve = r.get("few_labels") or []
        if len(curve) < 2:
            continue
        metric = "mean_auc" if results.get("multilabel") else r["selection"]
        means = [e["test"][metric]["mean"] for e in curve]
        if max(means) - min(means) > CONSTANT_TOLERANCE:
            continue
        heads = sorted({run["best_head"] for e in curve for run in e["runs"]})
        out.append(f"{name}: the test {_METRIC_NAMES[metric]} is {means[0]:.6f} at every label fraction ("
                   + ", ".join(f"{e['fraction']:.0%}" for e in curve) + f"; best head(s) {', '.join(heads)}), so the "
                   "labels changed nothing. Likely causes: the best-on-val head is a low-learning-rate head that "
                   "barely left its initialisation (every fraction's heads start from the same seed), too few steps "
                   "(config.probe.epochs, epoch_length), features that carry no signal for these labels (compare "
                   "random_init), or val/test sets too small for the metric to move.")
    return out


def few_label_table(results: dict) -> str:
    """Test score (mean +- std over seeds) per label fraction, one column per backbone."""
    backbones = {n: r["few_labels"] for n, r in results["backbones"].items() if r.get("few_labels")}
    if not backbones:
        return ""
    metric = "mean_auc" if results.get("multilabel") else next(iter(results["backbones"].values()))["selection"]
    names = list(backbones)
    rows = ["| train patients | " + " | ".join(f"{n} test {_METRIC_NAMES[metric]}" for n in names) + " |",
            "|---|" + "---|" * len(names)]
    for i, entry in enumerate(backbones[names[0]]):
        cells = []
        for n in names:
            t = backbones[n][i]["test"][metric]
            cells.append(f"{t['mean']:.3f} +- {t['std']:.3f} (n={len(t['values'])})")
        rows.append(f"| {entry['fraction']:.0%} ({entry['runs'][0]['train_patients']}) | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def knn_table(results: dict) -> str:
    """kNN test accuracy / balanced accuracy per k, one row per backbone that has them."""
    rows_of = {n: r["knn"] for n, r in results["backbones"].items() if r.get("knn")}
    ks = list(next(iter(rows_of.values())))
    rows = ["| backbone | " + " | ".join(f"k={k} acc / bal. acc" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name, knn in rows_of.items():
        rows.append(f"| {name} | " + " | ".join(f"{v['accuracy']:.3f} / {v['balanced_accuracy']:.3f}"
                                                for v in knn.values()) + " |")
    return "\n".join(rows) + "\n"


def test_metrics(results: dict) -> dict[str, dict[str, float]]:
    """Every test figure of a probe run, ``{backbone: {metric: value}}``: the best head's scores, kNN per k
    and the few-label means per fraction (what a cross-validation summarises over its folds)."""
    out = {}
    for name, r in results["backbones"].items():
        scores = {m: float(v) for m, v in r["test"].items() if isinstance(v, float)}
        for k, knn in (r.get("knn") or {}).items():
            scores.update({f"kNN k={k} {m}": float(knn[m]) for m in ("accuracy", "balanced_accuracy", "macro_f1")})
        for entry in r.get("few_labels") or ():
            scores.update({f"{entry['fraction']:.0%} of train patients: {m}": s["mean"]
                           for m, s in entry["test"].items()})
        out[name] = scores
    return out


def plot_lr_curves(results: dict, path: str) -> None:
    """Final val score against the learning rate, one line per layout, one panel per backbone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    backbones = results["backbones"]
    fig = Figure(figsize=(5.5 * len(backbones), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(backbones), squeeze=False)[0]
    for ax, (name, r) in zip(axes, backbones.items()):
        metric = r["selection"]
        per_head = r["val_per_head"][metric]
        for n, a in linear_heads.LAYOUTS:
            key = linear_heads.layout_key(n, a)
            ax.plot(linear_heads.LR_GRID, [per_head[f"{key}_lr{lr:g}"] for lr in linear_heads.LR_GRID],
                    marker="o", label=f"last {n} CLS" + (" + mean patch" if a else ""))
        ax.set_xscale("log")
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("learning rate (grid value, before batch scaling)")
        ax.set_ylabel(f"val {_METRIC_NAMES[metric]}")
        ax.set_title(f"{name}: best {r['best_head']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_few_labels(results: dict, path: str) -> None:
    """Test score against the fraction of training patients (log scale), mean +- std per backbone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    metric = None
    for name, r in results["backbones"].items():
        metric = "mean_auc" if results.get("multilabel") else r["selection"]
        curve = r["few_labels"]
        x = [100 * e["fraction"] for e in curve]
        mean = [e["test"][metric]["mean"] for e in curve]
        std = [e["test"][metric]["std"] for e in curve]
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training patients with labels (%)")
    ax.set_ylabel(f"test {_METRIC_NAMES[metric]} (best head on val)")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write(results: dict, workdir: str) -> str:
    """Writes results.json, results.md and the PNGs; returns the markdown shown at the end of a run."""
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    any_result = next(iter(results["backbones"].values()))
    table = markdown_table(results)
    few = few_label_table(results)
    text = (f"Task: {results['task']}. Best head by final val {any_result['selection']} over "
            f"{len(linear_heads.head_names())} heads ({any_result['features']} features), reported on test.\n\n")
    if results.get("multilabel"):
        text += f"AUC: {findings_lib.mean_over(results['findings'], results['class_names'])}.\n\n{table}"
        text += f"\nPer finding (best head of each backbone):\n\n{per_finding_table(results)}"
    else:
        text += table
    if few:
        text += f"\nFew labels (whole patients, stratified, best head on val per draw):\n\n{few}"
        curve = next(r["few_labels"] for r in results["backbones"].values() if r.get("few_labels"))
        for e in curve:  # the draws are the same for every backbone
            if e.get("missing_positives"):
                text += (f"\nThe {e['fraction']:.0%} subset has no positive of " + ", ".join(
                    f"{f} (seed{'s' if len(v) > 1 else ''} {', '.join(map(str, v))})"
                    for f, v in e["missing_positives"].items()) + "; those heads saw only negatives of them.\n")
        for warning in constant_curves(results):
            text += f"\nWARNING: {warning}\n"
        plot_few_labels(results, os.path.join(workdir, "probe_few_labels.png"))
    if any(r.get("knn") for r in results["backbones"].values()):
        text += "\nkNN on the last block's normed CLS token (T = 0.07), test:\n\n" + knn_table(results)
    runs = results["run_dir"] if isinstance(results["run_dir"], list) else [results["run_dir"]]
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(f"# Linear probe of {', '.join(runs)}\n\n{text}")
    plot_lr_curves(results, os.path.join(workdir, "probe_lr_curves.png"))
    return text
