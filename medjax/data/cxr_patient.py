"""One synthetic chest X-ray patient: anatomy, the course of its findings over 1-3 follow-up films, each
film's exposure and position, the rendered images, masks and labels.

A patient belongs to one ``GROUP`` (its reason to be filmed); the group fixes the finding that every
first film shows, and some patients carry an incidental second finding. Findings evolve between
follow-ups (pneumonia clears or spreads, effusions and ground glass grow or shrink, a drained
pneumothorax closes, nodules and masses grow slowly, the heart stays); the anatomy stays, the
exposure (kVp, dose, processing) and the position (tilt, shift) change.

Labels per film: the truth (1 when the finding shows on that film; Cardiomegaly when the
cardiothoracic ratio exceeds 0.5) and the label a reader would write, where some findings are
``UNCERTAIN`` (-1): a positive with probability 0.03 + 0.3 x its faintness (small effusions and
pneumothoraces, nodules under 12 mm, thin consolidation, a heart just above the limit), a
borderline normal heart (ratio >= 0.46) with probability 0.3; never the group's finding on the first
film, so every group's finding has certain positives.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from medjax.data.cxr_anatomy import LEFT, LUNG_TISSUE, RIGHT, Anatomy, film_grid, sample_anatomy, static_maps
from medjax.data.cxr_findings import FINDINGS, LOBES, Lesion, apply_lesions

GROUPS = ("normal", "pneumonia", "covid", "cardiomegaly", "effusion", "pneumothorax", "nodule", "mass")
DIAGNOSES = ("normal", "pneumonia", "covid")  # the 3-class target; empty for films with other findings only
UNCERTAIN = -1
_DEFINING = {"pneumonia": "Consolidation", "cardiomegaly": "Cardiomegaly", "effusion": "Effusion",
             "pneumothorax": "Pneumothorax", "nodule": "Nodule", "mass": "Mass"}


@dataclasses.dataclass(frozen=True)
class View:
    """Exposure and position of one film."""

    angle: float  # degrees of in-plane tilt
    shift: tuple  # (down, right) mm
    kvp: float  # tube voltage: higher = less bone contrast, flatter image
    photons: float  # mean photons per pixel unattenuated: quantum noise
    gamma: float  # processing curve
    brightness: float
    contrast: float
    grid_amplitude: float  # anti-scatter grid lines (0 = none)
    grid_period: float  # pixels between (aliased) grid lines
    grid_phase: float
    noise_seed: int

    @property
    def mu(self) -> float:
        return 0.02 * (80.0 / self.kvp) ** 0.5  # per mm of water

    @property
    def bone_ratio(self) -> float:
        return float(np.clip(1.6 + (120.0 - self.kvp) / 50.0, 1.5, 2.7))


@dataclasses.dataclass
class Film:
    image: np.ndarray  # float32 in [0, 1], bone and soft tissue bright, air dark
    attenuation: np.ndarray  # measured log attenuation (noisy), before display processing
    lungs: np.ndarray  # uint8: 0 background, 1 right lung (image left), 2 left lung
    heart: np.ndarray | None = None  # bool masks, with ``details``
    thorax: np.ndarray | None = None
    gap: np.ndarray | None = None  # pneumothorax space
    markings: np.ndarray | None = None  # lung markings (mm) as drawn


@dataclasses.dataclass
class Patient:
    seed: int
    index: int
    group: str
    anatomy: Anatomy
    female: bool
    age: int
    views: list  # View per film
    lesions: list  # tuple of Lesion per film
    truth: list  # {finding: 0/1} per film
    labels: list  # {finding: 1/0/-1} per film
    diagnosis: list  # DIAGNOSES value or "" per film
    faint: list  # {finding: faintness} per film (positives)


def _rng(seed: int, index: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, 0xC8, *parts])


def _spot(rng, anat: Anatomy, size: float) -> tuple[int, float, float]:
    """(side, x, y) of a round opacity inside a lung field, clear of the heart."""
    xc, yc, ah, bh = anat.heart
    for _ in range(50):
        side = int(rng.choice((RIGHT, LEFT)))
        y = anat.lung_height * rng.uniform(0.18, 0.72)
        med, lat = float(anat.medial(y, side)), float(anat.lateral(y, side))
        a = med + (lat - med) * rng.uniform(0.3, 0.75)
        x = side * a
        clear = ((x - xc) / (ah + size)) ** 2 + ((y - yc) / (bh + size)) ** 2 > 1.0
        if clear and lat - a > 0.5 * size + 6 and a - med > 0.5 * size + 6 and y - 0.5 * size > 20:
            return side, x, y
    return RIGHT, -0.55 * anat.half_widths[0], 0.35 * anat.lung_height


def _course(rng, kind: str, anat: Anatomy, n: int) -> list:
    """The lesions of one finding on films 0..n-1 (None where it has gone)."""
    def evolve(first, low, high, present, cap):
        rate = rng.uniform(low, high)
        return [first * rate ** k if first * rate ** k >= present else None for k in range(n)], cap

    if kind == "Effusion":
        side = int(rng.choice((RIGHT, LEFT)))
        sizes, cap = evolve(rng.uniform(10.0, 70.0), 0.5, 1.4, 6.0, 90.0)
        return [Lesion(kind, side, min(s, cap)) if s else None for s in sizes]
    if kind == "Pneumothorax":
        side, first = int(rng.choice((RIGHT, LEFT))), rng.uniform(8.0, 45.0)
        rate = rng.uniform(0.0, 0.9)
        return [Lesion(kind, side, first * rate ** k) if first * rate ** k >= 4.0 else None for k in range(n)]
    if kind in ("Nodule", "Mass"):
        first = rng.uniform(7.0, 27.0) if kind == "Nodule" else rng.uniform(34.0, 65.0)
        side, x, y = _spot(rng, anat, first)
        growth = rng.uniform(1.0, 1.08 if kind == "Nodule" else 1.12)
        cap = 29.0 if kind == "Nodule" else 80.0
        return [Lesion(kind, side, min(first * growth ** k, cap), x, y) for k in range(n)]
    if kind == "Consolidation":
        side = int(rng.choice((RIGHT, LEFT)))
        lobe = str(rng.choice(LOBES[side]))
        sizes, _ = evolve(rng.uniform(0.45, 0.9), 0.45, 1.15, 0.3, 0.95)
        return [Lesion(kind, side, min(s, 0.95), lobe=lobe) if s else None for s in sizes]
    raise ValueError(kind)


def _ground_glass(rng, n: int) -> list:
    sizes = [rng.uniform(0.3, 0.55) * rng.uniform(0.5, 1.3) ** k for k in range(n)]
    return [(Lesion("GroundGlass", RIGHT, min(s, 0.6)), Lesion("GroundGlass", LEFT, min(s, 0.6) * 0.9))
            if s >= 0.08 else None for s in sizes]


def _view(rng) -> View:
    grid = rng.random() < 0.6
    return View(angle=float(np.clip(rng.normal(0.0, 1.5), -3.0, 3.0)),
                shift=(float(rng.normal(0.0, 8.0)), float(rng.normal(0.0, 6.0))), kvp=rng.uniform(70.0, 125.0),
                photons=rng.uniform(1500.0, 8000.0), gamma=rng.uniform(0.85, 1.2),
                brightness=rng.uniform(-0.04, 0.04), contrast=rng.uniform(0.92, 1.08),
                grid_amplitude=rng.uniform(0.004, 0.012) if grid else 0.0, grid_period=rng.uniform(2.2, 5.0),
                grid_phase=rng.uniform(0.0, 2 * np.pi), noise_seed=int(rng.integers(2 ** 31)))


def synthesize_patient(seed: int, index: int, group: str) -> Patient:
    """Patient ``index`` of ``seed`` in ``group``: a function of these three only."""
    if group not in GROUPS:
        raise ValueError(f"group={group!r} is not one of {', '.join(GROUPS)}.")
    rng = _rng(seed, index, 1)
    female = bool(rng.random() < 0.5)
    n = 1 + int(rng.choice(3, p=(0.4, 0.35, 0.25)))
    kinds = [_DEFINING[group]] if group in _DEFINING else []
    if group == "pneumonia" and rng.random() < 0.3:
        kinds.append("Effusion")  # parapneumonic
    if group == "cardiomegaly" and rng.random() < 0.4:
        kinds.append("Effusion")  # heart failure
    if group != "normal" and rng.random() < 0.25:  # an incidental second finding
        kinds.append(str(rng.choice([k for k in ("Nodule", "Cardiomegaly", "Effusion") if k not in kinds])))
    ctr = rng.uniform(0.53, 0.66) if "Cardiomegaly" in kinds else rng.uniform(0.36, 0.47)
    anat = sample_anatomy(rng, ctr=ctr, female=female)
    courses = [_course(rng, k, anat, n) for k in kinds if k != "Cardiomegaly"]
    glass = _ground_glass(rng, n) if group == "covid" else [None] * n
    views = [_view(rng) for _ in range(n)]
    lesions, truth, labels, diagnosis, faint = [], [], [], [], []
    label_rng = _rng(seed, index, 2)
    for k in range(n):
        on = tuple(c[k] for c in courses if c[k] is not None) + (glass[k] or ())
        t = {f: int(any(les.kind == f for les in on)) for f in FINDINGS}
        t["Cardiomegaly"] = int(ctr > 0.5)
        fk = {f: min(les.faintness for les in on if les.kind == f) for f in FINDINGS if t[f] and f != "Cardiomegaly"}
        if t["Cardiomegaly"]:
            fk["Cardiomegaly"] = float(np.clip((0.57 - ctr) / 0.05, 0.0, 1.0))
        written = {}
        for f in FINDINGS:
            protected = k == 0 and _DEFINING.get(group) == f
            p = 0.03 + 0.3 * fk[f] if t[f] else (0.3 if f == "Cardiomegaly" and ctr >= 0.46 else 0.0)
            written[f] = UNCERTAIN if label_rng.random() < p and not protected else t[f]
        glass_on = glass[k] is not None
        if glass_on:
            dx = "covid"
        elif t["Consolidation"]:
            dx = "pneumonia"
        else:
            dx = "" if any(t.values()) else "normal"
        lesions.append(on), truth.append(t), labels.append(written), diagnosis.append(dx), faint.append(fk)
    age = int(np.clip(rng.normal(58.0, 16.0), 18, 92))
    return Patient(seed, index, group, anat, female, age, views, lesions, truth, labels, diagnosis, faint)


class _Pose:
    """Where each pixel of the positioned film comes from on the patient's upright grid: a tilt by
    ``view.angle`` about the centre and a shift (mm); bilinear for images, nearest for label maps."""

    def __init__(self, view: View, size: int, spacing: float):
        theta = np.deg2rad(view.angle)
        c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
        centre = np.float32((size - 1) / 2.0)
        r = np.arange(size, dtype=np.float32)[:, None] - centre - np.float32(view.shift[0] / spacing)
        q = np.arange(size, dtype=np.float32)[None, :] - centre - np.float32(view.shift[1] / spacing)
        rows = np.clip(c * r - s * q + centre, 0, size - 1)
        cols = np.clip(s * r + c * q + centre, 0, size - 1)
        r0 = np.minimum(rows.astype(np.int32), size - 2)
        c0 = np.minimum(cols.astype(np.int32), size - 2)
        self.size, self.fr, self.fc = size, rows - r0, cols - c0
        self.corner = (r0 * size + c0).ravel()
        self.nearest = (np.rint(rows).astype(np.int32) * size + np.rint(cols).astype(np.int32)).ravel()

    def image(self, a: np.ndarray) -> np.ndarray:
        flat, i, n = a.ravel(), self.corner, self.size
        shape = a.shape
        top = flat.take(i).reshape(shape) * (1 - self.fc) + flat.take(i + 1).reshape(shape) * self.fc
        bottom = flat.take(i + n).reshape(shape) * (1 - self.fc) + flat.take(i + n + 1).reshape(shape) * self.fc
        return (top * (1 - self.fr) + bottom * self.fr).astype(np.float32)

    def labels(self, a: np.ndarray) -> np.ndarray:
        return a.ravel().take(self.nearest).reshape(a.shape)


def render(patient: Patient, k: int, image_size: int, *, lesions=None, noise: bool = True, details: bool = False,
           maps: dict | None = None) -> Film:
    """Film ``k`` of ``patient`` at ``image_size`` pixels; ``lesions`` overrides the film's findings (e.g.
    none, to see what a finding changed), ``noise=False`` leaves out quantum noise and grid lines."""
    anat, view = patient.anatomy, patient.views[k]
    grid = film_grid(anat, image_size)
    maps = patient_maps(patient, image_size) if maps is None else maps
    lesions = patient.lesions[k] if lesions is None else tuple(lesions)
    m = apply_lesions(lesions, anat, grid, maps, seed=int(_rng(patient.seed, patient.index, 4).integers(2 ** 31)))
    markings = maps["texture"] * m["keep"]
    water = (maps["body"] - m["air"] * (1.0 - LUNG_TISSUE * m["pkeep"]) + markings + m["extra"]
             + view.bone_ratio * maps["bone"])
    pose = _Pose(view, image_size, grid.spacing)
    water = pose.image(water.astype(np.float32))
    counts = view.photons * np.exp(-view.mu * np.clip(water, 0.0, None))
    rng = np.random.default_rng(view.noise_seed)
    if noise:
        counts = counts + np.sqrt(counts) * rng.standard_normal(counts.shape).astype(np.float32)
    attenuation = -np.log(np.clip(counts, 0.5, None) / view.photons).astype(np.float32)
    lo, hi = np.percentile(attenuation, (0.5, 99.8))
    p = np.clip((attenuation - lo) / max(hi - lo, 1e-3), 0.0, 1.0) ** view.gamma
    p = 0.5 + view.brightness + view.contrast * (p - 0.5)
    if noise and view.grid_amplitude:
        cols = np.arange(image_size, dtype=np.float32)
        p = p + view.grid_amplitude * np.cos(2 * np.pi * cols / view.grid_period + view.grid_phase)[None, :]
    lungs = np.where(m["hidden"], 0, maps["lungs"]).astype(np.uint8)
    film = Film(np.clip(p, 0.0, 1.0).astype(np.float32), attenuation, pose.labels(lungs))
    if details:
        film.heart, film.thorax, film.gap = pose.labels(maps["heart"]), pose.labels(maps["thorax"]), pose.labels(m["gap"])
        film.markings = pose.image(markings.astype(np.float32))
    return film


def patient_maps(patient: Patient, image_size: int) -> dict:
    """The patient's unchanging maps at ``image_size`` (computed once, shared by its films)."""
    anat = patient.anatomy
    return static_maps(anat, film_grid(anat, image_size), _rng(patient.seed, patient.index, 3))


def spacing_mm(patient: Patient, image_size: int) -> float:
    return film_grid(patient.anatomy, image_size).spacing

