"""In-memory synthetic phantom slices for the tests: no files, any size.

Every record is computed from (seed, index) when it is read, so the dataset
is a random-access source that costs no memory and is identical on every
machine. Each synthetic patient has a head phantom (scalp, dark skull ring,
CSF, folded grey/white matter, lateral ventricles, deep grey nuclei) with its
own shape deformation, position, bias field and Rician noise level, and one of
four lesion kinds that differ in local structure rather than brightness:

  0 none, 1 round well-defined (bright, homogeneous, sharp edge), 2 ring-shaped
  (bright rim, dark core, dark oedema halo), 3 diffuse irregular (dark, mottled,
  lobulated, soft infiltrating margin).

Lesions are small next to the slice and the global intensity varies more
between patients than between classes, so a classifier must look at local
structure. Labels, lesion masks and splits are per patient: a patient's slices
all share label and split, and classes are balanced in every split.
"""

from __future__ import annotations

import math

import numpy as np

CLASS_NAMES = ("none", "round", "ring", "diffuse")
SPLITS = ("train", "val", "test")
_BAND = 16  # highest in-plane frequency (cycles per field of view) of the anatomy fields


def _harmonics(dx: np.ndarray, dy: np.ndarray, dist: np.ndarray, coef, first: int) -> np.ndarray:
    """sum_m Re(c_m exp(i (first + m) angle)) for the angle of (dx, dy), by recurrence (no trig calls)."""
    inv = 1.0 / (dist + 1e-6)
    c1, s1 = dx * inv, dy * inv
    cm, sm = c1, s1
    for _ in range(first - 1):
        cm, sm = cm * c1 - sm * s1, sm * c1 + cm * s1
    total = np.zeros(dx.shape, np.float32)
    for c in coef:
        total += float(c.real) * cm - float(c.imag) * sm
        cm, sm = cm * c1 - sm * s1, sm * c1 + cm * s1
    return total


def _ramp(t: np.ndarray, width: float) -> np.ndarray:
    """Soft step 0 -> 1 around t = 0 over `width` (cheaper than a sigmoid)."""
    return np.clip(0.5 + t * (1.0 / width), 0.0, 1.0)


class DemoSlices:
    """Synthetic MRI-like slices as a random-access source of record dicts.

    Record i is patient ``i // slices_per_patient``, axial level
    ``i % slices_per_patient``: ``dict(image=float32 (size, size) in [0, 1],
    label=int, mask=uint8 (size, size), patient_id=str, split=str)``.
    """

    num_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES

    def __init__(self, num_patients: int = 120, slices_per_patient: int = 8, size: int = 128, seed: int = 0,
                 split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)):
        if num_patients < 1 or slices_per_patient < 1:
            raise ValueError(f"num_patients={num_patients} and slices_per_patient={slices_per_patient} "
                             "must both be at least 1.")
        if size < 32:
            raise ValueError(f"size={size} is too small for the phantom; use at least 32 pixels.")
        if len(split_fractions) != 3 or min(split_fractions) < 0 or not math.isclose(sum(split_fractions), 1.0):
            raise ValueError(f"split_fractions={split_fractions} must be three non-negative fractions "
                             "(train, val, test) summing to 1.")
        self.num_patients, self.slices_per_patient = int(num_patients), int(slices_per_patient)
        self.size, self.seed = int(size), int(seed)
        # Patient j of a seeded permutation gets class j % 4, and the first
        # n_train of the permutation form train, then val, then test: classes
        # are balanced (to one patient) overall and within every split.
        order = np.random.default_rng([self.seed, 0x5EED]).permutation(self.num_patients)
        rank = np.empty(self.num_patients, np.int64)
        rank[order] = np.arange(self.num_patients)
        self.patient_labels = (rank % self.num_classes).astype(np.int64)
        n_train = int(round(split_fractions[0] * self.num_patients))
        n_val = int(round(split_fractions[1] * self.num_patients))
        self.patient_splits = np.where(rank < n_train, 0, np.where(rank < n_train + n_val, 1, 2)).astype(np.int8)
        c = (np.arange(self.size, dtype=np.float32) + 0.5) * (2.0 / self.size) - 1.0
        self._v, self._u = np.meshgrid(c, c, indexing="ij")  # v: rows (anterior-posterior), u: columns
        kr = np.fft.fftfreq(2 * _BAND, 1.0 / (2 * _BAND))
        kc = np.arange(_BAND + 1, dtype=np.float64)
        self._k = np.hypot(kr[:, None], kc[None, :])

    def __len__(self) -> int:
        return self.num_patients * self.slices_per_patient

    def split(self, name: str) -> "DemoSplit":
        """The records of one split ('train', 'val' or 'test'), as a random-access view."""
        if name not in SPLITS:
            raise ValueError(f"split={name!r} is not one of {SPLITS}.")
        return DemoSplit(self, name)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} demo slices.")
        patient, level = divmod(index % len(self), self.slices_per_patient)
        label = int(self.patient_labels[patient])
        image, mask = self._render(patient, level, label)
        return dict(image=image, label=label, mask=mask, patient_id=f"demo{patient:05d}",
                    split=SPLITS[self.patient_splits[patient]])

    # ---- rendering -----------------------------------------------------------------------------

    def _field(self, rng: np.random.Generator, z: float, peak: float) -> np.ndarray:
        """Unit-variance random field at axial level z, band-passed around `peak` cycles/FOV.

        Each Fourier component also carries a random axial frequency, so nearby
        levels of one patient look like neighbouring slices of one volume. Only
        frequencies up to _BAND are non-zero, so the anatomy does not depend on `size`.
        """
        amp = np.exp(-0.5 * ((self._k - peak) / (0.35 * peak)) ** 2)
        coef = rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape)
        kz = rng.standard_normal(amp.shape) * (math.pi * self._k)
        band = amp * coef * np.exp(1j * kz * z)
        spec = np.zeros((self.size, self.size // 2 + 1), np.complex64)
        spec[:_BAND, :_BAND + 1] = band[:_BAND]
        spec[-_BAND:, :_BAND + 1] = band[_BAND:]
        f = np.fft.irfft2(spec, s=(self.size, self.size))
        return f * (1.0 / (f.std() + 1e-12))

    def _render(self, patient: int, level: int, label: int):
        prng = np.random.default_rng([self.seed, patient])
        n = self.slices_per_patient
        z = 0.0 if n == 1 else -0.3 + 0.6 * level / (n - 1)

        # Head pose and shape: rotation, shift, elliptical axes shrinking away from z = 0, harmonics.
        # (Python floats keep every image operation in float32.)
        angle = float(prng.uniform(-0.17, 0.17))
        sx, sy = (float(t) for t in prng.uniform(-0.05, 0.05, 2))
        shrink = math.sqrt(1.0 - (z / 0.9) ** 2)
        ax, ay = float(prng.uniform(0.68, 0.78)) * shrink, float(prng.uniform(0.80, 0.90)) * shrink
        harm = prng.normal(0.0, 0.025, 4) * np.exp(1j * prng.uniform(0.0, 2 * math.pi, 4))
        ca, sa = math.cos(angle), math.sin(angle)
        x = (ca * (self._u - sx) + sa * (self._v - sy)) * (1.0 / ax)
        y = (-sa * (self._u - sx) + ca * (self._v - sy)) * (1.0 / ay)
        r0 = np.sqrt(x * x + y * y)
        rho = r0 / (1.0 + _harmonics(x, y, r0, harm, first=1))
        px = 2.0 / self.size / (0.5 * (ax + ay))  # one pixel in rho units

        folds = self._field(prng, z, 9.0)
        sulci = self._field(prng, z, 12.0)
        # Brain: grey matter, white matter inside an undulating boundary, CSF-filled sulci.
        rb = rho / 0.83
        wm = _ramp(0.70 - rb + 0.07 * folds, 0.05)
        img = 0.48 + 0.30 * wm
        sulcal = _ramp(rb - 0.55, 0.1) * _ramp(0.35 - np.abs(sulci), 0.25)
        img = img - 0.33 * sulcal
        # Deep grey nuclei and lateral ventricles (larger near the middle levels).
        vsize = float(prng.uniform(0.7, 1.3)) * max(0.0, 1.0 - (z / 0.35) ** 2)
        for side in (-1.0, 1.0):
            nx, ny = x - side * 0.26, y + 0.05
            img = img - 0.22 * _ramp(1.0 - (nx / 0.14) ** 2 - (ny / 0.2) ** 2, 0.4)
            if vsize > 0.05:
                vx, vy = x - side * 0.09, y + 0.02
                rx, ry = vx * 0.96 - side * vy * 0.26, vy * 0.96 + side * vx * 0.26
                inside = 1.0 - (rx / (0.06 * vsize)) ** 2 - (ry / (0.32 * vsize)) ** 2
                img = np.where(inside > 0, 0.13, img)

        mask = np.zeros((self.size, self.size), np.uint8)
        lesion = self._lesion(prng, z, label)
        if lesion is not None:  # rendered in a window around it: a lesion is small
            cx, cy, reach = lesion[:3]
            col = (sx + ca * cx * ax - sa * cy * ay + 1.0) * self.size / 2
            row = (sy + sa * cx * ax + ca * cy * ay + 1.0) * self.size / 2
            half = reach * max(ax, ay) * self.size / 2 + 3
            win = (slice(max(0, int(row - half)), int(row + half) + 1),
                   slice(max(0, int(col - half)), int(col + half) + 1))
            img[win], mask[win] = self._draw(lesion, img[win], x[win], y[win], sulci[win], px, label)
        # Shells: CSF rim, dark skull ring, bright scalp, air.
        img = np.where(rho > 0.83, 0.13, img)
        img = img + (0.08 - 0.13) * _ramp(rho - 0.865, px)
        img = img + (0.75 - 0.08) * _ramp(rho - 0.935, px)
        img = img * _ramp(1.0 - rho, px)

        # Scanner: smooth multiplicative bias field, gain, Rician noise.
        srng = np.random.default_rng([self.seed, patient, level])
        b = [float(t) for t in prng.normal(0.0, 0.08, 5)]
        u, v = self._u, self._v
        bias = 1.0 + b[0] * u + b[1] * v + b[2] * u * u + b[3] * v * v + b[4] * u * v
        img = img * bias * float(prng.uniform(0.85, 1.15))
        sigma = float(prng.uniform(0.015, 0.04))
        noise = srng.standard_normal((2, self.size, self.size), dtype=np.float32) * sigma
        img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
        image = np.clip(img * (1.0 / 0.95), 0.0, 1.0).astype(np.float32)
        return image, mask

    def _lesion(self, prng, z, label):
        """Lesion centre, extent (head-frame units), radius at this level and lobes; None for class 0."""
        # Drawn for every class so the anatomy does not depend on the label.
        r_max, where = float(prng.uniform(0.13, 0.19)), float(prng.uniform(0.2, 0.5))
        ang, z_c = float(prng.uniform(0.0, 2 * math.pi)), float(prng.uniform(-0.1, 0.1))
        lobes = prng.normal(0.0, 0.12, 3) * np.exp(1j * prng.uniform(0.0, 2 * math.pi, 3))
        if label == 0:
            return None
        # Spherical-ish lesion cut at level z; it reaches every level, at least 0.6 of its radius.
        span = 0.0 if self.slices_per_patient == 1 else max(abs(-0.3 - z_c), abs(0.3 - z_c))
        r = r_max * math.sqrt(max(0.0, 1.0 - (abs(z - z_c) / (1.25 * span + 1e-6)) ** 2))
        r = max(r, 0.6 * r_max)
        return where * math.cos(ang), where * math.sin(ang), 2.3 * r, r, lobes

    @staticmethod
    def _draw(lesion, img, x, y, texture, px, label):
        """Tissue window with the lesion drawn in, and its uint8 mask."""
        cx, cy, _, r, lobes = lesion
        dx, dy = x - cx, y - cy
        d = np.sqrt(dx * dx + dy * dy)
        if label == 1:  # round, homogeneous, sharp margin
            a = _ramp(r - d, px)
            out = img * (1.0 - a) + a * (0.9 + 0.02 * texture)
        elif label == 2:  # ring: bright rim, dark necrotic core, dark oedema halo
            a = _ramp(r - d, px)
            rim = a * _ramp(d - 0.55 * r, px)
            halo = _ramp(1.7 * r - d, 0.5 * r) * (1.0 - a)
            out = img * (1.0 - a - 0.25 * halo) + rim * 0.95 + (a - rim) * 0.2
        else:  # diffuse: lobulated, soft infiltrating margin, mottled inside (stays within 2.2 r)
            wobble = np.clip(_harmonics(dx, dy, d, lobes, first=2), -0.4, 0.4)
            edge = 1.2 * r * (1.0 + wobble) * (1.0 + 0.15 * np.clip(texture, -2.0, 2.0))
            a = _ramp(edge - d, 4 * px)
            out = img * (1.0 - a) + a * (0.3 + 0.1 * texture)
        return out, (a > 0.5).astype(np.uint8)


class DemoSplit:
    """One split of a `DemoSlices`: the slices of that split's patients, in patient order."""

    def __init__(self, parent: DemoSlices, name: str):
        self.parent, self.name = parent, name
        self.patients = np.flatnonzero(parent.patient_splits == SPLITS.index(name))
        self.num_classes, self.class_names = parent.num_classes, parent.class_names

    def __len__(self) -> int:
        return len(self.patients) * self.parent.slices_per_patient

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for the {len(self)} {self.name} slices.")
        p, level = divmod(index % len(self), self.parent.slices_per_patient)
        return self.parent[int(self.patients[p]) * self.parent.slices_per_patient + level]
