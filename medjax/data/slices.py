"""Random-access indexes that turn manifest rows into training records: 2D slices or 3D volumes.

Both are plain sources (`len`, `[i]`) for Grain. A record is dict(image=float32,
label=int (-1: unlabeled), patient_id=str, split=str, source=str (the file),
slice_index=int, and mask=uint8 when the row has a mask_path).

Display orientation. Readers return volumes as (X, Y, Z) arrays in RAS+ (indexes
grow toward the patient's Right, Anterior, Superior). Slices are cut in the
radiological display convention, so "axial slice k" looks the same whatever the
file's on-disk orientation:
  axial    array[:, :, k]  seen from the feet: anterior up, patient-right on the image LEFT
  coronal  array[:, k, :]  seen from the front: superior up, patient-right on the image left
  sagittal array[k, :, :]  seen from the patient's left: superior up, anterior on the image left
An integer `axis` cuts the raw array along that axis with no display transform.

Intensity is normalised per VOLUME, never per slice: a slice that is dark in its
volume stays dark, as a radiologist sees it, and all slices of a volume share one
transform (`index.transform(i)`). Masks get the same geometry and no normalisation.

Building an index reads every row once (slice counts, background, mask checks,
unreadable files: all found before training); decoded volumes then live in a
small LRU cache, so shuffled access over many volumes rereads files. The build runs
in `workers` processes, says its progress, and with `index_dir` keeps each finished
row so an interrupted build resumes (``build_runner``). With `headers_only`, rows
whose records need no pixels (no background skipping, no mask) are counted from file
headers (``headers``); their intensity transform is then made when first read.

Files that are not what they seem are taken as configured or refused by name,
never read silently wrong: a 4D file (time points, diffusion directions) gives
the volume `volume_index` picks, or is refused naming its shape; a colour image
is folded to grey with the ITU-R 601 luma; a mask on another grid than its
image is resampled with nearest neighbour when `mask_resample` is set; mask
values are mapped through `mask_values` (e.g. {255: 1}) before they are checked.
Each of these is said once per index, with how many files it concerned.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from medjax import console
from medjax.data.index_build import RowBuild
from medjax.data.intensity import normalise, resample
from medjax.data.label_maps import check_mask_values, fit_mask
from medjax.data.manifest import ManifestError, ManifestRow
from medjax.readers import ImageReadError, four_d_refusal, read_image

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
DEFAULT_NORMALISATION = {"method": "percentile", "low": 0.5, "high": 99.5}
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 weights of R, G, B
# What an index says once about files it took as configured rather than as they came.
_NOTES = {
    "colour": "colour image(s) (channels differ) folded to one grey channel with the ITU-R 601 luma "
              "0.299 R + 0.587 G + 0.114 B",
    "volume": "4D file(s) of which one volume is used (config.data.volume_index)",
    "mask_grid": "mask(s) on another grid than their image, resampled onto it with nearest neighbour "
                 "(config.data.mask_resample=True)",
}


def display_slice(volume: np.ndarray, axis: str | int, k: int) -> np.ndarray:
    """Slice k of an RAS+ (X, Y, Z) volume along `axis`, in radiological display orientation (see module)."""
    if axis == "axial":
        return np.ascontiguousarray(volume[::-1, ::-1, k].T)
    if axis == "coronal":
        return np.ascontiguousarray(volume[::-1, k, ::-1].T)
    if axis == "sagittal":
        return np.ascontiguousarray(volume[k, ::-1, ::-1].T)
    return np.ascontiguousarray(np.take(volume, k, axis=axis))


def is_colour(data) -> bool:
    """Whether ``data`` is a 2D image whose colour channels differ (grey saved as RGB has equal ones)."""
    array = data.array
    if data.affine is not None or array.ndim != 3 or array.shape[-1] not in (3, 4):
        return False
    rgb = array[..., :3]
    return not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))


def _grid(row: ManifestRow, path: str, data, *, mask: bool = False) -> np.ndarray:
    """The array to slice: a volume (X, Y, Z), or a 2D image as one grey channel (rows, cols).

    Grey X-rays are often saved as RGB with three equal channels (taken as they are);
    coloured images get the ITU-R 601 luma weights (the index says so once). A colour
    mask is refused: the luma of label colours is not a label.
    """
    array = np.asarray(data.array, np.float32)
    if data.affine is None and array.ndim == 3 and array.shape[-1] in (3, 4):
        colour = is_colour(data)
        if colour and mask:
            raise ManifestError(f"line {row.line}: mask {path} is a colour image (shape {array.shape}); save masks "
                                "as one-channel label maps (0 = background, 1, 2, ... one value per class).",
                                {"mask_colour": [row.line]})
        array = array[..., :3] @ _LUMA if colour else array[..., 0]
    if array.ndim == 3 and data.affine is None or array.ndim not in (2, 3):
        raise ManifestError(f"line {row.line}: {path} has shape {array.shape}; slices and volumes need a 2D "
                            "image (rows, cols), an RGB image, or a single 3D volume (X, Y, Z).")
    return array


def given_spacing(row: ManifestRow, data, path: str):
    """``data`` with the row's manifest pixel_spacing when its file carries no spacing of its own (PNG/JPEG);
    a file whose own spacing differs by more than 1 % is refused, naming the line and both spacings."""
    if row.pixel_spacing is None:
        return data
    taken = data.with_given_spacing(row.pixel_spacing, "manifest pixel_spacing")
    if taken is None:
        own = ", ".join(f"{s:g}" for s in data.spacing)
        raise ManifestError(f"line {row.line}: pixel_spacing {row.pixel_spacing[0]:g},{row.pixel_spacing[1]:g} mm "
                            f"differs by more than 1 % from the spacing ({own}) mm that {path} carries itself; "
                            "correct the cell or leave it empty (a file's own spacing is used).",
                            {"pixel_spacing_conflict": [row.line]})
    return taken


class _RowIndex(RowBuild):
    """Shared machinery: read rows once (reporting or raising on bad ones), normalise, check masks, cache."""

    _expect_3d: bool | None = None

    def __init__(self, rows: Sequence[ManifestRow], *, reader: Callable | None = None,
                 normalisation: dict | Callable | None = DEFAULT_NORMALISATION, label_columns: Sequence[str] = (),
                 skip_bad: bool = False, cache_volumes: int = 4, target_spacing: Sequence[float] = (),
                 mask_resample: bool = False, mask_values: Mapping | None = None, volume_index: int = -1,
                 workers: int = 0, index_dir: str | None = None, headers_only: bool = False):
        if cache_volumes < 1:
            raise ValueError(f"cache_volumes={cache_volumes} must be at least 1.")
        if isinstance(volume_index, bool) or not isinstance(volume_index, (int, np.integer)) or volume_index < -1:
            raise ValueError(f"volume_index={volume_index!r} must be -1 (refuse 4D files) or the volume to use "
                             "(0 = the first).")
        self.mask_resample, self.mask_values = bool(mask_resample), check_mask_values(mask_values)
        self.volume_index = int(volume_index)
        self._notes: dict[str, dict[str, None]] = {}  # kind -> files it concerned (see _NOTES)
        self._said: set[str] = set()
        self._building = True
        self.rows = tuple(rows)
        for col in label_columns if self.rows else ():
            self.rows[0].label(col)  # a KeyError naming the loaded columns now, rather than mid-epoch
        self.reader = reader if reader is not None else read_image
        self.normalisation, self.label_columns = normalisation, tuple(label_columns)
        self.skip_bad, self.cache_volumes = skip_bad, int(cache_volumes)
        self.target_spacing = tuple(float(t) for t in target_spacing)
        self.workers, self.index_dir, self.headers_only = workers, index_dir or None, bool(headers_only)
        self.bad_rows: list[tuple[int, str, str]] = []  # (CSV line, file, reason)
        self.transforms: list[dict | None] = []  # per row, None for a skipped row
        self.skipped = {"background_slices": 0, "bad_rows": 0}
        self._row_of: list | np.ndarray = []  # entry -> row, and -> slice (-1: the whole volume)
        self._slice_of: list | np.ndarray = []
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    # Worker processes get a copy without the cache and its lock (neither pickles, neither is state).
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = collections.OrderedDict(), None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _normalise(self, array: np.ndarray):
        if self.normalisation is None:
            return array.astype(np.float32, copy=False), {"method": "none"}
        if callable(self.normalisation):
            out, transform = self.normalisation(array)
        else:
            out, transform = normalise(array, self.normalisation)
        return np.asarray(out, np.float32), transform

    def _read(self, row: ManifestRow):
        """(normalised image, uint8 mask or None, transform) of a row; read errors name the line and file."""
        def read(path, what, **kwargs):
            try:
                data = self.reader(path, **kwargs)
                if data.affine is not None and data.array.ndim == 4:  # every volume kept: none was picked
                    raise four_d_refusal(path, data.array.shape)
                return data
            except ImageReadError as err:
                where = "" if path in str(err) else f"{path}: "
                raise ImageReadError(f"line {row.line} (patient {row.patient_id!r}), {what}: {where}{err}") from err

        picked = {"volume_index": self.volume_index} if self.volume_index >= 0 else {}
        data = read(row.path, "path", series_uid=row.series_uid, expect_3d=self._expect_3d, **picked)
        data = given_spacing(row, data, row.path)
        if "num_volumes" in data.meta:
            self._note("volume", f"line {row.line}: {row.path} (volume {data.meta['volume_index']} of "
                                 f"{data.meta['num_volumes']})")
        if is_colour(data):
            self._note("colour", f"line {row.line}: {row.path}")
        mask = None
        if row.mask_path:
            # Checked (or resampled) against the image's own grid, then moved with the image's geometry:
            # mask and image go through one target resampling, the mask with nearest neighbour.
            mdata = given_spacing(row, read(row.mask_path, "mask_path", expect_3d=data.is_volume), row.mask_path)
            labels = self._check_mask(row, data, _grid(row, row.path, data), mdata,
                                      _grid(row, row.mask_path, mdata, mask=True))
            on_grid = dataclasses.replace(data, array=labels.astype(np.float32))
            mask = self._resample(on_grid, 0).array.astype(np.uint8)
        data = self._resample(data, 1)
        image = _grid(row, row.path, data)
        image, transform = self._normalise(image)
        return image, mask, transform

    def _resample(self, data, order: int):
        """``data`` on the target grid (2D images use the first two target spacings); as is without one."""
        if not self.target_spacing:
            return data
        return resample(data, self.target_spacing[: len(data.spacing)], order=order)

    def _check_mask(self, row, data, image, mdata, mask) -> np.ndarray:
        """The mask on its image's voxel grid as integer labels (``fit_mask``), resampling said once."""
        fitted, resampled = fit_mask(row, data, image, mdata, mask, resample=self.mask_resample,
                                     values=self.mask_values)
        if resampled:
            self._note("mask_grid", f"line {row.line}: mask {row.mask_path} {mask.shape} -> image {image.shape}")
        return fitted

    def _note(self, kind: str, detail: str) -> None:
        """A file taken as configured rather than as it came (``_NOTES``): counted while the index is
        built and said after it; met later (a file read for the first time), said at once, once per kind."""
        seen = self._notes.setdefault(kind, {})
        if detail in seen:
            return
        seen[detail] = None
        if not self._building and kind not in self._said:
            self._said.add(kind)
            console.warn(f"{type(self).__name__}: {_NOTES[kind]}: {detail}; further ones are not listed.")

    def _say_notes(self, name: str) -> None:
        """One line per kind of file taken as configured: how many, and the first."""
        self._building = False
        for kind, seen in self._notes.items():
            if kind not in self._said:
                self._said.add(kind)
                console.warn(f"{name}: {len(seen)} {_NOTES[kind]}; the first: {next(iter(seen))}.")

    def _report(self, name: str) -> None:
        """Anything skipped is said out loud, once, when the index is built."""
        self._say_notes(name)
        if self.bad_rows:
            lines = "\n".join(f"  {reason}" for _, _, reason in self.bad_rows[:5])  # reasons name the line
            more = f"\n  ... and {len(self.bad_rows) - 5} more (see .bad_rows)" if len(self.bad_rows) > 5 else ""
            console.say(f"{name}: skipped {len(self.bad_rows)} of {len(self.rows)} rows whose files could not be "
                        f"read (skip_bad=True):\n{lines}{more}")

    def _store(self, k: int, item) -> None:
        with self._lock:
            self._cache[k] = item
            self._cache.move_to_end(k)
            while len(self._cache) > self.cache_volumes:
                self._cache.popitem(last=False)

    def _volume(self, k: int):
        """(normalised image, mask) of row k, from the cache or read again (identically) from disk."""
        with self._lock:
            item = self._cache.get(k)
            if item is not None:
                self._cache.move_to_end(k)
        if item is None:
            image, mask, transform = self._read(self.rows[k])
            if self.transforms[k] is None:  # counted from headers: first read now
                self.transforms[k] = transform
            item = (image, mask)
            self._store(k, item)
        return item

    def _record(self, row: ManifestRow, image, mask, slice_index: int) -> dict:
        rec = dict(image=image, label=row.label(self.label_columns[0]) if self.label_columns else -1,
                   patient_id=row.patient_id, split=row.split, source=row.path, slice_index=int(slice_index))
        for col in self.label_columns[1:]:
            rec[f"label_{col}"] = row.label(col)
        if mask is not None:
            rec["mask"] = mask
        return rec

    def __len__(self) -> int:
        return len(self._row_of)

    def _entry(self, i: int) -> tuple[int, int]:
        """(row, slice) of record i; negative indexes count from the end, as for a list."""
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for {len(self)} records.")
        return int(self._row_of[i]), int(self._slice_of[i])

    def transform(self, i: int) -> dict:
        """The intensity transform of record i's volume (shared by all its slices; read now if the index
        was counted from headers)."""
        k = self._entry(i)[0]
        if self.transforms[k] is None:
            self._volume(k)
        return self.transforms[k]


class SliceIndex(_RowIndex):
    """One record per 2D slice of every volume (one per 2D image), background slices skipped if asked.

    A slice is background when fewer than `background_fraction` of its pixels
    are above the volume's minimum + 1% of its range (after normalisation).
    Only slices of volumes are skipped; a 2D image is always kept.
    """

    def __init__(self, rows: Sequence[ManifestRow], *, reader: Callable | None = None, axis: str | int = "axial",
                 skip_background: bool = True, background_fraction: float = 0.01,
                 normalisation: dict | Callable | None = DEFAULT_NORMALISATION, label_columns: Sequence[str] = (),
                 cache_volumes: int = 4, skip_bad: bool = False, target_spacing: Sequence[float] = (),
                 mask_resample: bool = False, mask_values: Mapping | None = None, volume_index: int = -1,
                 workers: int = 0, index_dir: str | None = None, headers_only: bool = False):
        if not (axis in AXES or (isinstance(axis, int) and -3 <= axis < 3)):
            raise ValueError(f"axis={axis!r} must be one of {', '.join(AXES)} or an array axis 0, 1, 2.")
        if not 0.0 <= background_fraction < 1.0:
            raise ValueError(f"background_fraction={background_fraction} must lie in [0, 1).")
        super().__init__(rows, reader=reader, normalisation=normalisation, label_columns=label_columns,
                         skip_bad=skip_bad, cache_volumes=cache_volumes, target_spacing=target_spacing,
                         mask_resample=mask_resample, mask_values=mask_values, volume_index=volume_index,
                         workers=workers, index_dir=index_dir, headers_only=headers_only)
        self.axis, self.skip_background, self.background_fraction = axis, skip_background, background_fraction
        self._background_volumes = 0
        self._build("SliceIndex")

    def _scan_settings(self) -> dict:
        return {"axis": self.axis, "skip_background": self.skip_background,
                "background_fraction": self.background_fraction}

    def _needs_pixels(self, row) -> bool:
        return self.skip_background or super()._needs_pixels(row)

    def _keep(self, image):
        """With skip_background, the slices of a volume that are not background (see class)."""
        if image.ndim == 2 or not self.skip_background:
            return None
        ax = AXES.get(self.axis, self.axis) % 3
        lo, hi = float(image.min()), float(image.max())
        foreground = image > lo + 0.01 * (hi - lo) if hi > lo else np.zeros(image.shape, bool)
        fraction = foreground.mean(axis=tuple(a for a in range(3) if a != ax))
        return np.flatnonzero(fraction >= self.background_fraction).tolist()

    def _register(self, k, row, scan):
        if len(scan["shape"]) == 2:
            self._row_of.append(k)
            self._slice_of.append(0)
            return
        n = scan["shape"][AXES.get(self.axis, self.axis) % 3]
        keep = range(n) if scan["keep"] is None else scan["keep"]
        if len(keep) < n:
            self.skipped["background_slices"] += n - len(keep)
            self._background_volumes += 1
        self._row_of.extend([k] * len(keep))
        self._slice_of.extend(keep)

    def _report(self, name):
        super()._report(name)
        if self.skipped["background_slices"]:
            console.say(f"{name}: skipped {self.skipped['background_slices']} background slices in "
                        f"{self._background_volumes} volume(s) (fewer than {self.background_fraction:g} of pixels "
                        f"above 1% of the volume's range); {len(self)} slices remain. Pass skip_background=False to "
                        "keep them.")

    def __getitem__(self, i: int) -> dict:
        k, s = self._entry(i)
        image, mask = self._volume(k)
        if image.ndim == 3:
            image = display_slice(image, self.axis, s)
            mask = None if mask is None else display_slice(mask, self.axis, s)
        else:  # a copy: the cached array must survive in-place augmentation
            image, mask = image.copy(), None if mask is None else mask.copy()
        return self._record(self.rows[k], image, mask, s)


class VolumeIndex(_RowIndex):
    """One record per 3D volume (image (X, Y, Z) in RAS+), for 3D models; see `crop` for random crops.

    `slice_index` is -1 in its records. For random crops in a Grain pipeline:
    `MapDataset.source(index).random_map(index.crop)`.
    """

    _expect_3d = True

    def __init__(self, rows: Sequence[ManifestRow], *, reader: Callable | None = None,
                 normalisation: dict | Callable | None = DEFAULT_NORMALISATION, label_columns: Sequence[str] = (),
                 crop_size: Sequence[int] | None = None, cache_volumes: int = 2, skip_bad: bool = False,
                 target_spacing: Sequence[float] = (), mask_resample: bool = False,
                 mask_values: Mapping | None = None, volume_index: int = -1, workers: int = 0,
                 index_dir: str | None = None, headers_only: bool = False):
        if crop_size is not None and (len(crop_size) != 3 or min(crop_size) < 1):
            raise ValueError(f"crop_size={crop_size} must be three positive sizes (X, Y, Z) or None.")
        super().__init__(rows, reader=reader, normalisation=normalisation, label_columns=label_columns,
                         skip_bad=skip_bad, cache_volumes=cache_volumes, target_spacing=target_spacing,
                         mask_resample=mask_resample, mask_values=mask_values, volume_index=volume_index,
                         workers=workers, index_dir=index_dir, headers_only=headers_only)
        self.crop_size = None if crop_size is None else tuple(int(c) for c in crop_size)
        self._build("VolumeIndex")

    def _register(self, k, row, scan):
        if len(scan["shape"]) != 3:
            raise ManifestError(f"line {row.line}: {row.path} is not a 3D volume (shape {tuple(scan['shape'])}); "
                                "VolumeIndex takes volumes only, use SliceIndex for 2D images.")
        self._row_of.append(k)
        self._slice_of.append(-1)

    def __getitem__(self, i: int) -> dict:
        k, _ = self._entry(i)
        image, mask = self._volume(k)  # copies: the cached arrays must survive in-place augmentation
        return self._record(self.rows[k], image.copy(), None if mask is None else mask.copy(), -1)

    def crop(self, record: dict, rng: np.random.Generator | None = None) -> dict:
        """`record` cropped to `crop_size` at a uniformly random position (centred without an rng).

        A volume smaller than the crop is zero-padded at the far end of that axis
        (zero is background after a [0, 1] normalisation and in a mask).
        """
        if self.crop_size is None:
            raise ValueError("crop() needs crop_size=(X, Y, Z) when the VolumeIndex is built.")
        shape = record["image"].shape
        start = [(rng.integers(0, max(s - c, 0) + 1) if rng is not None else max(s - c, 0) // 2)
                 for s, c in zip(shape, self.crop_size)]
        box = tuple(slice(int(a), int(a) + c) for a, c in zip(start, self.crop_size))
        out = dict(record)
        for key in ("image", "mask"):
            if key in record:
                part = record[key][box]
                pad = [(0, c - p) for c, p in zip(self.crop_size, part.shape)]
                out[key] = np.pad(part, pad) if any(p for _, p in pad) else np.ascontiguousarray(part)
        return out
