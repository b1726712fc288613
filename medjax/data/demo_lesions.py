"""Brain lesions for the synthetic demo subjects: three kinds that differ in local structure.

Why these three: they are the classic differential of a focal white-matter
lesion on plain (non-contrast) MR, and they differ in shape, edge and internal
structure more than in overall brightness, so a classifier has to look at the
lesion, not at the histogram of the slice.

  1 round     metastasis-like: small, well-defined sphere-like solid tissue, sharp edge,
              sometimes a thin rim of vasogenic oedema.
  2 ring      glioblastoma-like: thick irregular rim of viable tumour around a necrotic
              (fluid-like) core, surrounded by a wide oedema halo that follows white matter.
  3 diffuse   low-grade-glioma-like: irregular, infiltrative, T2/FLAIR-bright tissue with a
              soft edge over several millimetres, following white matter, mottled inside.

A lesion replaces the tissue it occupies (volume fractions stay <= 1), so every
contrast is computed from the same tissue model. The mask is the tumour (rim and
core for kind 2), not the oedema.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

# Proton density, T1 (ms), T2 (ms) at 1.5 T, chosen within the ranges reported for these lesions.
LESION_TISSUES = {
    "oedema": (0.82, 1500.0, 160.0),  # vasogenic: long T1 and T2, bright on T2w and FLAIR
    "solid": (0.82, 1300.0, 120.0),  # metastasis: mildly T1-dark, moderately T2-bright
    "rim": (0.85, 1400.0, 110.0),  # viable glioblastoma rim
    "necrosis": (0.95, 2400.0, 400.0),  # near-fluid core: dark on T1w, bright on T2w, not nulled on FLAIR
    "infiltrative": (0.84, 1450.0, 170.0),  # low-grade glioma: T1-dark, T2/FLAIR-bright
}
BASE_TISSUES = ("csf", "gm", "wm", "fat", "bone")


def _ramp(t, width):
    return np.clip(0.5 + t * (1.0 / width), 0.0, 1.0)


def _centre(rng_pick: float, wm: np.ndarray, depth: np.ndarray, need: float) -> tuple:
    """A voxel deep in white matter in the middle half of the slab, chosen by `rng_pick` in [0, 1)."""
    s = wm.shape[2]
    mid = np.zeros(s, bool)
    mid[s // 4: max(s // 4 + 1, (3 * s + 3) // 4)] = True
    for wm_min, depth_min in ((0.9, need), (0.7, need), (0.5, 0.5 * need)):
        ok = (wm > wm_min) & (depth > depth_min) & mid
        idx = np.flatnonzero(ok)
        if idx.size:
            return np.unravel_index(idx[int(rng_pick * idx.size)], wm.shape)
    return np.unravel_index(int(np.argmax(wm * np.maximum(depth, 0.0) * mid)), wm.shape)


def _smooth_noise(rng: np.random.Generator, shape, sigma_vox) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="reflect")
    return np.clip(n * (1.0 / (n.std() + 1e-6)), -2.0, 2.0)


def add_lesion(rng: np.random.Generator, label: int, fractions: dict, depth: np.ndarray, geom):
    """Insert a lesion of class `label` into `fractions` (modified in place around the lesion).

    `depth` is the distance (mm) inside the head mask. Returns (mask uint8 volume, box (slices) or
    None, lesion tissue fractions inside the box, description dict).
    """
    # Every parameter is drawn for every class, so the random stream does not depend on the label.
    radius = {1: rng.uniform(5.0, 10.0), 2: rng.uniform(9.0, 16.0), 3: rng.uniform(8.0, 14.0)}
    axes = rng.uniform(0.85, 1.15, 3)
    orient, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    rim_frac, halo_round, halo_ring = rng.uniform(0.25, 0.4), rng.uniform(0.0, 5.0), rng.uniform(4.0, 10.0)
    pick = rng.random()
    noise_rng = np.random.default_rng(rng.integers(2 ** 63))
    mask = np.zeros(geom.shape, np.uint8)
    if label == 0:
        return mask, None, {}, {}
    r = radius[label]
    reach = 1.2 * r + {1: halo_round, 2: halo_ring, 3: 1.0 * r}[label]
    ci = _centre(pick, fractions["wm"], depth, 1.2 * r + 3.0)
    spacing = np.asarray(geom.spacing)
    box = tuple(slice(max(0, c - math.ceil(reach / sp) - 1), min(n, c + math.ceil(reach / sp) + 2))
                for c, sp, n in zip(ci, spacing, geom.shape))
    world = geom.world_axes()
    centre = np.array([world[a][ci[a]] for a in range(3)])
    rel = [(world[a][box[a]] - centre[a]).astype(np.float32) for a in range(3)]
    bshape = tuple(s.stop - s.start for s in box)
    # Distance in the lesion's own (rotated, stretched) frame.
    local = [(orient[0, a] * rel[0][:, None, None] + orient[1, a] * rel[1][None, :, None]
              + orient[2, a] * rel[2][None, None, :]) * np.float32(1.0 / axes[a]) for a in range(3)]
    d = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2)
    sigma_vox = 0.35 * r / spacing
    noise, noise2 = _smooth_noise(noise_rng, bshape, sigma_vox), _smooth_noise(noise_rng, bshape, 0.5 * sigma_vox)

    sub = {t: fractions[t][box] for t in BASE_TISSUES}  # views: edits land in `fractions`
    gm, wm, csf = sub["gm"], sub["wm"], sub["csf"]
    brain = gm + wm + csf
    pv = 0.5 * float(spacing[:2].min())  # a sharp edge: within one in-plane voxel
    halo, tumour = None, {}
    if label == 1:
        a = extent = _ramp(r - d, pv)
        tumour["solid"] = a
        if halo_round > 2.0:
            halo = _ramp(r + halo_round - d, 2.0) * (1.0 - a)
    elif label == 2:
        dd = d * (1.0 + 0.1 * noise)
        a = _ramp(r - dd, pv)
        core = np.minimum(_ramp(r * (1.0 - rim_frac) - d * (1.0 - 0.15 * noise), pv), a)
        tumour["rim"], tumour["necrosis"], extent = a - core, core, a
        halo = _ramp(r + halo_ring - dd, 0.4 * halo_ring) * (1.0 - a)
    else:
        rho = d * (1.0 / r)
        g = 1.0 - rho + 0.35 * noise * np.minimum(rho, 1.0)
        extent = _ramp(g, 0.6) * (wm + 0.35 * gm) / np.maximum(brain, 1e-3)  # infiltrates along white matter
        # Mottled: inside the infiltrated region part of each voxel stays normal tissue.
        tumour["infiltrative"] = extent * np.clip(0.8 + 0.2 * noise2, 0.4, 1.0)

    extra = {}
    if halo is not None:  # oedema turns part of the white (less of the grey) matter into oedema
        par = np.maximum(gm + wm, 1e-6)
        h = halo * (wm + 0.3 * gm)
        keep = 1.0 - h / par
        gm *= keep
        wm *= keep
        extra["oedema"] = h
    total = sum(tumour.values())
    for t in BASE_TISSUES:
        sub[t] *= 1.0 - total
    lesion_fr = {t: f * (1.0 - total) for t, f in extra.items()}
    lesion_fr.update(tumour)
    mask[box] = ((extent > 0.5) & (brain > 0.5)).astype(np.uint8)
    info = dict(kind=("none", "round", "ring", "diffuse")[label], centre_ras=centre.round(2).tolist(),
                radius_mm=round(float(r), 2))
    return mask, box, {t: f.astype(np.float32) for t, f in lesion_fr.items()}, info
