"""Multi-label findings with uncertain (-1) and blank cells: config.data.uncertain_labels in the probe's splits,
AUCs on the kept entries (against scikit-learn), few-label schedules and subsets, the report's per-finding table,
and the one-sentence errors of bad finding columns."""

import csv

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from medjax import metrics
from medjax.data import fractions
from medjax.data.labelled import MASKED, resolve_label, uncertain_policy
from medjax.data.manifest import UNCERTAIN, UNLABELLED
from medjax.probe import data as probe_data
from medjax.probe import findings, report, trainer
from tests.helpers import load_config

FINDINGS = ("Effusion", "Nodule", "Mass")
# (patient, split, Effusion, Nodule, Mass): -1 uncertain, "" blank; the last train row has no labelled finding.
ROWS = [("p0", "train", "1", "0", "-1"), ("p1", "train", "0", "1", ""), ("p2", "train", "-1", "0", "1"),
        ("p3", "train", "0", "-1", "0"), ("p4", "train", "1", "1", "0"), ("p5", "train", "", "", ""),
        ("p6", "val", "1", "0", "1"), ("p7", "val", "0", "-1", "0"), ("p8", "val", "-1", "1", "0"),
        ("p9", "test", "1", "0", "0"), ("p10", "test", "0", "1", "-1"), ("p11", "test", "-1", "", "0")]


def _manifest(tmp_path, rows=ROWS, columns=FINDINGS):
    rng = np.random.default_rng(0)
    with open(tmp_path / "findings.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "path", "split", *columns])
        for i, (pid, split, *labels) in enumerate(rows):
            Image.fromarray((rng.uniform(0, 1, (16, 16)) * 65535).astype(np.uint16)).save(tmp_path / f"{i}.png")
            w.writerow([pid, f"{i}.png", split, *labels])
    return str(tmp_path / "findings.csv")


def _config(manifest, policy="ignore", columns=FINDINGS):
    c = load_config("linear_probe", "smoke")
    c.probe.manifest, c.probe.label_column = manifest, ",".join(columns)
    c.data.uncertain_labels = policy
    c.crops = ml_collections.ConfigDict({"global_size": 16, "mean": (0.5,), "std": (0.25,)})
    return c


def _expected(policy):
    table = {"1": 1, "0": 0, "": MASKED, "-1": {"ignore": MASKED, "zeros": 0, "ones": 1}[policy]}
    return {s: np.array([[table[v] for v in r[2:]] for r in ROWS if r[1] == s and any(r[2:])]) for s in
            ("train", "val", "test")}


@pytest.mark.parametrize("policy", ["ignore", "zeros", "ones"])
def test_policies_keep_rows_and_mask_or_map_entries(tmp_path, policy):
    splits, names, _, multilabel = probe_data.load_splits(_config(_manifest(tmp_path), policy), "unused", "")
    assert multilabel and names == list(FINDINGS)
    for s, want in _expected(policy).items():  # the row without any labelled finding is dropped
        np.testing.assert_array_equal(splits[s].labels, want)
    # AUC per finding on the kept entries only, as scikit-learn computes it on those rows.
    scores = np.random.default_rng(1).normal(size=splits["val"].labels.shape)
    aucs, pos, neg = metrics.label_aucs(splits["val"].labels, scores)
    for j in range(len(FINDINGS)):
        kept = splits["val"].labels[:, j] >= 0
        y = splits["val"].labels[kept, j]
        assert (pos[j], neg[j]) == ((y == 1).sum(), (y == 0).sum())
        if 0 < y.sum() < len(y):
            assert aucs[j] == pytest.approx(roc_auc_score(y, scores[kept, j]))
        else:
            assert np.isnan(aucs[j])


def test_masked_auc_matches_sklearn_and_mean_over_chosen_columns():
    rng = np.random.default_rng(3)
    Y = rng.integers(0, 2, (60, 4))
    Y[rng.random(Y.shape) < 0.3] = -1
    Y[:, 3] = np.where(Y[:, 3] == 1, -1, Y[:, 3])  # no positive left: excluded
    scores = np.round(rng.normal(size=Y.shape) + Y, 1)
    mean, per_label, excluded = metrics.mean_label_auc(Y, scores)
    want = [roc_auc_score(Y[Y[:, j] >= 0, j], scores[Y[:, j] >= 0, j]) for j in range(3)]
    np.testing.assert_allclose(per_label[:3], want)
    assert excluded == [3] and mean == pytest.approx(np.mean(want))
    assert metrics.mean_label_auc(Y, scores, [0, 2])[0] == pytest.approx((want[0] + want[2]) / 2)
    # The probe's val/test report: counts on the kept entries, the mean over the scored findings only.
    rep, _ = trainer.test_report(scores, Y, ["a", "b", "c", "d"], True, columns=[0, 2])
    assert rep["mean_auc"] == pytest.approx((want[0] + want[2]) / 2) and rep["mean_auc_over"] == ["a", "c"]
    assert rep["per_label"][1]["positives"] == int((Y[:, 1] == 1).sum())
    assert rep["per_label"][1]["negatives"] == int((Y[:, 1] == 0).sum())


def test_bad_cells_policy_and_unlearnable_findings_are_one_sentence(tmp_path):
    bad = [list(r) for r in ROWS]
    bad[1][3], bad[7][4] = "2", "yes"  # CSV lines 3 and 9
    with pytest.raises(ValueError) as e:
        probe_data.load_splits(_config(_manifest(tmp_path, bad)), "unused", "")
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and "'Nodule' of findings.csv holds '2' (line 3)" in lines[0]
    assert "'Mass' of findings.csv holds 'yes' (line 9)" in lines[1]
    no_positive = [r[:4] + ("0" if r[1] == "train" and r[4] == "1" else r[4],) for r in ROWS]
    with pytest.raises(ValueError, match=r"'Mass' of .* no positive \(1\) train slice .*uncertain_labels='ignore'"):
        probe_data.load_splits(_config(_manifest(tmp_path, no_positive)), "unused", "")
    grades = [(p, s, {"1": "2", "0": "0", "-1": "-1", "": ""}[a]) for p, s, a, *_ in ROWS]
    with pytest.raises(ValueError, match=r"uncertain_labels='zeros' .* label column 'grade' of findings.csv "
                                         r"\(classes 0, 2; -1 on line\(s\) 4, 10, 13\)"):
        probe_data.load_splits(_config(_manifest(tmp_path, grades, ("grade",)), "zeros", ("grade",)), "unused", "")
    c = _config("unused.csv", "maybe")
    with pytest.raises(ValueError, match=r"^config.data.uncertain_labels='maybe' is not valid; choose ignore"):
        uncertain_policy(c)
    assert [resolve_label(v, "ones") for v in (UNCERTAIN, UNLABELLED, 0, 2)] == [1, MASKED, 0, 2]


def test_multilabel_strata_and_subsets_ignore_masked_entries():
    pids = [f"p{i}" for i in range(8)]
    labels = np.array([[1, -1], [-1, -1], [0, 1], [0, 0], [-1, 0], [0, -1], [1, 0], [0, 0]])
    strata = fractions.patient_strata(pids, labels)
    # finding 1 is the rarest (1 positive), finding 0 has 2; masked entries are not positives.
    assert strata == {"p0": 0, "p1": 2, "p2": 1, "p3": 2, "p4": 2, "p5": 2, "p6": 0, "p7": 2}
    idx = fractions.subset_indices(pids, labels, 0.5, seed=0)
    chosen = {strata[pids[i]] for i in idx}
    assert len(idx) == 4 and chosen == {0, 1, 2}  # one patient of every stratum first


def test_few_label_subset_trains_with_the_full_schedule():
    """A 3-row subset of a 40-row training set: the full run's batch (16, repeated rows) and steps (2 epochs of
    3), not 2 steps of batch 3 at a 3/256-scaled lr that leave the heads at their initialisation."""
    rng = np.random.default_rng(0)
    dim, n = 8, 3
    feats = {"cls4": rng.normal(size=(n, 4, dim)).astype(np.float32),
             "patch_mean": rng.normal(size=(n, dim)).astype(np.float32)}
    val = {k: v[:2] for k, v in feats.items()}
    p = ml_collections.ConfigDict({"batch_size": 16, "epochs": 2, "epoch_length": 0, "eval_every": 0})
    seen = []

    def batch(idx, _):
        seen.append(np.asarray(idx))
        return {k: jax.numpy.asarray(v[idx]) for k, v in feats.items()}

    labels = np.array([[1, 0], [0, -1], [1, 1]])
    state, history, schedule = trainer.train_heads(p, batch, n, labels, val, np.array([[1, 0], [0, 1]]), 2, 0,
                                                   True, say=lambda m: None, schedule_size=40)
    assert schedule == {"batch_size": 16, "steps": 6, "steps_per_epoch": 3, "eval_every": 3}
    assert len(seen) == 6 and all(len(b) == 16 and set(b.tolist()) == {0, 1, 2} for b in seen)
    assert [h["step"] for h in history] == [3, 6] and float(state.lrs[-1]) == pytest.approx(0.1 * 16 / 256)


def _results(curves, multilabel=True):
    names = list(FINDINGS)
    per_label = [{"name": n, "positives": 1, "negatives": 2, "auc": a} for n, a in zip(names, (0.75, float("nan"), 0.5))]
    backbone = {"selection": "mean_auc", "val": {"per_label": per_label}, "test": {"per_label": per_label}}
    return {"multilabel": multilabel, "class_names": names,
            "findings": {"scored": [0, 2], "left_out": {"Nodule": "no positive in val"},
                         "counts": {"val": {"positives": [1, 0, 2], "negatives": [2, 3, 1]},
                                    "test": {"positives": [3, 1, 1], "negatives": [1, 3, 3]}}},
            "backbones": {name: {**backbone, "few_labels": [
                {"fraction": f, "runs": [{"best_head": "blocks1_avgpoolFalse_lr1e-05"}],
                 "test": {"mean_auc": {"mean": m}}} for f, m in zip((0.01, 0.1, 1.0), curve)]}
                for name, curve in curves.items()}}


def test_per_finding_table_and_constant_curve_warning():
    results = _results({"random_init": (0.52, 0.58, 0.61), "pretrained": (0.525, 0.525 + 4e-7, 0.525)})
    table = report.per_finding_table(results)
    assert "| finding | val pos / neg | test pos / neg | random_init val / test AUC | pretrained val / test AUC |" \
        in table
    assert "| Effusion | 1 / 2 | 3 / 1 | 0.750 / 0.750 | 0.750 / 0.750 | yes |" in table
    assert "| Nodule | 0 / 3 | 1 / 3 | - / - | - / - | no: no positive in val |" in table
    assert findings.mean_over(results["findings"], FINDINGS) == (
        "mean over 2 of 3 findings (both classes in val and test); left out: Nodule (no positive in val)")
    warnings = report.constant_curves(results)
    assert len(warnings) == 1 and warnings[0].startswith("pretrained: the test mean AUC is 0.525000 at every label "
                                                         "fraction (1%, 10%, 100%")
    assert "barely left its initialisation" in warnings[0]


def test_scored_findings_name_every_reason(tmp_path):
    splits, names, _, _ = probe_data.load_splits(_config(_manifest(tmp_path), "ignore"), "unused", "")
    found = findings.scored_findings(splits, names)
    # val Nodule: one positive (p8), one negative (p6); test Mass: no positive (p10's is uncertain -> masked)
    assert found["scored"] == [0, 1] and found["left_out"] == {"Mass": "no positive in test"}
    assert found["counts"]["test"] == {"positives": [1, 1, 0], "negatives": [1, 1, 2]}
