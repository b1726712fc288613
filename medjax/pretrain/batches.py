"""The DINOv2 trainer's view of the data: a Grain iterator of multi-crop batches as global arrays.

It takes the training source (``medjax.data.sources``: the user's manifest, or the built-in demo
dataset when ``config.data.manifest`` is empty, which it says), builds the Grain pipeline
for this process's share of the global batch (Grain shards the shuffled
stream by ``jax.process_index()``), and places each host batch on the mesh
with every entry's first dimension split over the devices (``BatchPlacer``).

With several processes the global batch is laid out as one process's batch
would be: crop-major over all images (rows [crop 0 of every image, crop 1 of
every image, ...]), and the masked-patch buffer indexes that global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medjax import sharding
from medjax.data import pipeline
from medjax.data.augment import MultiCropConfig
from medjax.data.augment3d import MultiCrop3DConfig
from medjax.data.sources import training_source

# What goes to the devices, each entry split over all of them along its first axis. The pipeline's
# n_masked (a per-process count the step does not use) stays on the host.
BATCH_KEYS = ("global_crops", "local_crops", "masks", "mask_indices", "mask_weights")


def crop_config(config) -> MultiCropConfig:
    crops = dict(config.crops)
    for key, value in crops.items():
        if isinstance(value, list):
            crops[key] = tuple(value)
    try:
        cls = MultiCrop3DConfig if config.model.spatial_dims == 3 else MultiCropConfig  # cubes for volumes
        return cls(channels=config.model.in_chans, **crops)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.crops is not valid: {e}") from None


def pretrain_iterator(config, source, batch_size: int, *, num_workers: int | None = None,
                      process_index: int | None = None, process_count: int | None = None):
    """The config's Grain pipeline (multi-crop + masks + batches) over ``source``, this process's share
    (or process ``process_index`` of ``process_count``'s)."""
    return pipeline.make_iterator(
        source,
        crop_config(config),
        batch_size=batch_size,
        patch_size=config.model.patch_size,
        mask_probability=config.loss.mask_probability,
        mask_ratio=(config.loss.mask_ratio_min, config.loss.mask_ratio_max),
        seed=config.seed,
        process_index=jax.process_index() if process_index is None else process_index,
        process_count=jax.process_count() if process_count is None else process_count,
        num_workers=config.data.num_workers if num_workers is None else num_workers,
    )


def global_mask_indices(indices, *, n_patches: int, images: int, process_index: int, process_count: int):
    """Flat masked-patch indices into this process's batch -> indices into the global batch.

    A host batch holds ``images`` images per crop, crop-major: its row c * images + b
    is image b of crop c. In the global batch (crop-major over the processes'
    images in process order) that row is c * images * process_count +
    process_index * images + b. Each index is row * n_patches + patch.
    """
    row, patch = np.divmod(np.asarray(indices, np.int64), n_patches)
    crop, image = np.divmod(row, images)
    global_row = (crop * process_count + process_index) * images + image
    return (global_row * n_patches + patch).astype(np.int32)


class BatchPlacer:
    """This process's host batch -> the global batch on ``mesh``, every entry split over the devices.

    Images and masks arrive on the devices in process order ([process][crop][image]
    rows); with several processes one jitted permutation makes them crop-major over
    the global batch ([crop][process][image]), which is what the loss expects. The
    masked-patch buffer is rewritten on the host to index the global batch and
    padded (weight 0) to a multiple of the local device count.
    """

    def __init__(self, mesh, *, n_global: int, n_local: int):
        self.n_global, self.n_local = n_global, n_local
        self.process_index = jax.process_index()
        self.process_count = len({d.process_index for d in mesh.devices.flat})
        self.local_devices = len(mesh.local_devices)
        split = sharding.batch_sharding(mesh)
        self.shardings = {key: split for key in BATCH_KEYS}
        self._crop_major = None
        if self.process_count > 1:
            self._crop_major = jax.jit(self._reorder, out_shardings=split, static_argnums=1)

    def _reorder(self, x, n_crops):
        """Rows [process][crop][image] -> [crop][process][image]."""
        x = x.reshape(self.process_count, n_crops, -1, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[3:])

    def __call__(self, host_batch: dict) -> dict:
        masks = np.asarray(host_batch["masks"])
        images, n_patches = masks.shape[0] // self.n_global, masks.shape[1]
        indices = global_mask_indices(host_batch["mask_indices"], n_patches=n_patches, images=images,
                                      process_index=self.process_index, process_count=self.process_count)
        weights = np.asarray(host_batch["mask_weights"], np.float32)
        pad = -len(indices) % self.local_devices
        host = {
            "global_crops": host_batch["global_crops"],
            "local_crops": host_batch["local_crops"],
            "masks": masks,
            "mask_indices": np.pad(indices, (0, pad)),
            "mask_weights": np.pad(weights, (0, pad)),
        }
        batch = sharding.to_global(host, self.shardings)
        if self._crop_major is not None:
            crops = {"global_crops": self.n_global, "local_crops": self.n_local, "masks": self.n_global}
            for key, n_crops in crops.items():
                if n_crops and batch[key].shape[0]:
                    batch[key] = self._crop_major(batch[key], n_crops)
        return batch


class PretrainData:
    """Iterator of global batches; ``iterator`` is what checkpoints save and restore."""

    def __init__(self, config, mesh, workdir: str, say=None):
        per_process = config.train.batch_size_per_device * len(mesh.local_devices)
        self.source = training_source(config, workdir, say)
        if len(self.source) < per_process:
            raise ValueError(
                f"The dataset has {len(self.source)} training images, fewer than one batch of {per_process}; "
                "lower config.train.batch_size_per_device or add data."
            )
        self.iterator = pretrain_iterator(config, self.source, per_process)
        self.place = BatchPlacer(mesh, n_global=config.crops.n_global, n_local=config.crops.n_local)
        self.shardings = self.place.shardings

    def next_batch(self) -> dict:
        return self.place(next(self.iterator))

    def close(self) -> None:
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()

