"""The pretraining trainer's view of the data: a Grain iterator of multi-crop batches as global arrays.

It picks the source (the user's manifest, or the built-in demo dataset when
``config.data.manifest`` is empty, which it says), builds the Grain pipeline
for this process's share of the global batch, and places each host batch on
the mesh with the batch dimension split over the devices.
"""

from __future__ import annotations

from medjax import sharding
from medjax.data import pipeline
from medjax.data.augment import MultiCropConfig
from medjax.data.demo import DemoSlices

# Batch entries split over devices along their first axis; the iBOT buffers are whole on every device.
_SPLIT_KEYS = ("global_crops", "local_crops", "masks")


def crop_config(config) -> MultiCropConfig:
    crops = dict(config.crops)
    for key, value in crops.items():
        if isinstance(value, list):
            crops[key] = tuple(value)
    try:
        return MultiCropConfig(channels=config.model.in_chans, **crops)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.crops is not valid: {e}") from None


def pretrain_source(config, say=None):
    """The records to pretrain on: the manifest's training split, or the demo dataset's."""
    if config.data.manifest:
        raise ValueError(
            f"config.data.manifest={config.data.manifest!r}: reading manifests of DICOM/NIfTI/PNG files "
            "is not available in this version; leave config.data.manifest empty to use the demo dataset."
        )
    d = config.data
    if say:
        say(
            f"config.data.manifest is empty: using the built-in demo dataset ({d.demo_patients} synthetic "
            f"patients x {d.demo_slices_per_patient} MRI-like slices of {d.demo_image_size} px, training split)."
        )
    demo = DemoSlices(d.demo_patients, d.demo_slices_per_patient, d.demo_image_size, seed=config.seed)
    return demo.split("train")


class PretrainData:
    """Iterator of global batches; ``iterator`` is what checkpoints save and restore."""

    def __init__(self, config, mesh, say=None):
        import jax

        per_process = config.train.batch_size_per_device * jax.local_device_count()
        if jax.process_count() > 1 and config.loss.ibot_weight > 0:
            raise ValueError(
                "Multi-process pretraining with iBOT is not supported in this version: run on one host "
                "or set config.loss.ibot_weight=0."
            )
        self.source = pretrain_source(config, say)
        if len(self.source) < per_process:
            raise ValueError(
                f"The dataset has {len(self.source)} training images, fewer than one batch of {per_process}; "
                "lower config.train.batch_size_per_device or add data."
            )
        self.iterator = pipeline.make_iterator(
            self.source,
            crop_config(config),
            batch_size=per_process,
            patch_size=config.model.patch_size,
            mask_probability=config.loss.mask_probability,
            mask_ratio=(config.loss.mask_ratio_min, config.loss.mask_ratio_max),
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            num_workers=config.data.num_workers,
        )
        split, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        self.shardings = {
            key: split if key in _SPLIT_KEYS else whole
            for key in ("global_crops", "local_crops", "masks", "mask_indices", "mask_weights", "n_masked")
        }

    def next_batch(self) -> dict:
        return sharding.to_global(next(self.iterator), self.shardings)

    def close(self) -> None:
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()

