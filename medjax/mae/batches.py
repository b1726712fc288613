"""The MAE trainer's view of the data: one random view per image (random resized crop, bicubic, and a
horizontal flip, as the official ``main_pretrain.py``), batched by Grain and placed on the mesh.

The stream is the shuffled, repeated training source (``medjax.data.sources``); record ``i`` of it
draws its view from a generator seeded by (seed, i), so the batches are a pure function of the seed
and the iterator position that checkpoints save: a resumed run sees exactly the batches an
uninterrupted one would. Grain shards the stream over processes; each process's host batch goes to
the devices with its first axis split over them.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from medjax import sharding
from medjax.data.sources import training_source
from medjax.data.views import SingleView
from medjax.data.views3d import SingleView3D

_STREAM = 0x3AE  # separates the view generators from other users of the seed


def view_transform(config):
    """The train / eval views of ``config.crops`` at the model's input size (cubes for volumes)."""
    c = config.crops
    cls = SingleView3D if config.model.spatial_dims == 3 else SingleView
    try:
        return cls(c.global_size, tuple(c.mean), tuple(c.std), tuple(c.scale), tuple(c.ratio), c.flip_p,
                   config.model.in_chans)
    except ValueError as e:
        raise ValueError(f"config.crops is not valid: {e}") from None


class _View:
    """Record at stream position ``index`` -> its random view (a pure function of seed and position)."""

    def __init__(self, transform, seed: int):
        self.transform, self.seed = transform, seed

    def __call__(self, index: int, record) -> np.ndarray:
        image = record["image"] if isinstance(record, dict) else record
        return self.transform.train(image, np.random.default_rng([self.seed, _STREAM, index]))


def _stack(views) -> dict:
    return {"images": np.stack(views)}


def make_dataset(source, transform, *, batch_size: int, seed: int = 0, process_index: int = 0,
                 process_count: int = 1, num_workers: int = 0, prefetch: int = 2) -> grain.IterDataset:
    """Batches ``{"images": (batch_size, *view shape)}`` of this process's share of the endless stream."""
    if len(source) == 0:
        raise ValueError("The data source is empty: check the manifest or the split you selected.")
    shuffle_seed = int(np.random.SeedSequence([seed, _STREAM]).generate_state(1)[0])
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(None)
    ds = ds.map_with_index(_View(transform, seed))[process_index::process_count]
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_stack)
    if num_workers > 0:
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                           per_worker_buffer_size=max(prefetch, 1)))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))


class MAEData:
    """Iterator of global batches; ``iterator`` is what checkpoints save and restore; ``epoch_length`` is
    one pass over the training images at the global batch (the official epoch)."""

    def __init__(self, config, mesh, workdir: str, say=None):
        per_process = config.train.batch_size_per_device * len(mesh.local_devices)
        self.source = training_source(config, workdir, say)
        global_batch = per_process * jax.process_count()
        if len(self.source) < global_batch:
            raise ValueError(f"The dataset has {len(self.source)} training images, fewer than one batch of "
                             f"{global_batch}; lower config.train.batch_size_per_device or add data.")
        self.epoch_length = len(self.source) // global_batch
        self.transform = view_transform(config)
        self.iterator = iter(make_dataset(self.source, self.transform, batch_size=per_process, seed=config.seed,
                                          process_index=jax.process_index(), process_count=jax.process_count(),
                                          num_workers=config.data.num_workers))
        self.shardings = {"images": sharding.batch_sharding(mesh)}

    def next_batch(self) -> dict:
        return sharding.to_global(next(self.iterator), self.shardings)

    def close(self) -> None:
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()
