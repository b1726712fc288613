"""The dry run (``--dry_run``) and the config keys' meanings it prints, read from the config files' comments;
the absurd-schedule rule."""

import glob
import os

import pytest

from medjax import config_docs, schedule_check
from tests.helpers import CONFIGS, medjax

CONFIG_FILES = sorted(f for f in glob.glob(os.path.join(CONFIGS, "*.py")) if not f.endswith("config_lib.py"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_key_of_every_config_file_has_a_meaning(path):
    variants = getattr(config_docs.load_config_file(path), "VARIANTS", ("",))
    missing = sorted({f"{d.key} ({d.where})" for v in variants for d in config_docs.config_docs(path, v)
                      if not d.meaning})
    assert not missing, f"keys without a comment in {os.path.basename(path)}: {', '.join(missing)}"


def test_meaning_is_the_defining_statements_comment(tmp_path):
    docs = {d.key: d for d in config_docs.config_docs(os.path.join(CONFIGS, "dinov2_reg.py"), "smoke")}
    assert docs["data.manifest"].meaning == "CSV manifest of the user's scans; empty = the built-in demo dataset"
    assert docs["data.manifest"].where.endswith("config_lib.py:" + docs["data.manifest"].where.rsplit(":", 1)[1])
    # A variant's later assignment does not define the key: the recipe's comment stays, the variant's value shows.
    assert docs["train.epoch_length"].default == 2 and "OFFICIAL_EPOCH_LENGTH" in docs["train.epoch_length"].meaning
    assert docs["model.init_weights"].meaning.startswith("Official DINOv2 backbone weights")  # a block above
    (tmp_path / "toy.py").write_text(
        "import ml_collections\n\n\ndef get_config(variant=''):\n    c = ml_collections.ConfigDict()\n"
        "    c.a = 1  # the a\n\n    # the b, from above\n    c.b = 2\n\n    c.undocumented = 3\n"
        "    c.a = 5  # a variant's note\n    return c\n")
    toy = {d.key: d.meaning for d in config_docs.config_docs(str(tmp_path / "toy.py"))}
    assert toy == {"a": "the a", "b": "the b, from above", "undocumented": ""}


def test_absurd_schedules_are_named():
    assert schedule_check.passes(125_000, 1, 20) == 6250
    assert schedule_check.absurd_schedule(1000, 20, 20, "config.optim.epochs") == []  # exactly 1,000 passes
    [warning] = schedule_check.absurd_schedule(125_000, 16, 20, "config.optim.epochs or config.train.epoch_length")
    assert "125,000 steps of 16 images are 100,000 passes over the 20 training images" in warning
    assert "lower config.optim.epochs or config.train.epoch_length" in warning


def test_dry_run_describes_the_run_and_writes_no_checkpoint(tmp_path):
    proc = medjax(tmp_path, "--dry_run", "--config.optim.epochs=20000")
    out = proc.stdout
    assert "model.depth = 4  # transformer blocks" in out
    assert "optim.epochs = 20000  # length of the run in epochs" in out and "[overridden; the file gives 3]" in out
    assert "train: 12 rows, 4 patients" in out and "training images: 48 slices" in out
    # 40,000 steps of 4 images over 48 slices: 3,333 passes, more than the 1,000 allowed.
    assert "Schedule: 40,000 steps of 4 images" in out and "an epoch is 2 steps = 8 images" in out
    assert "WARNING: The schedule is absurd for this data: 40,000 steps of 4 images are 3,333 passes" in out
    assert "lower config.optim.epochs or config.train.epoch_length" in out
    assert "ETA on this machine" in out and "after a" in out and "s compile" in out
    assert "no checkpoint in" in out.lower()
    assert not os.path.exists(tmp_path / "checkpoints") and os.path.exists(tmp_path / "demo_data" / "manifest.csv")
    assert not os.path.exists(tmp_path / "metrics.jsonl")
