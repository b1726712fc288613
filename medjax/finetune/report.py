"""What fine-tuning writes: results.json, results.md (summary and per-class tables) and PNGs.

Every figure is a mean over the fraction seeds with its standard deviation
(``fractions.summarise``); the confusion matrices sum the test predictions of
those seeds, at the largest label fraction, one PNG per init and target.
"""

from __future__ import annotations

import json
import os

import numpy as np

from medjax import console, metrics
from medjax.data.fractions import summarise

METRICS = ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_auc")
_HEADERS = ("accuracy", "balanced acc.", "macro precision", "macro recall", "macro F1", "AUC")


def summarise_runs(runs: list, targets: list, unit: str = "slices") -> list:
    """One row per (init, fraction, target): each test metric, minutes/epoch and the training set's size
    (``train_<unit>``, slices or volumes) as mean, std, values."""
    rows = []
    keys = list(dict.fromkeys((r["init"], r["fraction"]) for r in runs))
    for init, fraction in keys:
        group = [r for r in runs if r["init"] == init and r["fraction"] == fraction]
        for t in targets:
            row = {"init": init, "fraction": fraction, "target": t, "seeds": [r["seed"] for r in group]}
            for m in METRICS:
                row[m] = summarise([r["test"][t].get(m, float("nan")) for r in group])
            row["minutes_per_epoch"] = summarise([r["timing"]["minutes_per_epoch"] for r in group])
            row["trainable_parameters"] = summarise([r["trainable_parameters"] for r in group])
            row[f"train_{unit}"] = summarise([r[f"train_{unit}"] for r in group])
            rows.append(row)
    return rows


def test_metrics(results: dict) -> dict[str, dict[str, float]]:
    """Every test metric of a fine-tuning run, ``{"init, fraction f, target": {metric: mean over seeds}}``
    (what a cross-validation summarises over its folds)."""
    return {f"{r['init']}, fraction {r['fraction']:g}, {r['target']}": {m: r[m]["mean"] for m in METRICS}
            for r in results["summary"]}


def _pm(s: dict, fmt: str = ".3f") -> str:
    if len(s["values"]) > 1:
        return f"{s['mean']:{fmt}} ± {s['std']:{fmt}}"
    return f"{s['mean']:{fmt}}"


def _where(record: dict) -> str:
    if "architecture" in record:  # a CNN baseline
        return f"{record['architecture']}, " + _where({k: v for k, v in record.items() if k != "architecture"})
    if record["kind"] == "checkpoint":
        return f"step {record['step']}" + ("" if record["latest"] else " (not latest)") + f" of {record['path']}"
    if record["kind"] == "official":
        return f"official weights {record['path']}"
    return f"random weights (seed {record['seed']} folded with the fraction seed)"


def _speed_up(results: dict, row: dict) -> str:
    """random_init's minutes/epoch (the ViT with every block trained) over this row's, at its fraction."""
    full = [r for r in results["summary"] if r["init"] == "random_init" and r["fraction"] == row["fraction"]]
    if not full:
        return ""
    return f" {full[0]['minutes_per_epoch']['mean'] / max(row['minutes_per_epoch']['mean'], 1e-12):.2f}x |"


def summary_table(results: dict) -> str:
    speed = any(r["init"] == "random_init" for r in results["summary"])
    rows = ["| init | fraction | target | " + " | ".join(_HEADERS) + " | minutes/epoch | trainable params |"
            + (" speed-up vs full ViT training |" if speed else ""),
            "|---|---|---|" + "---|" * (len(METRICS) + 2 + speed)]
    for r in results["summary"]:
        rows.append(f"| {r['init']} | {r['fraction']:g} | {r['target']} | "
                    + " | ".join(_pm(r[m]) for m in METRICS) + f" | {_pm(r['minutes_per_epoch'], '.3g')} | "
                    + f"{r['trainable_parameters']['mean']:,.0f} |" + _speed_up(results, r))
    return "\n".join(rows) + "\n"


def per_class_table(results: dict, target: str) -> str:
    """Per-class test precision / recall / F1 / AUC at the largest fraction, mean over seeds."""
    top = max(r["fraction"] for r in results["runs"])
    names = results["targets"][target]["class_names"]
    rows = ["| init | class | support | precision | recall | F1 | AUC |", "|---|---|---|---|---|---|---|"]
    for init in results["inits"]:
        group = [r for r in results["runs"] if r["init"] == init and r["fraction"] == top]
        for c, name in enumerate(names):
            per = [r["test"][target]["per_class"][c] for r in group]
            cells = [_pm(summarise([p.get(k, float("nan")) for p in per])) for k in ("precision", "recall", "f1",
                                                                                       "auc")]
            rows.append(f"| {init} | {name} | {per[0]['support']} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def finding_summary(results: dict) -> dict | None:
    """Several 0/1 targets (findings): per finding its val / test positives and negatives and each init's
    val / test AUC at the largest fraction (mean over seeds), and the test mean AUC per init and fraction over
    the findings with both classes in val and test (mean ± std over seeds); None for other targets."""
    names = list(results["targets"])
    if len(names) < 2 or any(t["class_names"] != ["0", "1"] for t in results["targets"].values()):
        return None
    first = results["runs"][0]
    counts = {s: {k: [first[s][t]["per_class"][c]["support"] for t in names] for k, c in (("positives", 1),
                                                                                        ("negatives", 0))}
              for s in ("val", "test")}
    left_out = {t: ", ".join(f"no {k[:-1]} in {s}" for s in ("val", "test") for k in ("positives", "negatives")
                             if counts[s][k][j] == 0) for j, t in enumerate(names)}
    left_out = {t: reason for t, reason in left_out.items() if reason}
    scored = [t for t in names if t not in left_out]
    top = max(r["fraction"] for r in results["runs"])
    per_init, means = {}, []
    for init in results["inits"]:
        group = [r for r in results["runs"] if r["init"] == init and r["fraction"] == top]
        per_init[init] = {s: [summarise([r[s][t]["per_class"][1]["auc"] for r in group])["mean"] for t in names]
                          for s in ("val", "test")}
        for fraction in sorted({r["fraction"] for r in results["runs"]}):
            runs = [r for r in results["runs"] if r["init"] == init and r["fraction"] == fraction]
            values = [float(np.mean([r["test"][t]["per_class"][1]["auc"] for t in scored])) if scored
                      else float("nan") for r in runs]
            means.append({"init": init, "fraction": fraction, "test_mean_auc": summarise(values)})
    return {"names": names, "counts": counts, "scored": scored, "left_out": left_out, "fraction": top,
            "auc": per_init, "mean_auc": means}


def findings_section(found: dict) -> str:
    """The markdown of ``finding_summary``: the mean AUC per init and fraction, then the per-finding table."""
    names, c = found["names"], found["counts"]
    lead = f"mean over {len(found['scored'])} of {len(names)} findings (both classes in val and test)"
    if found["left_out"]:
        lead += "; left out: " + ", ".join(f"{t} ({r})" for t, r in found["left_out"].items())
    rows = [f"\n## Findings: test AUC, {lead}\n", "| init | fraction | test mean AUC |", "|---|---|---|"]
    rows += [f"| {m['init']} | {m['fraction']:g} | {_pm(m['test_mean_auc'])} |" for m in found["mean_auc"]]
    inits = list(found["auc"])
    rows += [f"\nPer finding (fraction {found['fraction']:g}, mean over seeds):\n",
             "| finding | val pos / neg | test pos / neg | " + " | ".join(f"{i} val / test AUC" for i in inits)
             + " | in mean |", "|---|---|---|" + "---|" * (len(inits) + 1)]
    for j, t in enumerate(names):
        cells = [f"{c[s]['positives'][j]} / {c[s]['negatives'][j]}" for s in ("val", "test")]
        cells += [" / ".join("-" if v != v else f"{v:.3f}" for v in (found["auc"][i]["val"][j],
                                                                     found["auc"][i]["test"][j])) for i in inits]
        cells.append(f"no: {found['left_out'][t]}" if t in found["left_out"] else "yes")
        rows.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def write_outputs(results: dict, workdir: str, targets) -> None:
    found = finding_summary(results)  # several 0/1 targets: per-finding AUCs and their mean; else None
    if found:
        results["findings"] = found
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    fractions = sorted({r["fraction"] for r in results["runs"]})
    sched = results["schedule"]
    unit = results["unit"]
    counts = results[f"num_{unit}"]
    lines = ["# Fine-tuning\n",
             "Targets: " + "; ".join(f"**{t.name}**: {t.description} ({', '.join(t.class_names)})" for t in targets)
             + ".\n",
             "Inits: " + "; ".join(f"**{n}**: {_where(r)}" for n, r in results["inits"].items()) + ".\n",
             f"Budget: {sched['steps']} steps of batch {sched['batch_size']} for every init and fraction "
             f"({sched['steps'] // sched['steps_per_full_epoch']} pass(es) over the full training split), tested "
             f"at {results['keep']}; "
             f"{len(results['frozen_parameters'])} frozen backbone parameters (every block of random_init and of "
             "the CNN baselines trains); "
             f"{unit} train / val / test: {counts['train']} / {counts['val']} / {counts['test']}. Test metrics, "
             "mean ± std over seeds "
             f"{results['summary'][0]['seeds']}; minutes/epoch = measured wall time of the training steps per pass "
             "over the training subset (evaluations and the first step's compilation excluded); speed-up = "
             "random_init's (the ViT with every block trained) minutes/epoch over the row's.\n",
             summary_table(results)]
    for t in targets:
        lines.append(f"\n## Per class: {t.name} (test, fraction {fractions[-1]:g})\n\n"
                     + per_class_table(results, t.name))
    if found:
        lines.append(findings_section(found))
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines))
    for init in results["inits"]:
        group = [r for r in results["runs"] if r["init"] == init and r["fraction"] == fractions[-1]]
        for t in targets:
            cm = np.sum([r["test"][t.name]["confusion_matrix"] for r in group], axis=0)
            metrics.save_confusion_matrix_png(
                cm, list(t.class_names), os.path.join(workdir, f"confusion_{init}_{t.name}.png"),
                title=f"{init}, {t.name}: test, fraction {fractions[-1]:g}, {len(group)} seed(s) summed")
    plot_training_curves(results, os.path.join(workdir, "training_curves.png"))
    if len(fractions) > 1:
        plot_label_fractions(results, [t.name for t in targets], os.path.join(workdir, "label_fractions.png"))
    console.say(summary_table(results) + (findings_section(found) if found else ""))


def _figure(width, height, ncols):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_training_curves(results: dict, path: str) -> None:
    """Train loss and val balanced accuracy (mean over targets) against the step, largest fraction,
    one line per init and seed."""
    top = max(r["fraction"] for r in results["runs"])
    fig, (loss_ax, val_ax) = _figure(11, 4.2, 2)
    colours = {init: f"C{i}" for i, init in enumerate(results["inits"])}
    for r in results["runs"]:
        if r["fraction"] != top:
            continue
        steps = [h["step"] for h in r["history"]]
        label = f"{r['init']} (seed {r['seed']})"
        loss_ax.plot(steps, [h["train_loss"] for h in r["history"]], color=colours[r["init"]], label=label)
        val_ax.plot(steps, [h["val_mean_balanced_accuracy"] for h in r["history"]], color=colours[r["init"]],
                    marker="o", markersize=3, label=label)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("train loss (sum over targets, mean since last eval)")
    val_ax.set_xlabel("step")
    val_ax.set_ylabel("val balanced accuracy (mean over targets)")
    val_ax.set_ylim(0.0, 1.02)
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"fine-tuning, label fraction {top:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_label_fractions(results: dict, targets: list, path: str) -> None:
    """Test balanced accuracy against the label fraction (log scale), mean ± std over seeds."""
    fig, axes = _figure(5.5 * len(targets), 4.2, len(targets))
    for ax, t in zip(axes, targets):
        for i, init in enumerate(results["inits"]):
            rows = sorted((r for r in results["summary"] if r["init"] == init and r["target"] == t),
                          key=lambda r: r["fraction"])
            ax.errorbar([r["fraction"] for r in rows], [r["balanced_accuracy"]["mean"] for r in rows],
                        yerr=[r["balanced_accuracy"]["std"] for r in rows], marker="o", capsize=3,
                        color=f"C{i}", label=init)
        ax.set_xscale("log")
        fractions = sorted({r["fraction"] for r in results["summary"]})
        ax.set_xticks(fractions, labels=[f"{f:g}" for f in fractions])
        ax.minorticks_off()
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("fraction of training patients with labels")
        ax.set_ylabel("test balanced accuracy")
        ax.set_title(t)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
