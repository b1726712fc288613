"""Findings of the synthetic chest radiographs, drawn the way they change a film.

Each finding on one image is a ``Lesion`` (its kind, side, size in mm and place); ``apply_lesions``
changes a patient's unchanging maps (``cxr_anatomy.static_maps``) into one image's maps:

- Effusion: fluid layering at a lung base. Above the costophrenic angle it rises ``size`` mm along the
  lateral chest wall and less medially (a meniscus, concave upwards); below that surface the fluid
  replaces lung air, more of it lower down, so the angle is blunted, the dome's outline is lost in the
  same density and the lung markings there are hidden.
- Pneumothorax: air between the chest wall and a lung retracted ``size`` mm from the lateral wall
  (more at the apex). In that gap there is neither parenchyma nor vessels (darker, no markings); the
  retracted lung's edge is a thin bright visceral pleural line.
- Nodule: a round soft-tissue opacity (a sphere of ``size`` < 30 mm diameter) inside a lung field.
- Mass: the same but larger (> 30 mm) and lobulated (three overlapping spheres).
- Consolidation: alveoli filled with fluid within one lobe: a patchy opacity (smoothed noise above a
  threshold) bounded sharply by the horizontal fissure for the right upper lobe, fading elsewhere,
  hiding the vessels in it, with air bronchograms (the bronchi stay dark inside the opacity).
  ``size`` is its density (0..1 of the lobe's air replaced).
- GroundGlass (the covid pattern, not a finding column): a faint haze in the lower, peripheral parts of
  both lungs; a fraction ``size`` of the air is replaced and the vessels stay visible through it.

Cardiomegaly is no lesion: it is the anatomy's cardiothoracic ratio above 0.5.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.ndimage import gaussian_filter

from medjax.data.cxr_anatomy import LEFT, LUNG_TISSUE, RIGHT, Anatomy, Grid, draw_segment

FINDINGS = ("Cardiomegaly", "Effusion", "Pneumothorax", "Nodule", "Mass", "Consolidation")
LOBES = {RIGHT: ("RUL", "RML", "RLL"), LEFT: ("LUL", "LLL")}


@dataclasses.dataclass(frozen=True)
class Lesion:
    kind: str  # a FINDINGS name (not Cardiomegaly) or "GroundGlass"
    side: int  # RIGHT or LEFT
    size: float  # mm (effusion height, pneumothorax gap, nodule/mass diameter) or a 0..1 density
    x: float = 0.0  # centre (mm) of a nodule or mass
    y: float = 0.0
    lobe: str = ""  # a consolidation's lobe

    @property
    def faintness(self) -> float:
        """0 (obvious) .. 1 (barely visible): where a reader would hedge."""
        scale = {"Effusion": (25.0, 15.0), "Pneumothorax": (14.0, 8.0), "Nodule": (12.0, 6.0),
                 "Consolidation": (0.6, 0.25), "GroundGlass": (0.3, 0.15), "Mass": (0.0, 1.0)}[self.kind]
        return float(np.clip((scale[0] - self.size) / scale[1], 0.0, 1.0))


def lobe_mask(anat: Anatomy, fields: dict, side: int, lobe: str, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(lobe region within the lung field, sharp-edge weight) of a lobe as projected on a PA film.

    Right: upper lobe above the horizontal fissure (hilum height), middle lobe below it in the medial
    part, lower lobe below it laterally and at the base. Left: upper lobe (with the lingula) above
    the hilum plus 30 mm, lower lobe below."""
    f = fields[side]
    y, a = grid.y, f["a"]
    fissure = anat.hilum(side)[1] + (30.0 if side == LEFT else 0.0)
    across = (a - anat.medial(y, side)) / np.maximum(f["lateral"] - anat.medial(y, side), 1.0)
    if lobe in ("RUL", "LUL"):
        region = y < fissure
    elif lobe == "RML":
        region = (y >= fissure) & (across < 0.55) & (y < anat.dome_top(side) - 5.0)
    else:
        region = (y >= fissure + 15.0) & ((across >= 0.4) | (y >= anat.dome_top(side) - 5.0))
    sharp = region & (np.abs(y - fissure) < 3.0 * grid.spacing) if lobe == "RUL" else np.zeros_like(region)
    return region & f["field"], sharp


def _effusion(les: Lesion, anat: Anatomy, grid: Grid, m: dict, fields: dict) -> None:
    f = fields[les.side]
    cx, cy = anat.costophrenic(les.side)
    lateral_at_angle = abs(cx)
    medial = float(anat.medial(cy, les.side))
    t = np.clip((f["a"] - medial) / (lateral_at_angle - medial), 0.0, 1.0)
    surface = cy - les.size * (0.45 + 0.55 * t ** 2)  # meniscus: highest at the chest wall
    below = grid.y - surface
    hemithorax = (f["a"] > anat.medial(grid.y, les.side) - 5.0) & (f["a"] < f["lateral"] + 2.0)
    depth = np.where(hemithorax & (below > 0), 150.0 * np.clip(below / 30.0, 0.0, 1.0) ** 0.8, 0.0)
    # Fluid replaces the lung's air; below the dome line it fills the posterior recess (more tissue).
    replaced = np.minimum(depth, m["air"])
    share = replaced / np.maximum(m["air"], 1e-3)
    m["air"] -= replaced
    m["extra"] += np.where(grid.y > f["dome"], 0.4 * depth, 0.0)
    m["keep"] *= 1.0 - share
    m["hidden"] |= share > 0.5  # the visible lung field ends at the fluid


def _pneumothorax(les: Lesion, anat: Anatomy, grid: Grid, m: dict, fields: dict) -> None:
    f = fields[les.side]
    y = grid.y
    gap = les.size * (1.0 + 0.8 * np.clip(1.0 - y / (0.5 * anat.lung_height), 0.0, 1.0))
    # Distance of each lung point to the retracted edge: lateral wall and apex pulled in by ``gap``.
    to_edge = np.minimum(f["lateral"] - f["a"], (y - f["top"]) * 0.8) - gap
    inside_field = f["field"]
    gap_region = inside_field & (to_edge <= 0)
    lung = inside_field & (to_edge > 0)
    m["pkeep"] = np.where(gap_region, 0.0, m["pkeep"])
    m["keep"] = np.where(gap_region, 0.0, np.where(lung, m["keep"] * 1.3, m["keep"]))
    sigma = max(0.6, 0.5 * grid.spacing)
    m["extra"] += np.where(inside_field, 3.0 * np.exp(-((to_edge - sigma) / sigma) ** 2), 0.0)
    m["hidden"] |= gap_region
    m["gap"] |= gap_region


def _spheres(les: Lesion, grid: Grid, m: dict, rng: np.random.Generator) -> None:
    parts = [(les.x, les.y, 0.5 * les.size)]
    if les.kind == "Mass":  # lobulated: two smaller lobes on the rim
        r = 0.5 * les.size
        for angle in rng.uniform(0, 2 * np.pi, 2):
            parts.append((les.x + 0.55 * r * np.cos(angle), les.y + 0.55 * r * np.sin(angle), 0.6 * r))
    for x0, y0, r in parts:
        rows, cols, x, y = grid.window(x0 - r - 2, y0 - r - 2, x0 + r + 2, y0 + r + 2)
        if x.size == 0:
            continue
        chord = 2.0 * np.sqrt(np.clip(r * r - (x - x0) ** 2 - (y - y0) ** 2, 0.0, None))
        m["extra"][rows, cols] = np.maximum(m["extra"][rows, cols], (1.0 - LUNG_TISSUE) * chord)


def _airspace(les: Lesion, anat: Anatomy, grid: Grid, m: dict, fields: dict, patches: np.ndarray) -> None:
    if les.kind == "GroundGlass":  # lower zones, periphery, both lungs: called once per side
        f = fields[les.side]
        periphery = np.clip(1.0 - (f["lateral"] - f["a"]) / 60.0, 0.0, 1.0)
        lower = np.clip((grid.y - 0.45 * anat.lung_height) / 50.0, 0.0, 1.0)
        amount = les.size * periphery * lower * np.clip(0.6 + 0.5 * patches, 0.0, 1.0)
        m["air"] -= np.where(f["field"], amount * m["air"], 0.0)
        return
    region, sharp = lobe_mask(anat, fields, les.side, les.lobe, grid)
    soft = gaussian_filter(region.astype(np.float32), 6.0 / grid.spacing)
    soft = np.where(sharp | ~region, np.minimum(soft, region), soft)  # the fissure stays a sharp edge
    amount = les.size * soft * np.clip(0.55 + 0.6 * patches, 0.0, 1.0)
    bronchi = np.zeros_like(grid.x)
    for seg in anat.vessels[::3]:  # the hilar trunks: their bronchi run beside them
        x0, y0, x1, y1, r0, _ = seg
        draw_segment(bronchi, grid, (x0 + 3.0, y0, x1 + 3.0, y1, 0.6 * r0, 0.8))
    amount = amount * (1.0 - 0.8 * np.clip(bronchi / 2.0, 0.0, 1.0))
    replaced = amount * m["air"]
    m["air"] -= replaced
    m["keep"] *= 1.0 - np.clip(amount * 1.2, 0.0, 1.0)


def apply_lesions(lesions, anat: Anatomy, grid: Grid, maps: dict, *, seed: int) -> dict:
    """One image's maps: ``air`` (lung air mm), ``extra`` (tissue mm added), ``keep`` (markings kept),
    ``pkeep`` (parenchyma kept), ``hidden`` (lung not visible: fluid, pneumothorax gap), ``gap``
    (pneumothorax space); the patient's ``maps`` are not changed."""
    shape = grid.x.shape
    m = dict(air=maps["air"].copy(), extra=np.zeros(shape, np.float32), keep=np.ones(shape, np.float32),
             pkeep=np.ones(shape, np.float32), hidden=np.zeros(shape, bool), gap=np.zeros(shape, bool))
    fields = maps["fields"]
    rng = np.random.default_rng(seed)
    patches = maps["patches"]
    order = {"Consolidation": 0, "GroundGlass": 0, "Nodule": 1, "Mass": 1, "Effusion": 2, "Pneumothorax": 3}
    for les in sorted(lesions, key=lambda les: order[les.kind]):
        if les.kind in ("Consolidation", "GroundGlass"):
            _airspace(les, anat, grid, m, fields, patches)
        elif les.kind in ("Nodule", "Mass"):
            _spheres(les, grid, m, rng)
        elif les.kind == "Effusion":
            _effusion(les, anat, grid, m, fields)
        elif les.kind == "Pneumothorax":
            _pneumothorax(les, anat, grid, m, fields)
        else:
            raise ValueError(f"unknown lesion kind {les.kind!r}")
    return m
