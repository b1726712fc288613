"""``reconstructions.png``: what the MAE sees and what it paints back, for a few validation images.

One row per image: the masked input (removed patches grey), the reconstruction with the visible
patches pasted in (as the official demo shows it), and the original. With ``norm_pix_loss`` the
decoder predicts each patch normalised by its own mean and variance; the picture puts those back
from the original patch, as the official visualisation does. Volumes show their middle axial slice.
The same images and the same masking noise are drawn at every plot step, so the row changes only
as the model learns.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medjax.data.sources import slice_source, training_manifest, volume_source  # noqa: E402
from medjax.mae.batches import view_transform  # noqa: E402
from medjax.objectives.mae import patchify, unpatchify  # noqa: E402


def _validation_images(config, workdir: str, count: int) -> np.ndarray:
    """``count`` eval views spread over the validation split (the training split if there is none)."""
    manifest, extra = training_manifest(config, workdir)
    source_of = volume_source if config.model.spatial_dims == 3 else slice_source
    try:  # images only, as pretraining: the mask column is not read
        source = source_of(config, manifest, "val", extra_columns=extra, masks=False)
    except ValueError:  # a manifest without a val split
        source = source_of(config, manifest, "train", extra_columns=extra, masks=False)
    transform = view_transform(config)
    picks = np.linspace(0, len(source) - 1, min(count, len(source))).round().astype(int)
    return np.stack([transform.eval(source[int(i)]["image"]) for i in picks])


class Reconstructions:
    """Draws ``workdir/reconstructions.png`` from the current parameters (process 0 only)."""

    def __init__(self, config, model, workdir: str):
        self.model, self.path = model, os.path.join(workdir, "reconstructions.png")
        self.mean, self.std = float(config.crops.mean[0]), float(config.crops.std[0])
        self.images = _validation_images(config, workdir, config.train.reconstructions)
        n_patches = (model.img_size // model.patch_size) ** model.spatial_dims
        self.noise = jax.random.uniform(jax.random.PRNGKey(config.seed), (len(self.images), n_patches))
        ratio = config.mae.mask_ratio
        self._forward = jax.jit(lambda params, x, noise: model.apply({"params": params}, x, noise=noise,
                                                                      mask_ratio=ratio))

    def pictures(self, params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(masked input, reconstruction + visible, original), each (N, *image shape) in model units."""
        m, x = self.model, jnp.asarray(self.images)
        out = self._forward(params, x, self.noise)
        pred, mask = out["pred"], out["mask"]
        if m.norm_pix_loss:  # back to pixel units with each patch's own statistics
            target = patchify(x.astype(jnp.float32), m.patch_size)
            mean, var = target.mean(-1, keepdims=True), target.var(-1, keepdims=True, ddof=1)
            pred = pred * jnp.sqrt(var + 1e-6) + mean
        grid = tuple(n // m.patch_size for n in x.shape[1:-1])
        rec = unpatchify(pred, m.patch_size, spatial_dims=m.spatial_dims, grid=grid)
        removed = unpatchify(jnp.repeat(mask[..., None], pred.shape[-1], -1), m.patch_size,
                             spatial_dims=m.spatial_dims, grid=grid)
        masked = jnp.where(removed > 0, np.nan, x)
        pasted = jnp.where(removed > 0, rec, x)
        return tuple(np.asarray(a) for a in (masked, pasted, x))

    def draw(self, params, step: int) -> None:
        rows = self.pictures(params)
        n = len(self.images)
        fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
        for i in range(n):
            for j, (title, image) in enumerate(zip(("masked input", "reconstruction + visible", "original"),
                                                   rows)):
                picture = image[i][..., 0]
                if picture.ndim == 3:  # a volume: its middle axial slice
                    picture = picture[picture.shape[0] // 2]
                shown = np.clip(picture * self.std + self.mean, 0.0, 1.0)
                ax = axes[i, j]
                ax.imshow(np.ma.masked_invalid(shown), cmap="gray", vmin=0.0, vmax=1.0)
                ax.set_facecolor("0.5")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(title, fontsize=9)
        fig.suptitle(f"MAE reconstructions of validation images at step {step}", fontsize=10)
        fig.tight_layout()
        fig.savefig(self.path, dpi=90)
        plt.close(fig)
