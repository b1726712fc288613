"""How a slice or volume index reads its manifest rows once: in worker processes, resumably, and from file
headers where no pixels are needed (the build half of ``slices._RowIndex``).

Each row's scan is a small JSON-able dict (the grid its records are cut from, the slices kept, the
intensity transform, files taken as configured, the row's error), so it crosses processes and is
kept, as it finishes, in a journal under ``index_dir`` named by the index's settings: an interrupted
build reads only the rows it had not finished. Records, notes and errors are then taken in row
order, so a build in 8 processes gives the index a build in this process gives.
"""

from __future__ import annotations

import numpy as np

from medjax import console
from medjax.data.build_runner import Progress, RowJournal, file_stamp, run_items
from medjax.data.headers import read_header, resampled_shape
from medjax.data.manifest import ManifestError, ManifestRow
from medjax.readers import ImageReadError, four_d_refusal, read_image

_ROWS_PER_WORKER = 8  # a worker process is started for every 8 rows to read, up to `workers`


class RowBuild:
    """The build of ``slices._RowIndex`` (rows, reader, settings, ``_read``, ``_note``, ``_register``
    come from it)."""

    def _build(self, name: str) -> None:
        """Read every row once (see module), then add the records in row order with `_register(k, row, scan)`.

        Every row is read before anything is raised, so all unreadable rows are named at once."""
        journal = None
        if self.index_dir:  # one process of a multi-host run writes it, all read it
            import jax

            journal = RowJournal(self.index_dir, name, self._settings(), write=jax.process_index() == 0)
        keys = [[row.line, row.path, row.series_uid, row.mask_path, file_stamp(row.path), file_stamp(row.mask_path)]
                for row in self.rows]
        scans = journal.load(keys) if journal else {}
        if scans:
            console.say(f"{name}: {len(scans)} of {len(self.rows)} rows were read by an earlier build "
                        f"({journal.path}); reading the other {len(self.rows) - len(scans)}.")
        todo = [k for k in range(len(self.rows)) if k not in scans]
        progress = Progress(name, "rows", len(self.rows), done=len(scans))
        try:
            for k, scan in run_items(self._scan, todo, workers=self.workers, progress=progress,
                                     min_per_worker=_ROWS_PER_WORKER):
                scans[k] = scan
                if journal and scan["error"] is None and scan["refused"] is None:
                    journal.append(keys[k], scan)
        finally:
            if journal:
                journal.close()
        for k, row in enumerate(self.rows):
            scan = scans[k]
            for kind, detail in scan["notes"]:
                self._note(kind, detail)
            if scan["refused"] is not None:
                raise ManifestError(scan["refused"][0], scan["refused"][1])
            if scan["error"] is not None:
                self.bad_rows.append((row.line, row.path, scan["error"]))
                self.transforms.append(None)
                continue
            self.transforms.append(scan["transform"])
            self._register(k, row, scan)
        if self.bad_rows and not self.skip_bad:
            raise ImageReadError(self.bad_rows[0][2] if len(self.bad_rows) == 1 else
                                 f"{len(self.bad_rows)} rows could not be read:\n"
                                 + "\n".join(f"  {reason}" for _, _, reason in self.bad_rows)
                                 + "\nFix or remove them, or skip them with skip_bad=True (config.data.skip_bad).")
        self.skipped["bad_rows"] = len(self.bad_rows)
        self._row_of, self._slice_of = np.asarray(self._row_of, np.int64), np.asarray(self._slice_of, np.int64)
        self._report(name)

    def _settings(self) -> dict:
        """What a row's scan depends on besides the row: the journal's name (``build_runner.RowJournal``)."""
        return {"index": type(self).__name__, "reader": self.reader, "normalisation": self.normalisation,
                "target_spacing": self.target_spacing, "volume_index": self.volume_index,
                "mask_resample": self.mask_resample, "mask_values": {str(k): v for k, v in self.mask_values.items()}
                if self.mask_values else None, "headers_only": self.headers_only, **self._scan_settings()}

    def _scan_settings(self) -> dict:
        return {}

    def _needs_pixels(self, row: ManifestRow) -> bool:
        """Whether a row's records depend on its pixels (a custom reader has no headers to read)."""
        return not self.headers_only or self.reader is not read_image or bool(row.mask_path)

    def _scan(self, k: int) -> dict:
        """What the build needs of row k, JSON-able (it crosses processes and goes into the journal):
        the grid its records are cut from, the slices kept (None: all), the intensity transform (None:
        not read yet), files taken as configured, and the row's error or refusal."""
        row = self.rows[k]
        outer, self._notes = self._notes, {}  # this row's notes only; the build adds them in row order
        scan = {"shape": None, "keep": None, "transform": None, "notes": [], "error": None, "refused": None}
        try:
            if self._needs_pixels(row):
                image, mask, scan["transform"] = self._read(row)
                self._store(k, (image, mask))  # in this process the first epoch need not read it again
                scan["shape"], scan["keep"] = list(image.shape), self._keep(image)
            else:
                scan["shape"] = list(self._header_grid(row))
        except ImageReadError as err:
            scan["error"] = str(err)
        except ManifestError as err:
            scan["refused"] = [str(err), err.problems]
        finally:
            scan["notes"] = [[kind, detail] for kind, seen in self._notes.items() for detail in seen]
            self._notes = outer
        return scan

    def _header_grid(self, row: ManifestRow) -> tuple[int, ...]:
        """The shape `_read` would give row's image (resampled; a 2D image as rows x cols), from its header."""
        picked = {"volume_index": self.volume_index} if self.volume_index >= 0 else {}
        try:
            header = read_header(row.path, series_uid=row.series_uid, expect_3d=self._expect_3d, **picked)
            if header.is_volume and len(header.shape) == 4:  # every volume kept: none was picked
                raise four_d_refusal(row.path, header.shape)
        except ImageReadError as err:
            where = "" if row.path in str(err) else f"{row.path}: "
            raise ImageReadError(f"line {row.line} (patient {row.patient_id!r}), path: {where}{err}") from err
        if header.num_volumes is not None:
            self._note("volume", f"line {row.line}: {row.path} (volume {self.volume_index} of {header.num_volumes})")
        if not header.is_volume:
            return tuple(header.shape[:2])
        return resampled_shape(header.shape, header.spacing, self.target_spacing)

    def _keep(self, image: np.ndarray) -> list[int] | None:
        """The slices of a decoded image that become records (None: all)."""
        return None

