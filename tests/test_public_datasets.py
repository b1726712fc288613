"""Four public dataset layouts, built small in a temporary folder, go from their public form to the jobs
with one ``python -m medjax.data.make_manifest`` call each and no other code:

- Kaggle "Brain Tumor MRI" class folders -> DINOv2 pretraining, the 52-head probe, fine-tuning;
- "COVID-19 Radiography Database" images + masks per class (masks stored 0/255) -> segmentation;
- NIH ChestX-ray14's label table with its official split lists -> a multi-label probe;
- a ``PatientID,path,fold`` table of DICOM series folders -> pretraining on folds (config.data.folds),
  and the series read back through a ``dicom-tree`` manifest for a series-type probe.
"""

import os

import numpy as np
import pytest
from PIL import Image

from medjax.data import make_manifest, sources
from medjax.finetune import trainer as finetune
from medjax.pretrain import trainer as pretrain
from medjax.probe import trainer as probe
from medjax.segment import trainer as segment
from tests.helpers import csv_rows, load_config, smoke_config

SIZE = 48  # the :smoke evaluation image size


def _image(rng, bright: float) -> np.ndarray:
    """A textured disc on a dark field (not background for the slice filter), brightness by class."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (SIZE * 0.4) ** 2
    return np.clip(disc * (bright + 40 * rng.standard_normal((SIZE, SIZE))) + 10, 0, 255).astype(np.uint8)


def _make(*args) -> None:
    assert make_manifest.main([str(a) for a in args]) == 0


def _workdir(tmp_path, name: str) -> str:
    os.makedirs(tmp_path / name)
    return str(tmp_path / name)


@pytest.fixture(scope="module")
def brain_tumor(tmp_path_factory) -> str:
    """Training/ and Testing/ folders of four tumour classes (JPEG, as the dataset ships), one manifest."""
    root, rng = tmp_path_factory.mktemp("brain_tumor"), np.random.default_rng(0)
    for split, n in (("Training", 6), ("Testing", 2)):
        for k, name in enumerate(("glioma", "meningioma", "notumor", "pituitary")):
            os.makedirs(root / split / name)
            for i in range(n):
                Image.fromarray(_image(rng, 60 + 45 * k)).save(root / split / name / f"{split[:2]}_{name}_{i}.jpg")
    out = root / "manifest.csv"
    _make("class-folders", root, "--out", out, "--no-patient-ids", "--val-fraction", "0.34")
    return str(out)


@pytest.fixture(scope="module")
def pretrained(brain_tumor, tmp_path_factory) -> str:
    """Three :smoke pretraining steps on the class-folder manifest."""
    run_dir = str(tmp_path_factory.mktemp("brain_tumor_run"))
    config = smoke_config()
    config.data.manifest, config.data.extra_columns = brain_tumor, "label"
    config.train.stop_at_step = 3
    assert pretrain.run(config, run_dir)["steps"] == 3
    return run_dir


def test_class_folders_to_probe_and_finetune(brain_tumor, pretrained, tmp_path):
    rows = csv_rows(brain_tumor)
    assert len(rows) == 32 and {r["split"] for r in rows} == {"train", "val", "test"}
    assert sum(r["split"] == "val" for r in rows) == 8  # 2 of 6 training images per class, stratified

    p = load_config("linear_probe", "smoke")
    p.probe.checkpoint_dir, p.probe.manifest, p.probe.label_column = pretrained, brain_tumor, "label"
    p.probe.random_baseline, p.probe.label_fractions, p.probe.knn_k = False, (1.0,), (3,)
    result = probe.run(p, _workdir(tmp_path, "probe"))["backbones"]["pretrained"]
    assert result["checkpoint"]["step"] == 3 and 0.0 <= result["test"]["accuracy"] <= 1.0

    f = load_config("finetune", "smoke")
    f.finetune.checkpoint_dir, f.finetune.manifest, f.finetune.targets = pretrained, brain_tumor, ("label",)
    f.finetune.baselines, f.finetune.label_fractions = (), (1.0,)
    out = finetune.run(f, _workdir(tmp_path, "finetune"))
    assert out["targets"]["label"]["class_names"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert out["runs"][0]["train_slices"] == 16


def test_image_mask_folders_to_segmentation(pretrained, tmp_path):
    root, rng = tmp_path / "covid", np.random.default_rng(1)
    for name in ("COVID", "Normal"):
        os.makedirs(root / name / "images")
        os.makedirs(root / name / "masks")
        for i in range(6):
            image = _image(rng, 120)
            mask = np.zeros((SIZE, SIZE), np.uint8)
            mask[10:38, 6 + i:20 + i] = 255  # a "lung", stored 0/255 as the dataset does
            Image.fromarray(image).save(root / name / "images" / f"{name}-{i}.png")
            Image.fromarray(mask).save(root / name / "masks" / f"{name}-{i}.png")
    out = tmp_path / "covid.csv"
    _make("image-mask-folders", root, "--out", out, "--no-patient-ids", "--val-fraction", "0.25",
          "--test-fraction", "0.25")
    assert all(r["mask_path"] for r in csv_rows(out))

    s = load_config("segment", "smoke")
    s.segment.checkpoint_dir, s.segment.manifest = pretrained, str(out)
    s.segment.class_names, s.segment.label_fractions = ("background", "lung"), (1.0,)
    s.segment.heads, s.segment.random_baseline, s.segment.baselines = ("linear",), False, ()
    s.data.mask_values, s.data.extra_columns = '{"255": 1}', "label"
    result = segment.run(s, _workdir(tmp_path, "segment"))
    dice = [run["test"]["patient"]["classes"]["lung"]["dice_mean"] for run in result["runs"]]
    assert len(dice) == 1 and 0.0 < dice[0] <= 1.0


def test_label_table_with_split_lists_to_multilabel_probe(pretrained, tmp_path):
    root, rng = tmp_path / "cxr14", np.random.default_rng(2)
    findings = ["Cardiomegaly", "Effusion|Cardiomegaly", "No Finding", "Effusion"]
    table, train_list, test_list = ["Image Index,Finding Labels,Follow-up #,Patient ID"], [], []
    for i in range(24):
        patient, name = i // 2, f"{i // 2:08d}_{i % 2:03d}.png"
        folder = root / f"images_{1 + i // 12:03d}" / "images"
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(_image(rng, 80 + 30 * (i % 4))).save(folder / name)
        table.append(f"{name},{findings[i % 4]},{i % 2},{patient}")
        (test_list if patient >= 9 else train_list).append(name)
    (root / "Data_Entry_2017.csv").write_text("\n".join(table) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train_list) + "\n")
    (root / "test_list.txt").write_text("\n".join(test_list) + "\n")
    out = tmp_path / "cxr14.csv"
    _make("label-table", root, "--out", out, "--table", root / "Data_Entry_2017.csv",
          "--image-column", "Image Index", "--patient-column", "Patient ID", "--labels-column", "Finding Labels",
          "--separator", "|", "--split-lists", f"train={root / 'train_val_list.txt'}",
          f"test={root / 'test_list.txt'}", "--val-fraction", "0.34")
    rows = csv_rows(out)
    assert [(r["Cardiomegaly"], r["Effusion"]) for r in rows[:4]] == [("1", "0"), ("1", "1"), ("0", "0"), ("0", "1")]
    assert "No Finding" not in rows[0]  # "No Finding" is all zeros, not a class

    p = load_config("linear_probe", "smoke")
    p.probe.checkpoint_dir, p.probe.manifest = pretrained, str(out)
    p.probe.label_column, p.probe.selection = "Cardiomegaly,Effusion", "mean_auc"
    p.probe.random_baseline, p.probe.label_fractions, p.probe.knn_k = False, (1.0,), (3,)
    p.data.extra_columns = "Follow-up #"
    result = probe.run(p, _workdir(tmp_path, "probe"))["backbones"]["pretrained"]
    assert 0.0 <= result["test"]["mean_auc"] <= 1.0


def test_fold_table_of_dicom_series_to_pretraining_and_series_types(smoke_demo_dir, tmp_path):
    config = load_config("linear_probe", "smoke")
    config.data.demo_dir = str(smoke_demo_dir)
    demo = csv_rows(sources.demo_manifest(config, str(tmp_path)))  # DICOM series folders, one per contrast
    root = os.path.dirname(os.path.join(str(smoke_demo_dir), demo[0]["path"]))
    root = os.path.dirname(root)  # the folder of the patients' folders
    patients = sorted({r["patient_id"] for r in demo})
    table = ["PatientID,series,fold"] + [
        f"{r['patient_id']},{os.path.relpath(os.path.join(str(smoke_demo_dir), r['path']), root)},"
        f"{patients.index(r['patient_id']) % 3}" for r in demo]
    (tmp_path / "folds.csv").write_text("\n".join(table) + "\n")
    out = tmp_path / "knee.csv"
    _make("fold-table", root, "--out", out, "--table", tmp_path / "folds.csv", "--column", "PatientID=patient_id",
          "--column", "series=path")
    assert {r["fold"] for r in csv_rows(out)} == {"0", "1", "2"} and "split" not in csv_rows(out)[0]

    c = smoke_config()
    c.data.manifest, c.data.folds = str(out), '{"test": [0], "val": [1]}'
    c.train.stop_at_step = 2
    run_dir = str(tmp_path / "run")
    assert pretrain.run(c, run_dir)["steps"] == 2

    series = tmp_path / "series.csv"
    _make("dicom-tree", root, "--out", series, "--label-from", "series_description", "--val-fraction", "0.25",
          "--test-fraction", "0.25")
    rows = csv_rows(series)
    assert len(rows) == len(demo) and len({r["label"] for r in rows}) == 3  # T1, T2, FLAIR
    p = load_config("linear_probe", "smoke")
    p.probe.checkpoint_dir, p.probe.manifest, p.probe.label_column = run_dir, str(series), "label"
    p.probe.random_baseline, p.probe.label_fractions, p.probe.knn_k = False, (1.0,), (3,)
    p.data.extra_columns = "series_description,modality"
    result = probe.run(p, _workdir(tmp_path, "probe"))["backbones"]["pretrained"]
    assert 0.0 <= result["test"]["accuracy"] <= 1.0
