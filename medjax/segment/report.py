"""What the segmentation trainer writes for a person: results.md, overlays, prediction PNGs, plots."""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

_COLOURS = ("#e41a1c", "#377eb8", "#ff7f00", "#984ea3", "#a65628", "#f781bf")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _pm(mean, std, n=None) -> str:
    if mean is None or not np.isfinite(mean):
        return "-"
    return f"{mean:.3f} ± {std:.3f}" + (f" ({n})" if n is not None else "")


def _hd(patient: dict, volume: dict) -> str:
    text = "-" if not patient["hd95_n"] else f"{patient['hd95_mean']:.1f} ± {patient['hd95_std']:.1f}"
    return text + f" ({patient['hd95_n']}); {volume['hd95_inf']} inf volumes"


def markdown(results: dict) -> str:
    names = results["class_names"][1:]
    unit = results["hd95_unit"]
    multitask = any(r.get("classification") for r in results["runs"])
    finest = "slice" if all("slice" in r["test"] for r in results["runs"]) else "volume"  # 3D: no slice level
    head = ["init", "head", "backbone", "fraction", "seed", "train patients"]
    head += [f"Dice {n} / patient" for n in names] + [f"Dice {n} / {finest}" for n in names]
    head += [f"val Dice {n} / patient" for n in names]
    head += [f"HD95 {n} / patient ({unit})" for n in names] + [f"empty GT with prediction ({n})" for n in names]
    head += ["accuracy", "bal. accuracy"] if multitask else []
    head += ["trainable params", "min / epoch", "minutes"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["runs"]:
        t = r["test"]
        pat, sl = t["patient"]["classes"], t[finest]["classes"]
        cells = [r["init"], r["head"], r["backbone"], f"{r['fraction']:g}", str(r["seed"]), str(r["train_patients"])]
        cells += [_pm(pat[n]["dice_mean"], pat[n]["dice_std"], pat[n]["dice_n"]) for n in names]
        cells += [_pm(sl[n]["dice_mean"], sl[n]["dice_std"], sl[n]["dice_n"]) for n in names]
        vp = r["val"]["patient"]["classes"]
        cells += [_pm(vp[n]["dice_mean"], vp[n]["dice_std"], vp[n]["dice_n"]) for n in names]
        cells += [_hd(pat[n], t["volume"]["classes"][n]) for n in names]
        cells += [f"{pat[n]['empty_ground_truth_with_prediction']}/{pat[n]['empty_ground_truth']} patients"
                  for n in names]
        if multitask:
            c = r.get("classification") or {}
            cells += [f"{c['accuracy']:.3f}" if c else "-", f"{c['balanced_accuracy']:.3f}" if c else "-"]
        speed = r["minutes_per_epoch"]
        cells += [f"{r['trainable_parameters']:,}", f"{speed:.3g}" if np.isfinite(speed) else "-", f"{r['minutes']:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    text = "\n".join(rows) + "\n\n" + _column_notes(results) + "\n"
    if any(g["runs"] > 1 for g in results["summary"]):
        head = ["init", "head", "fraction", "runs"] + [f"Dice {n} / patient, mean over runs" for n in names]
        head += [f"val Dice {n} / patient" for n in names]
        head += ["accuracy"] if multitask else []
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in results["summary"]:
            cells = [g["init"], g["head"], f"{g['fraction']:g}", str(g["runs"])]
            cells += [_pm(g["dice_patient"][n]["mean"], g["dice_patient"][n]["std"]) for n in names]
            cells += [_pm(g["val_dice_patient"][n]["mean"], g["val_dice_patient"][n]["std"]) for n in names]
            if multitask:
                a = g.get("accuracy")
                cells.append(_pm(a["mean"], a["std"]) if a else "-")
            rows.append("| " + " | ".join(cells) + " |")
        text += "\nMean ± standard deviation over the runs (seeds) of each fraction:\n\n" + "\n".join(rows) + "\n"
    return text


def _column_notes(results: dict) -> str:
    """What the speed, size and distance columns mean."""
    text = ("min / epoch: wall time of the training steps per pass over the run's training images, the first "
            "step (compilation) and the val evaluations left out; frozen heads train on tokens computed once "
            "per init (token_minutes in results.json). minutes: the whole run, evaluation and saving included. "
            "trainable params: what the run's optimiser updates (heads only for a frozen backbone).")
    if results["hd95_unit"] == "px":
        text += (f" HD95 is in PIXELS, not mm: {len(results['spacing_assumed_for'])} image(s) carry no pixel "
                 "spacing (e.g. PNG); give the manifest a pixel_spacing column or set "
                 "config.segment.assumed_spacing_mm.")
    return text


def pick_cases(split, n: int, score=None) -> list[int]:
    """Slices to draw: the largest structure of each patient (largest first, one per patient; equal areas,
    e.g. the same slice in several series, go to the higher ``score``), then one slice of a patient
    whose masks are all empty, when there is one."""
    if n <= 0:
        return []
    area = np.array([int((m > 0).sum()) for m in split.native])
    score = np.zeros(len(area)) if score is None else np.nan_to_num(np.asarray(score, float), nan=-1.0)
    best = {}
    for i in np.lexsort((-score, -area)):
        if area[i] > 0:
            best.setdefault(split.patients[i], int(i))
    cases = list(best.values())[: max(1, n - 1)]
    empty = [p for p in dict.fromkeys(split.patients.tolist()) if p not in best]
    if empty:
        idx = np.flatnonzero(split.patients == empty[0])
        cases.append(int(idx[len(idx) // 2]))
    return cases[:n]


def _stem(split, i: int) -> str:
    vol = re.sub(r"\.nii(\.gz)?$|\.png$|\.jpe?g$|\.dcm$", "", split.volumes[i], flags=re.I)
    name = f"{split.patients[i]}_{os.path.basename(vol.rstrip('/'))}_z{int(split.slice_index[i])}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def save_predictions(folder: str, split, native_pred: list, cases: list[int], num_classes: int) -> list[str]:
    """Prediction label maps of ``cases`` as 8-bit PNGs (label * 255 // (C - 1)); returns their paths."""
    os.makedirs(folder, exist_ok=True)
    scale = 255 // max(1, num_classes - 1)
    paths = []
    for i in cases:
        path = os.path.join(folder, _stem(split, i) + ".png")
        Image.fromarray((native_pred[i].astype(np.uint16) * scale).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def save_overlays(path: str, split, native_pred: list, cases: list[int], class_names, title: str,
                  dice_of=None) -> None:
    """One panel per case: the image, the ground truth (solid contour) and the prediction (dashed)."""
    if not cases:
        return
    fig = _figure(3.2 * len(cases), 3.6)
    for k, i in enumerate(cases):
        ax = fig.add_subplot(1, len(cases), k + 1)
        image = split.images[i][..., 0]
        gt, pred = split.native[i], native_pred[i]
        # The model-input image stretched over the mask's grid (pixel centres at 0 .. n-1, as contour's).
        ax.imshow(image, cmap="gray", extent=(-0.5, gt.shape[1] - 0.5, gt.shape[0] - 0.5, -0.5))
        for c in range(1, len(class_names)):
            colour = _COLOURS[(c - 1) % len(_COLOURS)]
            if (gt == c).any():
                ax.contour((gt == c).astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
            if (pred == c).any():
                ax.contour((pred == c).astype(float), levels=[0.5], colors=[colour], linewidths=1.2,
                           linestyles="dashed")
        label = f"{split.patients[i]} slice {int(split.slice_index[i])}"
        if dice_of is not None:
            d = dice_of(i)
            label += "\nDice " + ", ".join("-" if not np.isfinite(v) else f"{v:.2f}" for v in d)
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(f"{title}: ground truth solid, prediction dashed", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=100)


def plot_curves(results: dict, path: str) -> None:
    """Training loss and val Dice (input size, per slice or volume) against the step, one line per run."""
    fig = _figure(12, 4.2)
    ax_loss, ax_dice = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    styles = {}
    for r in results["runs"]:
        key = (r["init"], r["head"])
        colour = styles.setdefault(key, _COLOURS[len(styles) % len(_COLOURS)])
        style = "-" if r["fraction"] == max(x["fraction"] for x in results["runs"]) else ":"
        label = f"{r['init']}/{r['head']} f={r['fraction']:g} s={r['seed']}"
        h = r["history"]
        ax_loss.plot([e["step"] for e in h], [e["train_loss"] for e in h], style, color=colour, label=label)
        ax_dice.plot([e["step"] for e in h], [e["val_dice"] for e in h], style, color=colour, marker="o",
                     markersize=3, label=label)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (mean since the last evaluation)")
    ax_dice.set_xlabel("step")
    case = "volume" if results.get("spatial_dims") == 3 else "slice"
    ax_dice.set_ylabel(f"val Dice (foreground, per {case}, input size)")
    ax_dice.set_ylim(0, 1)
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_fractions(results: dict, path: str) -> None:
    """Test Dice per patient (mean ± std over seeds) against the label fraction, one line per init and head."""
    names = results["class_names"][1:]
    fig = _figure(5 * len(names), 4)
    for k, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), k + 1)
        groups = {}
        for g in results["summary"]:
            groups.setdefault((g["init"], g["head"]), []).append(g)
        for n, ((init, head), gs) in enumerate(groups.items()):
            gs = sorted(gs, key=lambda g: g["fraction"])
            ax.errorbar([100 * g["fraction"] for g in gs], [g["dice_patient"][name]["mean"] for g in gs],
                        yerr=[g["dice_patient"][name]["std"] for g in gs], marker="o", capsize=3,
                        color=_COLOURS[n % len(_COLOURS)], label=f"{init} / {head}")
        ax.set_xscale("log")
        ax.set_xlabel("labelled training patients (%)")
        ax.set_ylabel(f"test Dice {name}, per patient")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
