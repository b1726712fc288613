"""Benchmark of the pretraining input pipeline: samples/s from DICOM and from the ArrayRecord cache.

    python -m medjax.bench.data [--config=configs/dinov2_reg.py:demo] [--batches=20] [--workdir=runs/bench_data]

For 0, 1 and 2 Grain worker processes, times the full host pipeline of the
config (decode + per-volume normalisation + multi-crop + block masks + batching)
reading (a) the DICOM series of the demo manifest through the slice index with
2 decoded volumes in memory (as for a dataset larger than RAM, so shuffled access
keeps re-decoding series) and (b) the
ArrayRecord cache of the same slices. The first batch (start-up, worker spawn)
is excluded. Prints one line per case and ``samples_per_sec=...`` lines.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from medjax import console
from medjax.data.sources import DEMO_COLUMNS, demo_manifest, slice_source
from medjax.pretrain.batches import pretrain_iterator

_CONFIG = config_flags.DEFINE_config_file("config", "configs/dinov2_reg.py:demo", "Pretraining config.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches per case.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench_data", "Where the demo data and the cache are written.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker-process counts to try.")


def time_pipeline(source, config, *, num_workers: int, batches: int) -> float:
    """Samples per second of the pretraining pipeline over ``source``."""
    batch_size = config.train.batch_size_per_device
    iterator = pretrain_iterator(config, source, batch_size, num_workers=num_workers)
    next(iterator)  # start-up and worker spawn are not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    close = getattr(iterator, "close", None)
    if close:
        close()
    return batches * batch_size / seconds


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    workdir = os.path.abspath(_WORKDIR.value)
    manifest = demo_manifest(config, workdir, say=console.say)
    with config.unlocked():
        # Datasets larger than memory keep few decoded volumes: shuffled slices re-decode DICOM.
        config.data.volumes_in_memory = 2
        sources = {"dicom": slice_source(config, manifest, "train", extra_columns=DEMO_COLUMNS)}
        config.data.cache_dir = os.path.join(workdir, "slice_cache")
    start = time.perf_counter()
    sources["arrayrecord"] = slice_source(config, manifest, "train", extra_columns=DEMO_COLUMNS)
    print(f"cache ready in {time.perf_counter() - start:.1f} s ({len(sources['arrayrecord'])} slices)")
    for name, source in sources.items():
        for workers in (int(w) for w in _WORKERS.value):
            rate = time_pipeline(source, config, num_workers=workers, batches=_BATCHES.value)
            print(f"source={name} workers={workers} samples_per_sec={rate:.1f}")


if __name__ == "__main__":
    app.run(main)
