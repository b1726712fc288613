"""End-to-end linear probe through the real command line, on a small pretraining run.

One smoke pretraining run (4 blocks, so the probe's last-4-blocks layouts exist; 12 demo
patients, so val and test have patients) and one probe of its latest checkpoint are made
once per session. The probe reads the earlier of the run's two checkpoints, so the same run
also shows the "not the latest checkpoint" warning; the error tests stop before any training.
"""

import json
import os
import shutil

import numpy as np
import pytest

from medjax import metrics
from medjax.checkpoint import content_hash
from medjax.probe.linear_heads import head_names
from medjax import runs
from tests.helpers import medjax

PROBE = "--config=configs/linear_probe.py:smoke"
DATA = ("--config.data.demo_patients=12", "--config.data.demo_slices=8")


@pytest.fixture(scope="session")
def pretrain_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("probe_pretrain")
    proc = medjax(workdir, *DATA, "--config.model.depth=4", "--config.optim.epochs=1",
                  "--config.train.checkpoint_every=1", "--config.evals.every=1", "--config.evals.final=True",
                  "--config.evals.knn_k=(5,20)")
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    (workdir / "stdout.txt").write_text(proc.stdout)
    return workdir


@pytest.fixture(scope="session")
def probe_run(pretrain_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("probe")
    proc = medjax(workdir, *DATA, f"--config.probe.checkpoint_dir={pretrain_dir}", "--config.probe.step=1",
                  config=PROBE)
    return workdir, proc


def test_probe_writes_results_tables_and_plots(probe_run):
    workdir, proc = probe_run
    for name in ("results.json", "results.md", "probe_lr_curves.png", "confusion_pretrained.png",
                 "confusion_random_init.png"):
        assert (workdir / name).stat().st_size > 0, name
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["backbones"]) == {"random_init", "pretrained"}
    record = results["backbones"]["pretrained"]["checkpoint"]
    assert record["step"] == 1 and record["latest"] is False and record["latest_step"] == 2
    assert len(record["content_hash"]) == 16
    assert results["backbones"]["random_init"]["checkpoint"]["content_hash"] != record["content_hash"]
    table = (workdir / "results.md").read_text()
    assert "| random_init |" in table and "| pretrained |" in table
    assert "| pretrained |" in proc.stdout  # the table is printed too
    assert "WARNING" in proc.stdout and "NOT the latest checkpoint" in proc.stdout
    assert "(not latest)" in table


def test_best_head_and_test_metrics_recompute(probe_run):
    workdir, _ = probe_run
    results = json.loads((workdir / "results.json").read_text())
    names = head_names()
    for r in results["backbones"].values():
        assert r["best_head"] in names
        per_head = r["val_per_head"]["accuracy"]
        assert list(per_head) == names
        best_val = max(per_head.values())
        assert per_head[r["best_head"]] == best_val
        assert r["val"]["accuracy"] == pytest.approx(best_val)
        saved = r["test_predictions"]
        again = metrics.classification_report(np.array(saved["labels"]), np.array(saved["predictions"]),
                                              np.array(saved["probabilities"]), results["class_names"])
        assert json.loads(json.dumps(again)) == r["test"]


def test_load_run_defaults_to_the_latest_step(pretrain_dir, probe_run):
    run = runs.open_run(str(pretrain_dir), -1)
    config, params, step = run.config, run.params, run.step
    assert step == 2 and config.model.depth == 4
    assert content_hash(params) != json.loads((probe_run[0] / "results.json").read_text())[
        "backbones"]["pretrained"]["checkpoint"]["content_hash"]  # step 2's weights, not step 1's


@pytest.mark.parametrize("overrides, expected", [
    (("--config.probe.label_column=grade",), "config.probe.label_column='grade' is not a column"),
    ((), "config.probe.checkpoint_dir is empty"),
])
def test_user_errors_are_one_sentence(pretrain_dir, tmp_path, overrides, expected):
    if overrides:
        overrides = (f"--config.probe.checkpoint_dir={pretrain_dir}", *overrides)
    proc = medjax(tmp_path, *DATA, *overrides, config=PROBE, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("medjax: error: ") and expected in lines[-1], proc.stderr


def test_evaluators_during_pretraining_are_logged_and_end_with_the_table(pretrain_dir):
    """config.evals: kNN + linear probe at every step, the pretrained-vs-random table at the last one."""
    logged = [json.loads(line) for line in (pretrain_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = {r["step"]: r for r in logged if "eval/linear_test_accuracy" in r}
    assert sorted(evaluated) == [1, 2]
    for r in evaluated.values():
        assert 0.0 <= r["eval/knn_k20_accuracy"] <= 1.0 and 0.0 <= r["eval/linear_val_accuracy"] <= 1.0
    results = json.loads((pretrain_dir / "eval" / "results.json").read_text())
    assert set(results["backbones"]) == {"random_init", "pretrained"}
    pretrained = results["backbones"]["pretrained"]
    assert pretrained["checkpoint"]["step"] == 2
    assert pretrained["checkpoint"]["content_hash"] == content_hash(runs.open_run(str(pretrain_dir)).params)
    assert evaluated[2]["eval/linear_test_accuracy"] == pytest.approx(pretrained["test"]["accuracy"])
    assert evaluated[2]["eval/knn_k20_accuracy"] == pytest.approx(pretrained["knn"]["20"]["accuracy"])
    stdout = (pretrain_dir / "stdout.txt").read_text()
    assert "What pretraining bought" in stdout and "| random_init |" in stdout and "kNN" in stdout
    md = (pretrain_dir / "eval" / "results.md").read_text()
    assert "| pretrained | step 2 |" in md and "k=20" in md


def test_few_label_curve_draws_whole_patients_per_seed(probe_run):
    workdir, proc = probe_run
    results = json.loads((workdir / "results.json").read_text())
    assert (workdir / "probe_few_labels.png").stat().st_size > 0
    assert "Few labels" in (workdir / "results.md").read_text()
    for r in results["backbones"].values():
        curve = r["few_labels"]
        assert [e["fraction"] for e in curve] == [0.5, 1.0]
        half, full = curve
        assert len(half["runs"]) == len(full["runs"]) == 2
        assert half["runs"][0]["train_patients"] < full["runs"][0]["train_patients"]
        # the 100 % run of seed 0 is the main run
        assert full["runs"][0]["test"]["accuracy"] == pytest.approx(r["test"]["accuracy"])
        values = [run["test"]["accuracy"] for run in half["runs"]]
        assert half["test"]["accuracy"]["mean"] == pytest.approx(np.mean(values))


def test_multilabel_probe_selects_by_mean_auc(pretrain_dir, tmp_path):
    """Two 0/1 finding columns derived from the demo manifest: sigmoid heads, mean AUC on val; the heads
    train on augmented crops pushed through the backbone at every step."""
    import csv

    demo = pretrain_dir / "demo_data"
    rows = list(csv.DictReader(open(demo / "manifest.csv")))
    for r in rows:
        r["lesion_any"] = str(int(r["lesion"] != "0"))
        r["is_t2"] = str(int(r["contrast"] == "T2"))
        r["path"] = str(demo / r["path"])
        r["mask_path"] = str(demo / r["mask_path"]) if r["mask_path"] else ""
    manifest = tmp_path / "findings.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    workdir = tmp_path / "probe"
    medjax(workdir, *DATA, f"--config.probe.checkpoint_dir={pretrain_dir}", f"--config.probe.manifest={manifest}",
           "--config.probe.label_column=lesion_any,is_t2", "--config.probe.selection=mean_auc",
           "--config.probe.label_fractions=()", "--config.probe.random_baseline=False",
           "--config.probe.features=augmented",
           "--config.data.extra_columns=lesion,contrast,series_description", config=PROBE)
    results = json.loads((workdir / "results.json").read_text())
    assert results["multilabel"] and results["class_names"] == ["lesion_any", "is_t2"]
    r = results["backbones"]["pretrained"]
    saved = r["test_predictions"]
    again, _, _ = metrics.mean_label_auc(np.array(saved["labels"]), np.array(saved["probabilities"]))
    assert again == pytest.approx(r["test"]["mean_auc"])
    assert max(r["val_per_head"]["mean_auc"].values()) == pytest.approx(r["val"]["mean_auc"])
    assert "mean AUC" in (workdir / "results.md").read_text()


def test_augment_is_a_seeded_resized_crop_and_flip():
    from medjax.probe.trainer import augment

    x = np.random.default_rng(0).uniform(0, 1, (3, 16, 16, 1)).astype(np.float32)
    a = augment(x, np.random.default_rng(1), mean=0.0, std=1.0)
    assert a.shape == x.shape and a.dtype == np.float32
    assert np.array_equal(a, augment(x, np.random.default_rng(1), mean=0.0, std=1.0))
    assert a.min() >= 0.0 and a.max() <= 1.0  # stays in the normalised range of [0, 1] images
    full = augment(x, np.random.default_rng(1), mean=0.0, std=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for i in range(3):  # the whole image, flipped or not
        assert np.allclose(full[i], x[i], atol=1e-5) or np.allclose(full[i], x[i, :, ::-1], atol=1e-5)


def test_several_runs_side_by_side_with_knn(pretrain_dir, probe_run, tmp_path):
    """Two runs (the same weights under two names: their rows must agree) under one protocol, each beside its
    random init, with kNN, in one results.md; the single-run probe's kNN agrees with the in-run evaluator's."""
    other = tmp_path / "other_run"
    shutil.copytree(pretrain_dir / "checkpoints", other / "checkpoints")
    workdir = tmp_path / "probe_two"
    proc = medjax(workdir, *DATA, f"--config.probe.checkpoint_dir={pretrain_dir},{other}",
                  "--config.probe.label_fractions=()", "--config.probe.random_baseline=False",
                  "--config.probe.knn_k=(5,20)", config=PROBE)
    results = json.loads((workdir / "results.json").read_text())
    first, second = f"DINOv2 {pretrain_dir.name}", "DINOv2 other_run"
    assert list(results["backbones"]) == [first, second] and len(results["run_dir"]) == 2
    a, b = results["backbones"][first], results["backbones"][second]
    assert a["checkpoint"]["content_hash"] == b["checkpoint"]["content_hash"] and a["objective"] == "pretrain"
    assert a["test"]["accuracy"] == b["test"]["accuracy"] and a["knn"] == b["knn"]
    table = (workdir / "results.md").read_text()
    assert f"| {first} |" in table and "| DINOv2 other_run |" in table and "k=20 acc / bal. acc" in table
    assert "k=20" in proc.stdout
    # The single-run probe (step 1) reports kNN too, for random init and pretrained.
    single = json.loads((probe_run[0] / "results.json").read_text())
    assert set(single["backbones"]["pretrained"]["knn"]) == {"10", "20", "100", "200"}
