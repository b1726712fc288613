"""ArrayRecord slice cache: exact round trip, random access, stale caches refused."""

import numpy as np
import pytest

from medjax.data.cache import CachedRecords, cache_is_valid, decode_record, encode_record, write_cache
from tests.phantom import DemoSlices


def test_record_round_trip_keeps_arrays_and_scalars():
    record = {"image": np.random.default_rng(0).random((5, 7), dtype=np.float32), "label": 3,
              "patient_id": "P-007", "mask": np.eye(5, 7, dtype=np.uint8), "spacing": 0.75}
    back = decode_record(encode_record(record))
    np.testing.assert_array_equal(back["image"], record["image"])
    assert back["image"].dtype == np.float32 and back["mask"].dtype == np.uint8
    assert back["label"] == 3 and back["patient_id"] == "P-007" and back["spacing"] == 0.75


def test_cache_equals_its_source_over_several_shards(tmp_path):
    source = DemoSlices(num_patients=4, slices_per_patient=3, size=32, seed=1)
    fingerprint = {"axis": "axial", "normalisation": {"method": "percentile"}}
    write_cache(source, str(tmp_path), fingerprint=fingerprint, records_per_shard=5)
    assert cache_is_valid(str(tmp_path), fingerprint)
    cached = CachedRecords(str(tmp_path), fingerprint=fingerprint)
    assert len(cached) == len(source) == 12
    assert len(cached.meta["shards"]) == 3
    for i in (11, 0, 6, 5):  # random access across shard boundaries
        want, got = source[i], cached[i]
        assert set(got) == set(want)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["mask"], want["mask"])
        assert got["label"] == want["label"] and got["patient_id"] == want["patient_id"]
    images_only = CachedRecords(str(tmp_path), fingerprint=fingerprint, fields=("image",))  # as pretraining reads
    assert set(images_only[7]) == {"image"}
    np.testing.assert_array_equal(images_only[7]["image"], source[7]["image"])


def test_stale_or_missing_cache_is_refused(tmp_path):
    source = DemoSlices(num_patients=2, slices_per_patient=1, size=32, seed=0)
    write_cache(source, str(tmp_path), fingerprint={"window": "brain"})
    assert not cache_is_valid(str(tmp_path), {"window": "lung"})
    with pytest.raises(ValueError, match="different preprocessing"):
        CachedRecords(str(tmp_path), fingerprint={"window": "lung"})
    with pytest.raises(FileNotFoundError, match="No slice cache"):
        CachedRecords(str(tmp_path / "empty"))


class _Stopping:
    """A source that counts reads and raises at record `stop` (an interrupted write)."""

    def __init__(self, source, stop=None):
        self.source, self.stop, self.reads = source, stop, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if i == self.stop:
            raise KeyboardInterrupt
        self.reads.append(i)
        return self.source[i]


def test_interrupted_write_keeps_finished_shards_and_writes_the_rest(tmp_path):
    source = DemoSlices(num_patients=4, slices_per_patient=3, size=32, seed=2)
    fingerprint = {"axis": "axial"}
    with pytest.raises(KeyboardInterrupt):
        write_cache(_Stopping(source, stop=7), str(tmp_path), fingerprint=fingerprint, records_per_shard=5)
    assert not cache_is_valid(str(tmp_path), fingerprint)  # shard 0 is written, the cache is not
    again = _Stopping(source)
    write_cache(again, str(tmp_path), fingerprint=fingerprint, records_per_shard=5)
    assert again.reads == list(range(5, 12))  # shards 1 and 2 only
    cached = CachedRecords(str(tmp_path), fingerprint=fingerprint)
    for i in range(12):
        np.testing.assert_array_equal(cached[i]["image"], source[i]["image"])
    other = _Stopping(source)
    write_cache(other, str(tmp_path), fingerprint={"axis": "coronal"}, records_per_shard=5)
    assert other.reads == list(range(12))  # other preprocessing: nothing kept


def test_shards_written_by_two_processes_equal_the_source(tmp_path):
    source = DemoSlices(num_patients=3, slices_per_patient=2, size=32, seed=3)
    write_cache(source, str(tmp_path), fingerprint={"w": 2}, records_per_shard=2, workers=2)
    cached = CachedRecords(str(tmp_path), fingerprint={"w": 2})
    assert len(cached) == 6 and len(cached.meta["shards"]) == 3
    for i in range(6):
        np.testing.assert_array_equal(cached[i]["image"], source[i]["image"])
        assert cached[i]["patient_id"] == source[i]["patient_id"]


def test_pretraining_decodes_only_the_image_of_a_cached_slice(tmp_path):
    from medjax.data.sources import training_source
    from tests.helpers import smoke_config

    config = smoke_config()
    config.data.cache_dir = str(tmp_path / "slice_cache")
    written = training_source(config, str(tmp_path))  # writes the demo data and the cache
    reread = training_source(config, str(tmp_path))
    assert isinstance(reread, CachedRecords) and len(reread) == len(written)
    assert set(reread[3]) == {"image"}
    np.testing.assert_array_equal(reread[3]["image"], CachedRecords(config.data.cache_dir)[3]["image"])
