"""Synthetic brain MR subjects built on the MNI152 template: anatomy, lesions, contrasts.

Why a template instead of a drawn phantom: the demo dataset should look like a
real head scan to the readers and to the model (folded cortex, ventricles, deep
grey nuclei in their true proportions), and the ICBM 2009a template with its
grey- and white-matter probability maps ships inside nilearn, so nothing is
downloaded. The template is skull-stripped, so CSF is "inside the template's
head mask but neither grey nor white matter", and the skull (bone with a fatty
diploe) and the scalp (fat) are shells built from the signed distance to that mask.

Each subject is the template under its own smooth DCT deformation (the basis
SPM uses for warps and bias), small rotation and scaling, seen through an axial
slab of `slices` slices around the lateral ventricles. Contrasts come from
tissue parameters (PD, T1, T2) and the spin-echo / inversion-recovery signal
equations, then a smooth multiplicative bias field and Rician noise. Everything
is a function of (seed, patient index): separate random streams for anatomy,
lesion and noise keep a subject's anatomy independent of its label.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os

import numpy as np
from scipy import ndimage

from medjax.data.demo_lesions import LESION_TISSUES, add_lesion

CONTRASTS = ("T1", "T2", "FLAIR")
FOV_MM = 224.0  # in-plane field of view: the head with its scalp fits with room for pose changes
SLAB_MM = 48.0  # slab height when slice spacing is not clipped (covers the lateral ventricles)
SLAB_CENTRE_MNI = (0.0, -17.0, 14.0)  # mm: mid-head in-plane, mid-ventricles in z

# Proton density (relative to water), T1 and T2 in ms at 1.5 T: literature-typical values.
TISSUES = {
    "csf": (1.00, 3600.0, 1800.0),
    "gm": (0.80, 1200.0, 95.0),
    "wm": (0.68, 750.0, 72.0),
    "fat": (0.90, 260.0, 80.0),
    "bone": (0.05, 500.0, 5.0),
    **LESION_TISSUES,
}


def _null_ti(t1: float, tr: float) -> float:
    """Inversion time that nulls a tissue of this T1: 1 - 2 exp(-TI/T1) + exp(-TR/T1) = 0."""
    return t1 * math.log(2.0 / (1.0 + math.exp(-tr / t1)))


# Sequence parameters (ms). SNR is the brain-signal to noise ratio before the per-subject factor.
SEQUENCES = {
    "T1": dict(description="T1w", tr=500.0, te=12.0, ti=None, snr=30.0, etl=1, scanning="SE", variant="NONE"),
    "T2": dict(description="T2w", tr=4500.0, te=100.0, ti=None, snr=28.0, etl=16, scanning="SE", variant="SK"),
    "FLAIR": dict(description="FLAIR", tr=9000.0, te=110.0, ti=float(round(_null_ti(TISSUES["csf"][1], 9000.0))),
                  snr=25.0, etl=16, scanning=["SE", "IR"], variant="SK"),
}


def signal(pd: float, t1: float, t2: float, seq: dict) -> float:
    """Magnitude signal of one tissue: spin echo, or inversion recovery when the sequence has a TI."""
    decay = math.exp(-seq["te"] / t2)
    if seq["ti"] is None:
        return pd * (1.0 - math.exp(-seq["tr"] / t1)) * decay
    return pd * abs(1.0 - 2.0 * math.exp(-seq["ti"] / t1) + math.exp(-seq["tr"] / t1)) * decay


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The voxel grid of one subject: RAS voxel axes, `affine` maps voxel indices to RAS mm."""

    shape: tuple
    spacing: tuple  # (dx, dy, dz) in mm; dz is the slice spacing (centre to centre)
    thickness: float  # slice thickness in mm (smaller than dz: a slice gap, as on clinical scanners)
    affine: np.ndarray

    def world_axes(self):
        """RAS coordinates of voxel centres along each axis (the grid is axis-aligned)."""
        return [self.affine[a, 3] + self.affine[a, a] * np.arange(n) for a, n in enumerate(self.shape)]


@dataclasses.dataclass
class Subject:
    """One synthetic subject: float32 images per contrast and uint8 lesion mask, RAS voxel order."""

    images: dict
    mask: np.ndarray
    fractions: dict  # volume fractions of csf, gm, wm, fat, bone and all lesion tissue ("lesion")
    geometry: Geometry
    sequences: dict
    lesion: dict  # kind and centre (RAS mm) of the lesion, empty for class 0


def grid_spacing(image_size: int, slices: int):
    """(in-plane spacing, slice spacing, slice thickness) in mm for a requested grid size."""
    dxy = round(FOV_MM / image_size, 4)
    dz = round(min(6.0, max(1.0, SLAB_MM / slices)), 3)
    return dxy, dz, round(0.9 * dz, 3)


def _template_dir() -> str:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The demo dataset's anatomy is nilearn's MNI152 template; "
                          "install nilearn (pip install nilearn).")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data")


@functools.lru_cache(maxsize=2)
def _template(dxy: float, thickness: float):
    """Tissue maps on the template grid, pre-blurred to the subject's voxel size (partial volume).

    Returns (maps (3, X, Y, Z) float32 gm/wm/csf at 1 mm, signed distance to the head mask
    (mm, positive outside) at 2 mm, voxel-from-MNI affine). Only the z range a slab can reach is kept.
    """
    import nibabel as nib

    def load(name):
        img = nib.load(os.path.join(_template_dir(), f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"))
        return img, np.asarray(img.dataobj, dtype=np.float32) * (1.0 / 255.0)

    t1_img, t1 = load("t1")
    gm, wm = load("gm")[1], load("wm")[1]
    inv = np.linalg.inv(t1_img.affine)
    reach = SLAB_MM / 2 + 40.0  # slab half height + pose, deformation and smoothing margins
    z_lo = max(0, int(inv[2, 2] * (SLAB_CENTRE_MNI[2] - reach) + inv[2, 3]))
    z_hi = min(t1.shape[2], int(inv[2, 2] * (SLAB_CENTRE_MNI[2] + reach) + inv[2, 3]) + 1)
    head = (t1[..., z_lo:z_hi] > 0.04).astype(np.float32)  # the template is skull-stripped: head mask = brain + CSF
    gm, wm = gm[..., z_lo:z_hi] * head, wm[..., z_lo:z_hi] * head
    total = np.maximum(gm + wm, 1.0)
    gm, wm = gm / total, wm / total
    csf = np.clip(head - gm - wm, 0.0, 1.0)
    # Blur to the slice profile (box of `thickness`) and in-plane pixel size before sampling.
    sigma = (0.4 * dxy, 0.4 * dxy, thickness / math.sqrt(12.0))
    maps = np.stack([ndimage.gaussian_filter(m, sigma) for m in (gm, wm, csf)])
    coarse = head[::2, ::2, ::2] > 0.5
    sd = 2.0 * (ndimage.distance_transform_edt(~coarse) - ndimage.distance_transform_edt(coarse))
    shift = np.eye(4)
    shift[2, 3] = -z_lo
    return maps, sd.astype(np.float32), shift @ inv


def _smooth_field(rng: np.random.Generator, shape, orders, std: float) -> np.ndarray:
    """Random field from the lowest DCT basis functions over the grid, scaled to `std`."""
    bases = [np.cos(math.pi * np.outer((np.arange(n) + 0.5) / n, np.arange(k))).astype(np.float32)
             for n, k in zip(shape, orders)]
    a, b, c = np.meshgrid(*[np.arange(k) for k in orders], indexing="ij")
    coef = (rng.standard_normal(orders) / (1.0 + a * a + b * b + c * c)).astype(np.float32)
    coef[0, 0, 0] = 0.0
    f = np.tensordot(bases[0], coef, axes=(1, 0))  # (i, b, c)
    f = np.tensordot(f, bases[1], axes=(1, 1))  # (i, c, j)
    f = np.tensordot(f, bases[2], axes=(1, 1))  # (i, j, k)
    return f * np.float32(std / (f.std() + 1e-12))


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def _ramp(t: np.ndarray, width: float) -> np.ndarray:
    """Soft step 0 -> 1 around t = 0 over `width` mm (a partial-volume edge)."""
    return np.clip(0.5 + t * (1.0 / width), 0.0, 1.0)


def synthesize_subject(seed: int, index: int, label: int, *, image_size: int = 128, slices: int = 16,
                       contrasts=CONTRASTS) -> Subject:
    """Render subject `index` of the dataset `seed` with lesion class `label` (0 none ... 3 diffuse)."""
    dxy, dz, thickness = grid_spacing(image_size, slices)
    maps, sd_map, vox_from_mni = _template(dxy, thickness)
    rng = np.random.default_rng([seed, index, 1])  # anatomy and pose
    shape = (image_size, image_size, slices)
    centre = np.round([rng.uniform(-10, 10), rng.uniform(-30, 10), rng.uniform(-20, 40)], 2)
    origin = np.round(centre - 0.5 * (np.array(shape) - 1) * np.array([dxy, dxy, dz]), 2)
    geom = Geometry(shape, (dxy, dxy, dz), thickness, np.array([[dxy, 0, 0, origin[0]], [0, dxy, 0, origin[1]],
                                                                [0, 0, dz, origin[2]], [0, 0, 0, 1.0]]))

    # World (subject RAS mm) -> template MNI mm: m = c_t + (R S)^-1 (x - c_h) + displacement(x).
    rot = _rotation(*np.radians([rng.uniform(-5, 5), rng.uniform(-3, 3), rng.uniform(-8, 8)]))
    scale = rng.uniform(0.92, 1.06) * rng.uniform(0.97, 1.03, 3)
    c_head = centre + np.array([rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-2, 2)])
    back = np.diag(1.0 / scale) @ rot.T
    disp = [_smooth_field(rng, shape, (4, 4, 2), 2.0) for _ in range(3)]
    xs, ys, zs = (w - c for w, c in zip(geom.world_axes(), c_head))
    mni = [np.float32(SLAB_CENTRE_MNI[a]) + (back[a, 0] * xs[:, None, None] + back[a, 1] * ys[None, :, None]
                                              + back[a, 2] * zs[None, None, :]).astype(np.float32) + disp[a]
           for a in range(3)]
    vox = np.stack([sum(vox_from_mni[a, b] * mni[b] for b in range(3)) + vox_from_mni[a, 3] for a in range(3)])
    gm, wm, csf = (ndimage.map_coordinates(m, vox, order=1, mode="constant", cval=0.0, output=np.float32)
                   for m in maps)
    sd = ndimage.map_coordinates(sd_map, vox * 0.5, order=1, mode="nearest", output=np.float32)
    del vox, mni, disp

    # Shells outside the (skull-stripped) template: CSF rim, bone with a fatty diploe, fatty scalp.
    t_csf, t_bone, t_scalp = rng.uniform(1.0, 2.5), rng.uniform(4.0, 7.0), rng.uniform(4.0, 8.0)
    pv = 0.7 * dxy
    outside = np.clip(1.0 - gm - wm - csf, 0.0, 1.0)
    past_csf, past_bone = _ramp(sd - t_csf, pv), _ramp(sd - t_csf - t_bone, pv)
    bone = outside * past_csf * (1.0 - past_bone)
    diploe = bone * (0.6 * _ramp(t_bone / 6.0 - np.abs(sd - t_csf - 0.5 * t_bone), pv))
    fractions = dict(csf=csf + outside * (1.0 - past_csf), gm=gm, wm=wm,
                     fat=outside * past_bone * (1.0 - _ramp(sd - t_csf - t_bone - t_scalp, pv)) + diploe,
                     bone=bone - diploe)

    lesion_rng = np.random.default_rng([seed, index, 2])
    mask, box, lesion_fr, lesion = add_lesion(lesion_rng, label, fractions, -sd, geom)
    lesion_total = np.zeros(shape, np.float32)
    if box is not None:
        lesion_total[box] = sum(lesion_fr.values())

    # Per-subject tissue parameter variation (a few per cent), then one image per contrast.
    params = {t: (pd * rng.uniform(0.97, 1.03), t1 * rng.uniform(0.95, 1.05), t2 * rng.uniform(0.95, 1.05))
              for t, (pd, t1, t2) in TISSUES.items()}
    bias = np.exp(_smooth_field(rng, shape, (3, 3, 2), 0.12))
    snr_factor = rng.uniform(0.75, 1.3)
    images = {}
    for c in contrasts:
        seq = SEQUENCES[c]
        weights = {t: np.float32(signal(*params[t], seq)) for t in TISSUES}
        img = sum(weights[t] * fractions[t] for t in fractions)
        if box is not None:
            img[box] += sum(weights[t] * f for t, f in lesion_fr.items())
        gain = 3000.0 * np.random.default_rng([seed, index, 3, CONTRASTS.index(c)]).uniform(0.8, 1.25)
        sigma = gain * 0.25 / (seq["snr"] * snr_factor)
        noise = np.random.default_rng([seed, index, 4, CONTRASTS.index(c)]).standard_normal((2, *shape),
                                                                                              dtype=np.float32)
        img *= bias * np.float32(gain)
        img = np.sqrt((img + np.float32(sigma) * noise[0]) ** 2 + (np.float32(sigma) * noise[1]) ** 2)
        images[c] = img.astype(np.float32)
    return Subject(images, mask, dict(fractions, lesion=lesion_total), geom, {c: SEQUENCES[c] for c in contrasts},
                   lesion)
