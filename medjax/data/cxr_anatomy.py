"""The chest of one synthetic patient as a PA radiograph sees it: per-patient anatomy in millimetres and
its projection onto a pixel grid.

The model works in projected thicknesses. Every structure adds (or, for air, removes) millimetres of
water-equivalent material along the X-ray path; the detector sees ``exp(-mu * water_mm)``:

- soft tissue: the trunk (an elliptic cross-section, ``body_depth`` mm deep in the middle), the neck and
  shoulders above the thorax, the abdomen below the diaphragm, breast shadows over the lower zones of
  some patients;
- lungs: air fields that remove tissue (``lung_depth`` mm of air where the lung is thickest), thinning
  towards their borders: the lateral rib-cage margin, the mediastinum (with the aortic knob on the left),
  the rounded apices and the diaphragm domes (the right dome higher, sharp costophrenic angles);
- heart: an ellipsoid of soft tissue on the left dome, about a third of it right of the midline, that
  displaces lung; its width over the widest inner thoracic width is the cardiothoracic ratio (CTR);
- bone (water-equivalent times the kVp-dependent ``bone_ratio``): ten posterior rib arcs per side
  (hollow tubes: cortex brighter than marrow), the clavicles, the spine behind the mediastinum;
- air: the trachea down to the carina and the gastric bubble under the left dome;
- lung markings: vessel trees branching from each hilum (tapering tubes) and a faint parenchymal
  texture, kept apart as ``texture`` because findings remove or hide it.

Coordinates: ``x`` mm from the midline towards the image right (the patient's LEFT on a PA film),
``y`` mm down from the lung apices. The right lung lies at x < 0 (image left). ``side`` is -1 for
the right lung and +1 for the left; ``a = side * x`` is the distance from the midline towards that
lung's lateral wall.
"""

from __future__ import annotations

import dataclasses

import numpy as np

RIGHT, LEFT = -1, 1  # sides: the patient's right lung is on the image left of a PA radiograph
LUNG_TISSUE = 0.2  # water-equivalent fraction of aerated lung (parenchyma, blood)


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One patient's chest in millimetres (see the module docstring for the frame)."""

    lung_height: float  # apex to the top of the right dome
    thorax_width: float  # widest inner width of the rib cage (the CTR's denominator)
    asymmetry: float  # right hemithorax share of the width (0.5 = symmetric)
    ctr: float  # cardiothoracic ratio: heart width / thorax_width
    heart_height_ratio: float  # heart vertical semi-axis / horizontal semi-axis
    heart_shift: float  # part of the heart width right of the midline
    left_dome_drop: float  # the left dome sits this much lower than the right
    body_depth: float  # AP thickness of the trunk at the midline
    lung_depth: float  # AP air thickness where the lung is thickest
    mediastinum: float  # half-width of the upper mediastinum
    spine_offset: float  # spine and trachea off the midline: an axially rotated patient
    rib_spacing: float  # vertical distance between posterior rib arcs
    rib_width: float
    breasts: bool
    top_margin: float  # film above the apices
    vessels: tuple  # ((x0, y0, x1, y1, r0, r1), ...) tapering vessel segments in mm

    @property
    def half_widths(self) -> tuple[float, float]:
        """(right, left) inner half-widths of the thorax at its widest."""
        return self.thorax_width * self.asymmetry, self.thorax_width * (1.0 - self.asymmetry)

    @property
    def heart(self) -> tuple[float, float, float, float]:
        """(centre x, centre y, horizontal semi-axis, vertical semi-axis) of the cardiac ellipse."""
        ah = 0.5 * self.ctr * self.thorax_width
        bh = min(ah * self.heart_height_ratio, 0.42 * self.lung_height)
        yc = self.lung_height + self.left_dome_drop - 0.5 * bh  # resting on the left dome
        return ah * (1.0 - 2.0 * self.heart_shift), yc, ah, bh

    def lateral(self, y, side: int):
        """Distance from the midline to the lateral lung (inner rib-cage) margin at height y."""
        half = self.half_widths[0 if side == RIGHT else 1]
        t = np.clip(np.asarray(y, np.float32) / (0.75 * self.lung_height), 0.0, 1.0)
        return half * (0.35 + 0.65 * np.sin(0.5 * np.pi * t) ** 0.7)

    def apex(self, a, side: int):
        """Top of the lung field at distance a from the midline (0 at the apex itself)."""
        half = self.half_widths[0 if side == RIGHT else 1]
        return 150.0 * ((np.asarray(a, np.float32) - 0.35 * half) / half) ** 2

    def dome_top(self, side: int) -> float:
        return self.lung_height + (self.left_dome_drop if side == LEFT else 0.0)

    def dome(self, a, side: int):
        """Diaphragm surface (lung base) at distance a from the midline: highest at 45 % of the width,
        falling 45 mm to the costophrenic angle and 25 mm to the cardiophrenic angle."""
        base = self.half_widths[0 if side == RIGHT else 1]
        a = np.asarray(a, np.float32)
        peak = 0.45 * base
        lateral = np.clip((a - peak) / (base - peak), 0.0, 1.2) ** 2 * 45.0
        medial = np.clip((peak - a) / peak, 0.0, 1.0) ** 2 * 25.0
        return self.dome_top(side) + lateral + medial

    def costophrenic(self, side: int) -> tuple[float, float]:
        """(x, y) of the costophrenic angle of one side."""
        a = self.half_widths[0 if side == RIGHT else 1]
        return side * a, float(self.dome(a, side))

    def medial(self, y, side: int):
        """Mediastinal lung margin (without the heart): the aortic knob bulges the left one."""
        y = np.asarray(y, np.float32)
        m = self.mediastinum + (4.0 if side == LEFT else 0.0) + 0.06 * np.clip(y, 0, None)
        if side == LEFT:
            m = m + 14.0 * np.exp(-(((y - 0.25 * self.lung_height) / 16.0) ** 2))
        return m + side * self.spine_offset

    def hilum(self, side: int) -> tuple[float, float]:
        y = 0.42 * self.lung_height + (8.0 if side == LEFT else 0.0)
        return side * (float(self.medial(y, side)) + 12.0), y


def sample_anatomy(rng: np.random.Generator, *, ctr: float, female: bool) -> Anatomy:
    """A random adult chest with the given cardiothoracic ratio (vessel trees included)."""
    scale = rng.uniform(0.9, 1.05) if female else rng.uniform(0.97, 1.12)
    lung_height = 255.0 * scale * rng.uniform(0.93, 1.07)
    anat = Anatomy(
        lung_height=lung_height, thorax_width=285.0 * scale * rng.uniform(0.93, 1.07),
        asymmetry=rng.uniform(0.49, 0.52), ctr=ctr, heart_height_ratio=rng.uniform(1.15, 1.3),
        heart_shift=rng.uniform(0.3, 0.36), left_dome_drop=rng.uniform(10.0, 25.0),
        body_depth=rng.uniform(190.0, 260.0), lung_depth=rng.uniform(130.0, 170.0),
        mediastinum=rng.uniform(24.0, 32.0), spine_offset=rng.normal(0.0, 4.0),
        rib_spacing=lung_height * rng.uniform(0.095, 0.105), rib_width=rng.uniform(10.0, 13.0),
        breasts=female, top_margin=rng.uniform(0.11, 0.16), vessels=())
    return dataclasses.replace(anat, vessels=_vessel_tree(anat, rng))


def _vessel_tree(anat: Anatomy, rng: np.random.Generator) -> tuple:
    """Vessels fanning out of each hilum: trunks towards the lung borders, each with two side branches."""
    segments = []
    for side in (RIGHT, LEFT):
        hx, hy = anat.hilum(side)
        for angle in np.linspace(-0.45 * np.pi, 0.55 * np.pi, 12) + rng.normal(0.0, 0.08, 12):
            # angle 0 points laterally, negative upwards (towards the apex), positive downwards.
            dx, dy = side * np.cos(angle), np.sin(angle)
            reach = (anat.lateral(hy, side) - abs(hx)) / max(abs(np.cos(angle)), 0.35)
            length = min(reach, 0.9 * anat.lung_height) * rng.uniform(0.55, 0.85)
            r0 = rng.uniform(2.0, 3.0)
            segments.append((hx, hy, hx + dx * length, hy + dy * length, r0, 0.5))
            for at in (0.35, 0.6):
                bx, by = hx + dx * length * at, hy + dy * length * at
                turn = angle + rng.choice((-1.0, 1.0)) * rng.uniform(0.3, 0.6)
                blen = length * (1 - at) * rng.uniform(0.5, 0.8)
                br = r0 * (1 - at) * 0.7
                segments.append((bx, by, bx + side * np.cos(turn) * blen, by + np.sin(turn) * blen, br, 0.4))
    return tuple(tuple(float(v) for v in s) for s in segments)


@dataclasses.dataclass
class Grid:
    """Pixel centres of a square film in the anatomy frame (mm)."""

    size: int
    spacing: float  # mm per pixel
    top: float  # y (mm) of the film's top edge

    def __post_init__(self):
        coords = (np.arange(self.size, dtype=np.float32) + 0.5) * self.spacing
        self.xs = coords - 0.5 * self.size * self.spacing
        self.ys = coords + self.top
        self.x, self.y = np.meshgrid(self.xs, self.ys)

    def window(self, x0, y0, x1, y1):
        """(row slice, col slice, x, y) of the pixels inside a mm bounding box (possibly empty)."""
        c0, c1 = np.searchsorted(self.xs, [x0, x1])
        r0, r1 = np.searchsorted(self.ys, [y0, y1])
        rows, cols = slice(int(r0), int(r1)), slice(int(c0), int(c1))
        return rows, cols, self.x[rows, cols], self.y[rows, cols]


def field_of_view(anat: Anatomy) -> float:
    """Film side (mm): the thorax and its margins, within a 35-43 cm detector."""
    return float(np.clip(max(anat.lung_height * 1.45, anat.thorax_width * 1.3), 350.0, 430.0))


def film_grid(anat: Anatomy, size: int) -> Grid:
    fov = field_of_view(anat)
    return Grid(size, fov / size, -anat.top_margin * fov)


def lung_fields(anat: Anatomy, grid: Grid) -> dict:
    """Per side: the lung field bounded by ribs, mediastinum, apex and dome (bool), the distance to its
    nearest border (mm, along the axes) and the lateral, medial and dome margins at each pixel."""
    out = {}
    x, y = grid.x, grid.y
    for side in (RIGHT, LEFT):
        a = side * x
        lat, med = anat.lateral(y, side), anat.medial(y, side)
        top, base = anat.apex(a, side), anat.dome(a, side)
        dist = np.minimum(np.minimum(a - med, lat - a), np.minimum(y - top, base - y))
        out[side] = dict(field=dist > 0, dist=dist, a=a, lateral=lat, dome=base, top=top)
    return out


def heart_map(anat: Anatomy, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(heart mask, heart thickness in mm): an ellipsoid 110 mm deep at its centre."""
    xc, yc, ah, bh = anat.heart
    r2 = ((grid.x - xc) / ah) ** 2 + ((grid.y - yc) / bh) ** 2
    return r2 < 1.0, 110.0 * np.sqrt(np.clip(1.0 - r2, 0.0, None))


def thorax_mask(anat: Anatomy, grid: Grid) -> np.ndarray:
    """Inside the rib cage from the apices down to the lower dome: the CTR's thoracic width."""
    x, y = grid.x, grid.y
    inside = (x > -anat.lateral(y, RIGHT)) & (x < anat.lateral(y, LEFT))
    return inside & (y > 0) & (y < max(anat.dome_top(RIGHT), anat.dome_top(LEFT)))


def _tube(dist, radius):
    """Chord length through a cylinder of ``radius`` at distance ``dist`` from its axis."""
    return 2.0 * np.sqrt(np.clip(radius ** 2 - dist ** 2, 0.0, None))


def draw_segment(out, grid: Grid, seg) -> None:
    x0, y0, x1, y1, r0, r1 = seg
    pad = max(r0, r1) + grid.spacing
    rows, cols, x, y = grid.window(min(x0, x1) - pad, min(y0, y1) - pad, max(x0, x1) + pad, max(y0, y1) + pad)
    if x.size == 0:
        return
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-6), 0.0, 1.0)
    dist = np.hypot(x - x0 - t * dx, y - y0 - t * dy)
    # Thin vessels keep at least a pixel's width (their contrast is spread, not lost).
    radius = np.maximum(r0 + (r1 - r0) * t, 0.5 * grid.spacing)
    # x2.5: blood-filled vessels seen end-on or overlapping project denser than one tube.
    out[rows, cols] = np.maximum(out[rows, cols], _tube(dist, radius) * 2.5)


def _ribs_and_clavicles(anat: Anatomy, grid: Grid) -> np.ndarray:
    bone = np.zeros_like(grid.x)
    r = 0.5 * anat.rib_width
    for side in (RIGHT, LEFT):
        reach = anat.half_widths[0 if side == RIGHT else 1] + 20.0
        for j in range(10):
            y0 = -6.0 + j * anat.rib_spacing
            xa, xb = sorted((side * 12.0, side * reach))
            rows, cols, x, y = grid.window(xa, y0 - 30.0, xb, y0 + 95.0)
            if x.size == 0:
                continue
            a = side * x - 12.0
            u = np.clip(a / reach, 0.0, None)
            centre = y0 - 24.0 * u + 85.0 * u ** 2.5  # up from the spine, then curving down laterally
            d = (y - centre) * np.cos(np.arctan((-24.0 + 212.5 * u ** 1.5) / reach))
            tube = _tube(d, r) - 0.75 * _tube(d, 0.7 * r)  # cortex brighter than the marrow
            fade = np.clip(a / 10.0, 0.0, 1.0) * np.clip((reach + 10.0 - side * x) / 15.0, 0.0, 1.0)
            bone[rows, cols] += 0.55 * tube * fade
        # Clavicle: from the sternal end near the midline out and up to the shoulder, gently S-shaped.
        cx0, cy0 = 22.0, 2.0 + 0.04 * anat.lung_height
        length = anat.half_widths[0 if side == RIGHT else 1] + 45.0
        xa, xb = sorted((side * cx0, side * (cx0 + length)))
        rows, cols, x, y = grid.window(xa, cy0 - 60.0, xb, cy0 + 25.0)
        if x.size:
            t = np.clip((side * x - cx0) / length, 0.0, 1.0)
            centre = cy0 - 32.0 * t + 6.0 * np.sin(2.0 * np.pi * t)
            inside = (side * x >= cx0) & (side * x <= cx0 + length)
            bone[rows, cols] += np.where(inside, _tube(y - centre, 7.5) - 0.6 * _tube(y - centre, 4.5), 0.0)
    return bone


def _spine(anat: Anatomy, grid: Grid) -> np.ndarray:
    """Vertebral bodies (discs darker every ~26 mm) and pedicle ovals, behind the mediastinum."""
    dx = grid.x - anat.spine_offset
    body = _tube(dx, 22.0) * 0.22
    phase = np.cos(2.0 * np.pi * (grid.y + 8.0) / 26.0)
    body *= 0.8 + 0.2 * np.clip(phase * 3.0, -1.0, 1.0)
    pedicles = np.exp(-((np.abs(dx) - 16.0) / 4.0) ** 2 - ((np.mod(grid.y + 1.0, 26.0) - 13.0) / 6.0) ** 2)
    return body + 4.0 * pedicles


def static_maps(anat: Anatomy, grid: Grid, rng: np.random.Generator) -> dict:
    """The patient's unchanging maps on ``grid``: ``body`` (tissue mm, lungs not removed), ``air`` (lung
    air mm, heart and mediastinum removed), ``bone`` (mm), ``texture`` (lung markings, mm of tissue),
    ``fields`` (see ``lung_fields``), ``heart`` / ``thorax`` masks, ``lungs`` (0 / 1 right / 2 left) and
    ``patches`` (smooth noise shaping patchy opacities)."""
    x, y = grid.x, grid.y
    fields = lung_fields(anat, grid)
    # Trunk: neck above the apices, shoulders, chest wall 35 mm outside the ribs, abdomen below.
    half_r, half_l = anat.half_widths
    chest = 0.5 * (half_r + half_l) + 35.0
    shoulders = chest + 55.0 * np.exp(-(((y - 5.0) / 45.0) ** 2))
    neck = 62.0 + (shoulders - 62.0) * np.clip((y + 55.0) / 40.0, 0.0, 1.0)
    width = np.where(y < -15.0, neck, np.maximum(shoulders, chest))
    body = anat.body_depth * np.sqrt(np.clip(1.0 - (x / width) ** 2, 0.0, None))
    if anat.breasts:
        for side in (RIGHT, LEFT):
            bx, by = side * 0.6 * chest, 0.78 * anat.lung_height
            r2 = ((x - bx) / 75.0) ** 2 + ((y - by) / 60.0) ** 2
            body += 45.0 * np.sqrt(np.clip(1.0 - r2, 0.0, None)) * np.clip((y - by + 60.0) / 60.0, 0.0, 1.0)
    heart, heart_depth = heart_map(anat, grid)
    air = np.zeros_like(x)
    lungs = np.zeros(x.shape, np.uint8)
    for side, label in ((RIGHT, 1), (LEFT, 2)):
        f = fields[side]
        edge = 1.0 - np.clip(f["dist"] / 35.0, 0.0, 1.0)
        depth = anat.lung_depth * (1.0 - edge * edge)  # thinning smoothly towards the borders
        air += np.where(f["field"], depth, 0.0)
        lungs[f["field"] & ~heart] = label
    air = air * (1.0 - 0.85 * np.clip(heart_depth / 40.0, 0.0, 1.0))  # little lung behind the heart
    # Trachea to the carina; gastric bubble under the left dome.
    tx = x - anat.spine_offset
    trachea = _tube(tx, 9.0) * np.clip((0.3 * anat.lung_height - y) / 10.0, 0.0, 1.0) * (y > -90.0)
    gx, gy = 0.45 * half_l, anat.dome_top(LEFT) + 42.0
    bubble = 30.0 * np.sqrt(np.clip(1.0 - ((x - gx) / 30.0) ** 2 - ((y - gy) / 18.0) ** 2, 0.0, None))
    body = body - 0.6 * trachea - bubble
    bone = _ribs_and_clavicles(anat, grid) + _spine(anat, grid)
    texture = np.zeros_like(x)
    for seg in anat.vessels:
        draw_segment(texture, grid, seg)
    parenchyma = rng.standard_normal(x.shape).astype(np.float32)
    texture += 2.5 * _smooth(parenchyma, 1.2 / grid.spacing)
    inside = (lungs > 0) | (air > 0)
    texture = np.where(inside, texture, 0.0).astype(np.float32)
    patches = smooth_noise(rng, x.shape, 10.0 / grid.spacing)  # where airspace opacities are patchy
    return dict(body=body.astype(np.float32), air=air.astype(np.float32), bone=bone.astype(np.float32),
                texture=texture, fields=fields, heart=heart, thorax=thorax_mask(anat, grid), lungs=lungs,
                patches=patches)


def _smooth(noise: np.ndarray, sigma_px: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    out = gaussian_filter(noise, max(sigma_px, 0.5), mode="nearest", truncate=3.0)
    return out / (out.std() + 1e-6)


def smooth_noise(rng: np.random.Generator, shape, sigma_px: float) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed over ``sigma_px`` pixels: patchy opacities."""
    return _smooth(rng.standard_normal(shape).astype(np.float32), sigma_px)
