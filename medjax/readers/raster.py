"""PNG and JPEG images (exported X-rays, slices) -> :class:`ImageData` without losing range.

Exported radiographs are often 16-bit PNGs, and Pillow conversions have clipped those at
32767 or silently reduced 16-bit colour PNGs to 8 bits. This reader takes the stored
values through paths that keep every bit, refuses the one case Pillow cannot read
exactly, and keeps colour only when the channels actually differ.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

from medjax.readers.image_data import ImageData, ImageReadError, reason

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: str) -> ImageData:
    """Read an 8/16-bit grayscale or colour PNG, or a JPEG, as float32 stored values.

    Grayscale gives (rows, cols); colour gives (rows, cols, 3) unless the three channels
    are equal, in which case it is grayscale saved as RGB and becomes (rows, cols).
    Alpha is dropped. JPEG EXIF orientation is applied so the array is as displayed.
    PNG/JPEG carry no trustworthy pixel size (the dpi field describes printing), so the
    spacing is 1.0 and ``meta['spacing_source']`` says it was assumed.
    """
    path = os.fspath(path)
    warnings = []
    bit_depth = _png_bit_depth(path)
    try:
        with Image.open(path) as img:
            img.load()
            fmt = (img.format or "").lower()
            if bit_depth == 16 and img.mode in ("RGB", "RGBA"):
                raise ImageReadError(
                    f"{path}: is a 16-bit colour PNG, which Pillow reads only at 8 bits per channel; "
                    "save it as 16-bit grayscale (or 8-bit colour) instead."
                )
            img = ImageOps.exif_transpose(img)
            array, alpha = _to_array(img)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file; check the path in the manifest.") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError for damaged files
        raise ImageReadError(f"{path}: is not a readable PNG/JPEG image ({reason(exc)}); re-export it.") from None
    if alpha is not None and alpha.min() < alpha.max():
        warnings.append("the alpha channel varies and was dropped")
    if array.ndim == 3 and all(np.array_equal(array[..., 0], array[..., c]) for c in (1, 2)):
        array = array[..., 0]
    meta = {
        "source": path,
        "format": fmt or os.path.splitext(path)[1].lstrip(".").lower(),
        "modality": None,
        "series_uid": None,
        "series_description": "",
        "photometric": "RGB" if array.ndim == 3 else "MONOCHROME2",
        "rescale": {"slope": 1.0, "intercept": 0.0},
        "bit_depth": bit_depth or 8,
        "spacing_source": "assumed",
        "warnings": warnings,
    }
    return ImageData(np.ascontiguousarray(array, dtype=np.float32), (1.0, 1.0), None, meta)


def _png_bit_depth(path: str) -> int | None:
    """Bits per sample from a PNG's IHDR chunk (None if not a PNG), read before Pillow converts anything."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE):
        return None
    return head[24]


def _to_array(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored values as a numpy array (no rescaling) and the alpha channel if there is one."""
    mode = img.mode
    if mode in ("P", "PA"):  # palette: the indices mean nothing, the colours do
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
        mode = "RGB"
    array = np.array(img)  # 'I;16' -> uint16, 'I' -> int32, 'L' -> uint8, '1' -> bool: no clipping
    if mode in ("LA", "La"):
        return array[..., 0], array[..., 1]
    if mode in ("RGBA", "RGBa"):
        return array[..., :3], array[..., 3]
    return array, None
