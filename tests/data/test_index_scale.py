"""Index builds that scale: worker processes give the index a serial build gives, header counts equal decoded
ones, bad rows are named all at once, an interrupted build resumes from its journal, progress is said."""

import nibabel as nib
import numpy as np
import pytest

from medjax.data.build_runner import Progress
from medjax.data.manifest import load_manifest
from medjax.data.slices import SliceIndex, VolumeIndex
from medjax.readers import ImageReadError, read_image


def _rows(tmp_path, n, broken=()):
    """n small NIfTI volumes (shapes differ; blank slices at the ends) -> manifest rows; `broken` rows are junk."""
    lines = ["patient_id,path,split"]
    for k in range(n):
        path = tmp_path / f"v{k}.nii.gz"
        if k in broken:
            path.write_bytes(b"not a NIfTI file")
        else:
            volume = np.zeros((5, 4 + k % 3, 6 + k % 4), np.float32)
            volume[1:4, 1:3, 1:-1] = 10 + k
            affine = np.diag([-1.0, 1.0, 2.0, 1.0]) if k % 2 else np.eye(4)  # LAS and RAS
            nib.save(nib.Nifti1Image(volume, affine), str(path))
        lines.append(f"p{k},{path.name},train")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return load_manifest(str(tmp_path / "m.csv"))


def _entries(index):
    return [index._entry(i) for i in range(len(index))]


def test_two_workers_give_the_serial_index_and_list_bad_rows_in_order(tmp_path, capsys):
    rows = _rows(tmp_path, 16, broken=(3, 11))
    serial = SliceIndex(rows, skip_bad=True, axis="coronal")
    parallel = SliceIndex(rows, skip_bad=True, axis="coronal", workers=2)  # 16 rows: two processes
    assert _entries(parallel) == _entries(serial) and len(serial) == 2 * 14  # coronal y = 1, 2 of 14 volumes
    assert parallel.transforms == serial.transforms and parallel.skipped == serial.skipped
    assert [line for line, _, _ in parallel.bad_rows] == [5, 13]
    np.testing.assert_array_equal(parallel[7]["image"], serial[7]["image"])
    assert "skipped 2 of 16 rows whose files could not be read" in capsys.readouterr().out


def test_header_counts_equal_decoded_counts_and_transforms_come_on_first_read(tmp_path):
    rows = _rows(tmp_path, 5)
    for axis in ("axial", "coronal", "sagittal"):
        decoded = SliceIndex(rows, axis=axis, skip_background=False, target_spacing=(0.5, 1.5, 1.0))
        headers = SliceIndex(rows, axis=axis, skip_background=False, target_spacing=(0.5, 1.5, 1.0), headers_only=True)
        assert _entries(headers) == _entries(decoded) and len(decoded) > 0
    assert headers.transforms == [None] * 5  # no pixel was read to build it
    assert headers.transform(len(headers) - 1) == decoded.transform(len(decoded) - 1)
    volumes = VolumeIndex(rows, headers_only=True)
    assert len(volumes) == 5 and volumes[2]["image"].shape == read_image(rows[2].path).array.shape


def test_every_unreadable_row_is_named_at_once(tmp_path):
    rows = _rows(tmp_path, 4, broken=(1, 2))
    with pytest.raises(ImageReadError, match=r"(?s)2 rows could not be read:\n  line 3 \(patient 'p1'\), path: .*v1"
                                             r".*\n  line 4 \(patient 'p2'\), path: .*v2.*skip_bad=True"):
        SliceIndex(rows, headers_only=True, skip_background=False)


_READS = []


def counting_reader(path, **kwargs):
    """read_image that counts its calls and stops the build at the file named 'v3' (an interruption)."""
    if path.endswith("v3.nii.gz") and "interrupt" in _READS:
        raise KeyboardInterrupt
    _READS.append(path)
    return read_image(path, **kwargs)


def test_an_interrupted_build_resumes_from_its_journal(tmp_path, capsys):
    rows = _rows(tmp_path, 6)
    journal = tmp_path / "index"
    _READS[:] = ["interrupt"]
    with pytest.raises(KeyboardInterrupt):
        SliceIndex(rows, reader=counting_reader, index_dir=str(journal))
    assert len(_READS) == 1 + 3  # rows 0, 1, 2 were read and kept
    _READS[:] = []
    resumed = SliceIndex(rows, reader=counting_reader, index_dir=str(journal))
    assert [p.rsplit("/", 1)[1] for p in _READS] == ["v3.nii.gz", "v4.nii.gz", "v5.nii.gz"]
    assert "3 of 6 rows were read by an earlier build" in capsys.readouterr().out
    assert _entries(resumed) == _entries(SliceIndex(rows)) and resumed.transforms == SliceIndex(rows).transforms
    _READS[:] = []
    SliceIndex(rows, reader=counting_reader, index_dir=str(journal), axis="sagittal")  # other settings: read again
    assert len(_READS) == 6
    (tmp_path / "v4.nii.gz").write_bytes((tmp_path / "v4.nii.gz").read_bytes() + b"\0")  # a changed file
    _READS[:] = []
    SliceIndex(rows, reader=counting_reader, index_dir=str(journal), skip_bad=True)
    assert [p.rsplit("/", 1)[1] for p in _READS] == ["v4.nii.gz"]


def test_progress_says_count_rate_and_eta():
    said = []
    progress = Progress("SliceIndex", "rows", 10, done=4, say=said.append, every=0.0)
    progress.tick()
    progress.tick()
    assert len(said) == 2 and said[-1].startswith("SliceIndex: 6/10 rows (60%), ")
    assert " rows/s, ETA 0:00" in said[-1]
    progress.tick(4)  # the last tick says nothing: the build's own summary follows
    assert len(said) == 2
