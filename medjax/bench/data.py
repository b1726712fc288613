"""Benchmark of the pretraining input pipeline: samples/s from DICOM and from the ArrayRecord cache.

    python -m medjax.bench.data [--config=configs/dinov2_reg.py:vits14] [--batches=10] [--repeats=3]
                                [--workers=0,1,2] [--sources=arrayrecord,dicom] [--workdir=runs/bench_data]

For each source and Grain worker-process count (0 = in this process, with
prefetch threads), times the full host pipeline of the config (decode +
per-volume normalisation + multi-crop + block masks + batching) reading (a) the
ArrayRecord slice cache (``config.data.cache_dir``) and (b) the DICOM series of
the demo manifest through the slice index with 2 decoded volumes in memory (as
for a dataset larger than RAM, so shuffled access keeps re-decoding series).
The default config is the DINOv2 recipe at ViT-S/14: 2 x 224 + 8 x 96 crops,
iBOT masks, batch 64, on the demo dataset at 256 px.

Start-up is not throughput: the first batch and the batches the workers had
buffered meanwhile are drawn before the clock starts. Prints the exact
settings, then one table row per case: best and range of ``--repeats`` runs,
the rate per worker process and the load average, since the machine may be
shared. The first row of each source runs the same pipeline in one thread
without prefetching and gives its CPU time per sample: the work of one worker
process, which wall-clock rates on a busy machine do not show.
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from medjax import console
from medjax.data import pipeline
from medjax.data.sources import DEMO_COLUMNS, demo_manifest, slice_source
from medjax.pretrain.batches import crop_config, pretrain_iterator

_CONFIG = config_flags.DEFINE_config_file("config", "configs/dinov2_reg.py:vits14", "Pretraining config.")
_BATCHES = flags.DEFINE_integer("batches", 10, "Timed batches per run.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Runs per case; the table gives the best and the range.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench_data", "Where the demo data and the cache are written.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"],
                             "Worker-process counts to try (empty: the one-thread row only).")
_SOURCES = flags.DEFINE_list("sources", ["arrayrecord", "dicom"], "Sources to read: arrayrecord, dicom.")

# What an iterator buffers per worker process (pipeline.make_pretrain_dataset's default prefetch).
_PREFETCH = 2


@dataclasses.dataclass
class Run:
    samples_per_sec: float
    cpu_ms_per_sample: float  # this process's CPU time (all threads)


def _timed(iterator, batches: int, batch_size: int) -> Run:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    close = getattr(iterator, "close", None)
    if close:
        close()
    samples = batches * batch_size
    return Run(samples / wall, 1e3 * cpu / samples)


def time_pipeline(source, config, *, num_workers: int, batches: int) -> Run:
    """One steady-state measurement of the trainer's pretraining pipeline over ``source``."""
    iterator = pretrain_iterator(config, source, config.train.batch_size_per_device, num_workers=num_workers)
    for _ in range(1 + num_workers * _PREFETCH):  # start-up, and what the workers buffered meanwhile
        next(iterator)
    return _timed(iterator, batches, config.train.batch_size_per_device)


def time_one_thread(source, config, *, batches: int) -> Run:
    """The same pipeline in this thread alone (no prefetch threads, no workers): one worker's work."""
    dataset = pipeline.make_pretrain_dataset(
        source, crop_config(config), batch_size=config.train.batch_size_per_device,
        patch_size=config.model.patch_size, mask_probability=config.loss.mask_probability,
        mask_ratio=(config.loss.mask_ratio_min, config.loss.mask_ratio_max), seed=config.seed, prefetch=0)
    iterator = iter(dataset)
    next(iterator)
    return _timed(iterator, batches, config.train.batch_size_per_device)


def describe(config) -> str:
    """The settings that decide the pipeline's work, one per line."""
    d = config.data
    return "\n".join([
        f"crops: {crop_config(config)}",
        f"batch {config.train.batch_size_per_device} per process, patch {config.model.patch_size}, "
        f"mask_probability {config.loss.mask_probability}, "
        f"mask_ratio ({config.loss.mask_ratio_min}, {config.loss.mask_ratio_max}), seed {config.seed}",
        f"demo data: {d.demo_patients} patients, {d.demo_slices} slices per series, {d.demo_image_size} px; "
        f"dicom with volumes_in_memory=2",
        f"{os.cpu_count()} CPU cores; timed {_BATCHES.value} batches per run, {_REPEATS.value} runs per case",
    ])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    unknown = sorted(set(_SOURCES.value) - {"arrayrecord", "dicom"})
    if unknown:
        raise app.UsageError(f"--sources has {', '.join(unknown)}; choose from arrayrecord, dicom.")
    workdir = os.path.abspath(_WORKDIR.value)
    manifest = demo_manifest(config, workdir, say=console.say)
    sources = {}
    with config.unlocked():
        # Datasets larger than memory keep few decoded volumes: shuffled slices re-decode DICOM.
        config.data.volumes_in_memory = 2
        config.data.cache_dir = ""
        if "dicom" in _SOURCES.value:
            sources["dicom"] = slice_source(config, manifest, "train", extra_columns=DEMO_COLUMNS)
        config.data.cache_dir = os.path.join(workdir, "slice_cache")
    if "arrayrecord" in _SOURCES.value:
        start = time.perf_counter()
        sources["arrayrecord"] = slice_source(config, manifest, "train", extra_columns=DEMO_COLUMNS,
                                              fields=("image",))  # as pretraining reads it
        print(f"cache ready in {time.perf_counter() - start:.1f} s ({len(sources['arrayrecord'])} slices)")
    print(describe(config))
    print(f"{'source':<12} {'workers':>8} {'samples/s':>10} {'range':>13} {'per worker':>10} "
          f"{'cpu ms/sample':>13} {'load avg':>8}")
    for name in [s for s in ("arrayrecord", "dicom") if s in sources]:
        cases = ["thread"] + [int(w) for w in _WORKERS.value if w]
        for workers in cases:
            runs = [time_one_thread(sources[name], config, batches=_BATCHES.value) if workers == "thread" else
                    time_pipeline(sources[name], config, num_workers=workers, batches=_BATCHES.value)
                    for _ in range(_REPEATS.value)]
            rates = [r.samples_per_sec for r in runs]
            per_worker = max(rates) / workers if isinstance(workers, int) and workers > 1 else max(rates)
            cpu = f"{min(r.cpu_ms_per_sample for r in runs):.2f}" if workers == "thread" else "-"
            print(f"{name:<12} {workers:>8} {max(rates):>10.1f} {f'{min(rates):.1f}-{max(rates):.1f}':>13} "
                  f"{per_worker:>10.1f} {cpu:>13} {os.getloadavg()[0]:>8.1f}", flush=True)


if __name__ == "__main__":
    app.run(main)
