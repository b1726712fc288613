"""Grain pretraining pipeline: batch format, determinism, resume, process sharding, workers."""

import gc
import json

import numpy as np
import pytest
from absl import flags

from medjax.data import pipeline
from medjax.data.augment import MultiCropConfig, multicrop
from tests.phantom import DemoSlices
from medjax.data.masking import mask_upper_bound
from medjax.data.pipeline import make_iterator, make_pretrain_dataset

CFG = MultiCropConfig(global_size=32, local_size=16, n_local=2)
# Geometry only and no normalisation: a constant image's crops keep its value.
PLAIN = MultiCropConfig(global_size=16, local_size=8, n_local=2, intensity_p=0.0, gamma_p=0.0, noise_p=0.0,
                        global_blur_p=(0.0,), local_blur_p=0.0, mean=(0.0,), std=(1.0,))


@pytest.fixture(scope="module")
def demo():
    return DemoSlices(num_patients=8, slices_per_patient=2, size=48, seed=0)


def _coded(n):
    """Records whose image is constant (i + 1) / (n + 1), so a crop tells which record it came from."""
    return [{"image": np.full((24, 24), (i + 1) / (n + 1), np.float32)} for i in range(n)]


def _ids(batch, n, crops="global_crops"):
    return np.round(batch[crops][:, 0, 0, 0] * (n + 1)).astype(int) - 1


def _take(it, k):
    return [{key: np.array(v) for key, v in next(it).items()} for _ in range(k)]


def _same(a, b):
    return all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_batch_format(demo):
    (b,) = _take(make_iterator(demo, CFG, batch_size=4, patch_size=8, seed=0), 1)
    n_img, n_patch = 2 * 4, (32 // 8) ** 2
    bound = mask_upper_bound(n_img, n_patch)
    assert set(b) == {"global_crops", "local_crops", "masks", "mask_indices", "mask_weights", "n_masked"}
    assert b["global_crops"].shape == (8, 32, 32, 1) and b["global_crops"].dtype == np.float32
    assert b["local_crops"].shape == (8, 16, 16, 1) and b["local_crops"].dtype == np.float32
    assert b["masks"].shape == (n_img, n_patch) and b["masks"].dtype == bool
    assert b["mask_indices"].shape == b["mask_weights"].shape == (bound,)
    assert b["mask_indices"].dtype == np.int32 and b["mask_weights"].dtype == np.float32
    assert b["n_masked"].shape == () and b["n_masked"].dtype == np.int32
    k = int(b["n_masked"])
    assert k == b["masks"].sum() and (b["masks"].sum(1) > 0).sum() == 4
    np.testing.assert_allclose(b["mask_weights"].sum(), 4.0, rtol=1e-5)  # each masked image weighs 1
    assert b["masks"].reshape(-1)[b["mask_indices"][:k]].all()
    no_local = make_iterator(demo, MultiCropConfig(global_size=32, local_size=16, n_local=0), batch_size=2,
                             patch_size=8, seed=0)
    assert next(no_local)["local_crops"].shape == (0, 16, 16, 1)


def test_crop_major_order():
    n = 12
    (b,) = _take(make_iterator(_coded(n), PLAIN, batch_size=4, patch_size=4, seed=0), 1)
    g, loc = _ids(b, n), _ids(b, n, "local_crops")
    np.testing.assert_array_equal(g[:4], g[4:])  # rows b and B + b: the two global crops of image b
    np.testing.assert_array_equal(loc[:4], g[:4])
    np.testing.assert_array_equal(loc[4:], g[:4])
    assert len(set(g[:4])) == 4


def test_batch_rows_are_each_records_multicrop_views(demo):
    # Crops are written straight into the batch: row i * B + b must be crop i of record b's own views
    # (its generator keyed by the seed and its stream position), for records of different content.
    items = [(7, demo[0]), (3, demo[5]), (12, demo[9])]
    batch = pipeline._AugmentBatch(CFG, seed=4)(items)
    assert batch["global_crops"].shape == (2 * 3, 32, 32, 1) and batch["local_crops"].shape == (2 * 3, 16, 16, 1)
    for b, (position, record) in enumerate(items):
        want = multicrop(record["image"], np.random.default_rng([4, pipeline._AUGMENT, position]), CFG)
        for key in ("global_crops", "local_crops"):
            for i, crop in enumerate(want[key]):
                np.testing.assert_array_equal(batch[key][i * 3 + b], crop)


def test_deterministic_by_seed(demo):
    a = _take(make_iterator(demo, CFG, batch_size=4, patch_size=8, seed=3), 3)
    b = _take(make_iterator(demo, CFG, batch_size=4, patch_size=8, seed=3), 3)
    c = _take(make_iterator(demo, CFG, batch_size=4, patch_size=8, seed=4), 3)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0]["global_crops"], c[0]["global_crops"])
    assert not all(np.array_equal(x["masks"], y["masks"]) for x, y in zip(a, c))


def test_resume_from_state(demo):
    full = _take(make_iterator(demo, CFG, batch_size=4, patch_size=8, seed=5), 7)
    it = make_iterator(demo, CFG, batch_size=4, patch_size=8, seed=5)
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))  # a small JSON-able dict, saved with the checkpoint
    fresh = make_iterator(demo, CFG, batch_size=4, patch_size=8, seed=5)
    fresh.set_state(state)
    assert all(_same(x, y) for x, y in zip(_take(fresh, 3), full[4:]))


def test_epochs_reshuffle_and_cover_everything():
    n = 12
    batches = _take(make_iterator(_coded(n), PLAIN, batch_size=4, patch_size=4, seed=0), 6)
    order = np.concatenate([_ids(b, n)[:4] for b in batches])
    assert sorted(order[:n]) == list(range(n)) and sorted(order[n:]) == list(range(n))
    assert not np.array_equal(order[:n], order[n:]) and not np.array_equal(order[:n], np.arange(n))


def test_processes_read_disjoint_shards():
    n = 24
    seen, counts = [], []
    for pid in range(2):
        batches = list(make_pretrain_dataset(_coded(n), PLAIN, batch_size=4, patch_size=4, seed=1,
                                             process_index=pid, process_count=2, num_epochs=1))
        counts.append(len(batches))
        seen.append(np.concatenate([_ids(b, n)[:4] for b in batches]))
    assert counts == [3, 3]
    assert not set(seen[0]) & set(seen[1]) and sorted(np.concatenate(seen)) == list(range(n))
    # Uneven data: each process still gets the same number of batches (no host waits on another).
    odd = [len(list(make_pretrain_dataset(_coded(26), PLAIN, batch_size=4, patch_size=4, seed=1,
                                          process_index=pid, process_count=2, num_epochs=1)))
           for pid in range(2)]
    assert odd == [3, 3]


def test_record_views_do_not_depend_on_process_layout(demo):
    # A record's crops are keyed by its position in the global stream, not by the process.
    (single,) = _take(make_iterator(demo, CFG, batch_size=4, patch_size=8, seed=2), 1)
    (shard0,) = _take(make_iterator(demo, CFG, batch_size=2, patch_size=8, seed=2, process_count=2), 1)
    (shard1,) = _take(make_iterator(demo, CFG, batch_size=2, patch_size=8, seed=2, process_index=1,
                                    process_count=2), 1)
    g = single["global_crops"]  # rows 0..3: crop 0 of stream positions 0..3
    np.testing.assert_array_equal(shard0["global_crops"][:2], g[[0, 2]])
    np.testing.assert_array_equal(shard1["global_crops"][:2], g[[1, 3]])
    np.testing.assert_array_equal(shard1["global_crops"][2:], single["global_crops"][[5, 7]])


def test_one_worker_process_matches_and_resumes(demo):
    flags.FLAGS.mark_as_parsed()
    want = _take(make_iterator(demo, CFG, batch_size=4, patch_size=8, seed=6), 4)
    it = make_iterator(demo, CFG, batch_size=4, patch_size=8, seed=6, num_workers=1)
    got = _take(it, 2)
    state = it.get_state()
    it.close()
    resumed = make_iterator(demo, CFG, batch_size=4, patch_size=8, seed=6, num_workers=1)
    resumed.set_state(state)
    got += _take(resumed, 2)
    resumed.close()
    gc.collect()
    assert all(_same(x, y) for x, y in zip(got, want))


def test_user_errors(demo):
    with pytest.raises(ValueError, match="batch_size=1"):
        make_pretrain_dataset(demo, CFG, batch_size=1, patch_size=8)
    with pytest.raises(ValueError, match="process_index=2"):
        make_pretrain_dataset(demo, CFG, batch_size=4, patch_size=8, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        make_pretrain_dataset(_coded(6), PLAIN, batch_size=4, patch_size=4, process_count=2, num_epochs=1)
    with pytest.raises(ValueError, match="larger than"):
        next(make_iterator(demo, MultiCropConfig(global_size=64, local_size=16), batch_size=2, patch_size=8))
