"""Benchmark of make_manifest on a ChestX-ray14-sized label table: seconds to a checked manifest.

    python -m medjax.bench.manifest [--rows=112120] [--workdir=runs/bench_manifest]

Writes a table shaped like NIH ChestX-ray14's Data_Entry_2017.csv (image name, findings joined by
'|', follow-up, patient, age, sex, view, size and the two pixel-spacing columns), the official split
lists (by patient, about 77 % train_val / 23 % test) and one tiny PNG per row in nested
``images_0NN/images/`` folders of 10,000 files each, as the dataset ships. Then times
``make_manifest label-table`` with the split lists and the pixel spacing rescaled to each PNG's size
(one walk of the image folders, every PNG header opened, findings to 0/1 columns, val carved by
patient, CSV written) and ``load_manifest`` reading it back (every path
checked): the "checked manifest" a user waits for. Generation is not timed. Prints one line per
phase and ``seconds_to_checked_manifest=X`` last.
"""

from __future__ import annotations

import io
import os
import shutil
import time

import numpy as np
from absl import app, flags
from PIL import Image

from medjax.data import make_manifest as mm

_ROWS = flags.DEFINE_integer("rows", 112120, "Rows (images) of the generated table.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench_manifest", "Where the dataset and the manifest are written.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the generated dataset (otherwise removed at the end).")

FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
            "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
_PER_FOLDER = 10000  # images per images_0NN folder


def write_dataset(root: str, rows: int, seed: int = 0) -> dict:
    """The table, the split lists and ``rows`` tiny PNGs under ``root``; returns the file paths."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(buffer, format="PNG")
    png = buffer.getvalue()  # one tiny image's bytes, written under every name
    counts = rng.integers(1, 7, size=rows)  # images per patient (NIH: 3.6 on average)
    patients = np.repeat(np.arange(1, rows + 1), counts)[:rows]
    test_patients = set(np.flatnonzero(rng.random(patients[-1] + 1) < 0.23).tolist())
    lines, train, test, follow = [], [], [], {}
    for index, patient in enumerate(patients.tolist()):
        k = follow[patient] = follow.get(patient, -1) + 1
        name = f"{patient:08d}_{k:03d}.png"
        folder = os.path.join(root, f"images_{1 + index // _PER_FOLDER:03d}", "images")
        if index % _PER_FOLDER == 0:
            os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(png)
        chosen = [f for f in FINDINGS if rng.random() < 0.05]
        spacing = f"{rng.choice((0.139, 0.143, 0.168)):.3f}"
        lines.append(f"{name},{'|'.join(chosen) or 'No Finding'},{k},{patient},{rng.integers(1, 95)},"
                     f"{'MF'[index % 2]},{'PA' if index % 3 else 'AP'},2500,2048,{spacing},{spacing}\n")
        (test if patient in test_patients else train).append(name + "\n")
    paths = {"table": os.path.join(root, "Data_Entry_2017.csv"), "train": os.path.join(root, "train_val_list.txt"),
             "test": os.path.join(root, "test_list.txt")}
    with open(paths["table"], "w") as f:
        f.write("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
        f.writelines(lines)
    for split in ("train", "test"):
        with open(paths[split], "w") as f:
            f.writelines(train if split == "train" else test)
    return paths


def main(argv):
    del argv
    workdir = os.path.abspath(_WORKDIR.value)
    root = os.path.join(workdir, "nih")
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    paths = write_dataset(root, _ROWS.value)
    print(f"generated {_ROWS.value} rows and images in {time.perf_counter() - start:.1f} s (not timed)", flush=True)
    out = os.path.join(workdir, "manifest.csv")
    args = mm.build_parser().parse_args([
        "label-table", root, "--out", out, "--table", paths["table"], "--image-column", "Image Index",
        "--patient-column", "Patient ID", "--labels-column", "Finding Labels",
        "--spacing-columns", "OriginalImagePixelSpacing[x,y]", "--keep-columns", "View Position",
        "--original-size-columns", "OriginalImage[Width,Height]",  # every PNG's header is opened
        "--split-lists", f"train={paths['train']}", f"test={paths['test']}"])
    times = {}
    start = time.perf_counter()
    layout = mm.build_layout(args)
    times["read table, walk images, split lists"] = time.perf_counter() - start
    mark = time.perf_counter()
    mm.carve_splits(layout, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    mm.write_manifest(layout, out)
    times["carve val by patient, write CSV"] = time.perf_counter() - mark
    mark = time.perf_counter()
    manifest = mm.check_written(layout, out)
    times["load_manifest (every path checked)"] = time.perf_counter() - mark
    total = time.perf_counter() - start
    for phase, seconds in times.items():
        print(f"{phase}: {seconds:.1f} s")
    print(f"{len(manifest)} rows, {len(manifest.patients())} patients, {len(layout.label_columns)} finding columns")
    print(mm.summary_table(layout))
    if not _KEEP.value:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"seconds_to_checked_manifest={total:.1f}")


if __name__ == "__main__":
    app.run(main)
