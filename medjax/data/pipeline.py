"""The pretraining input pipeline: records -> multi-crop views + iBOT masks -> batches.

Built on Grain's index-based `MapDataset`, so every batch is a pure function
of (seed, batch position): the global stream is shuffled (differently each
epoch), record k of the stream is augmented with an RNG keyed by (seed, k),
each process takes every `process_count`-th record, and batch b of a process
is masked with an RNG keyed by (seed, global batch number). That makes the
iterator's checkpoint a single counter, restores exact, and keeps the output
independent of the number of worker processes.

Batch format (numpy, B = per-process batch size, N = patches per global crop):
  global_crops  float32 (n_global * B, Hg, Wg, C), crop-major as the reference collate
  local_crops   float32 (n_local * B, Hl, Wl, C), crop-major (zero rows when n_local = 0)
                (with a `MultiCrop3DConfig` the crops are volumes: (rows, S, S, S, C))
  masks         bool    (n_global * B, N)
  mask_indices  int32   (M,)  flat indices into n_global * B * N, padded with 0
  mask_weights  float32 (M,)  1 / (masked patches of that image), 0 on padding
  n_masked      int32   ()    number of real entries in mask_indices
M = `mask_upper_bound(n_global * B, N, ...)` is static for a configuration.
"""

from __future__ import annotations

import grain
import numpy as np

from medjax.data.augment import MultiCropConfig, Workspace, multicrop_into, output_channels
from medjax.data.augment3d import MultiCrop3DConfig, multicrop3d
from medjax.data.masking import (MaskingGenerator, MaskingGenerator3D, mask_index_arrays, mask_upper_bound,
                                 sample_batch_masks)

# Distinct streams of the one user seed, so shuffle, crops and masks never share random numbers.
_SHUFFLE, _AUGMENT, _MASK = 0, 1, 2


class _AugmentBatch:
    """Records at stream positions k -> their multi-crop views, written straight into crop-major batch
    arrays (rows 0..B-1 are crop 0 of every image), each record's RNG keyed by (seed, k).

    Augmenting at batch time lets the images of a batch share one scratch workspace and write their
    crops where the batch needs them: no per-crop arrays, no stacking copy."""

    def __init__(self, cfg: MultiCropConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def __call__(self, items):
        cfg, n = self.cfg, len(items)
        images = [record["image"] if isinstance(record, dict) else record for _, record in items]
        rngs = [np.random.default_rng([self.seed, _AUGMENT, position]) for position, _ in items]
        if isinstance(cfg, MultiCrop3DConfig):
            return _stack_crop_major([multicrop3d(image, rng, cfg) for image, rng in zip(images, rngs)], cfg)
        c = output_channels(cfg, images[0])
        glob = np.empty((cfg.n_global, n, cfg.global_size, cfg.global_size, c), np.float32)
        local = np.empty((cfg.n_local, n, cfg.local_size, cfg.local_size, c), np.float32)
        workspace = Workspace()
        for b, (image, rng) in enumerate(zip(images, rngs)):
            multicrop_into(image, rng, cfg, glob[:, b], local[:, b], workspace)
        return {"global_crops": glob.reshape(-1, *glob.shape[2:]), "local_crops": local.reshape(-1, *local.shape[2:])}


def _with_position(position: int, record):
    return position, record


def _stack_crop_major(views, cfg: MultiCropConfig) -> dict:
    """Per-record views (lists of crops) -> crop-major arrays (rows 0..B-1 are crop 0 of every record)."""
    glob = np.stack([v["global_crops"][i] for i in range(cfg.n_global) for v in views])
    if cfg.n_local:
        local = np.stack([v["local_crops"][i] for i in range(cfg.n_local) for v in views])
    else:
        local = np.zeros((0,) + (cfg.local_size,) * (glob.ndim - 2) + glob.shape[-1:], np.float32)
    return {"global_crops": glob, "local_crops": local}


class _AddMasks:
    """Batch b of this process -> iBOT masks and padded index arrays, RNG keyed by the global batch number."""

    def __init__(self, grid, n_images, mask_probability, mask_ratio, seed, process_index, process_count):
        self.generator = MaskingGenerator3D(grid) if len(grid) == 3 else MaskingGenerator(grid)
        self.n_images = n_images
        self.mask_probability, self.mask_ratio = mask_probability, tuple(mask_ratio)
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.upper_bound = mask_upper_bound(n_images, self.generator.num_patches, mask_probability, mask_ratio)

    def __call__(self, batch_index: int, batch: dict) -> dict:
        global_batch = batch_index * self.process_count + self.process_index
        rng = np.random.default_rng([self.seed, _MASK, global_batch])
        masks = sample_batch_masks(self.n_images, self.generator, rng, self.mask_probability, self.mask_ratio)
        indices, weights, n_masked = mask_index_arrays(masks, self.upper_bound)
        return dict(batch, masks=masks, mask_indices=indices, mask_weights=weights, n_masked=n_masked)


def make_pretrain_dataset(source, crop_cfg: MultiCropConfig, *, batch_size: int, patch_size: int,
                          mask_probability: float = 0.5, mask_ratio: tuple[float, float] = (0.1, 0.5),
                          seed: int = 0, process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                          prefetch: int = 2, num_epochs: int | None = None) -> grain.IterDataset:
    """Grain dataset of pretraining batches for this process (format in the module docstring).

    `source` is any random-access source (`len`, `[i]`) of records with an
    "image" entry (or of bare images), intensities in [0, 1]. `batch_size` is
    per process. `num_epochs=None` repeats forever (training runs by steps);
    with a finite count every process gets the same number of batches.
    `prefetch` batches are prepared ahead: in background threads, or in each of
    `num_workers` worker processes when `num_workers > 0`.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size} is too small: DINOv2's KoLeo term and masking need "
                         "at least 2 images per process batch; raise batch_size.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
    if seed < 0:
        raise ValueError(f"seed={seed} must be a non-negative integer.")
    if patch_size < 1 or crop_cfg.global_size < patch_size:
        raise ValueError(f"patch_size={patch_size} must be between 1 and global_size={crop_cfg.global_size}.")
    if num_workers < 0 or prefetch < 0:
        raise ValueError(f"num_workers={num_workers} and prefetch={prefetch} must be non-negative.")
    if len(source) == 0:
        raise ValueError("The data source is empty: check the manifest or the split you selected.")
    side = crop_cfg.global_size // patch_size
    n_images = crop_cfg.n_global * batch_size

    shuffle_seed = int(np.random.SeedSequence([seed, _SHUFFLE]).generate_state(1)[0])
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(num_epochs)
    ds = ds.map_with_index(_with_position)  # position in the global stream
    if num_epochs is not None:
        per_step = process_count * batch_size
        usable = len(ds) // per_step * per_step
        if usable == 0:
            raise ValueError(f"{len(ds)} records cannot fill one batch of {batch_size} on each of "
                             f"{process_count} processes; lower batch_size or raise num_epochs.")
        ds = ds[:usable]
    ds = ds[process_index::process_count]
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_AugmentBatch(crop_cfg, seed))
    grid = (side,) * (3 if isinstance(crop_cfg, MultiCrop3DConfig) else 2)
    ds = ds.map_with_index(_AddMasks(grid, n_images, mask_probability, mask_ratio, seed,
                                     process_index, process_count))
    if num_workers > 0:
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                           per_worker_buffer_size=max(prefetch, 1)))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))


def make_iterator(source, crop_cfg: MultiCropConfig, **kwargs):
    """Iterator over `make_pretrain_dataset(source, crop_cfg, **kwargs)`; checkpoint it with
    `get_state()` / `set_state()` (a small dict, saved beside the train state)."""
    return iter(make_pretrain_dataset(source, crop_cfg, **kwargs))
