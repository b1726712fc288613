"""PNG/JPEG reader: 16-bit range kept (no clipping at 32767), colour vs grayscale, damage.

PNGs are written here by a minimal encoder (zlib + chunks), not by Pillow, so the round
trip does not depend on the library being tested.
"""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from medjax.readers.raster import read_png
from medjax.readers import ImageReadError, read_image


def _png(path, array, bit_depth):
    """Write ``array`` (rows, cols) or (rows, cols, 3) as a PNG with the given bit depth."""
    color_type = 2 if array.ndim == 3 else 0
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + row.astype(dtype).tobytes() for row in array)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", array.shape[1], array.shape[0], bit_depth, color_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return str(path)


def test_16bit_png_round_trip_without_clipping(tmp_path):
    values = np.array([[65535, 40000, 32767], [32768, 0, 1]], dtype=np.uint16)
    image = read_image(_png(tmp_path / "xray16.png", values, 16))
    assert image.array.dtype == np.float32 and image.affine is None and image.spacing == (1.0, 1.0)
    np.testing.assert_array_equal(image.array, values.astype(np.float32))
    assert image.array.max() == 65535.0 and image.meta["bit_depth"] == 16
    assert image.meta["photometric"] == "MONOCHROME2" and image.meta["spacing_source"] == "assumed"


def test_8bit_png(tmp_path):
    values = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    image = read_png(_png(tmp_path / "gray8.png", values, 8))
    np.testing.assert_array_equal(image.array, values)
    assert image.meta["bit_depth"] == 8


def test_rgb_gray_only_when_channels_equal(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    image = read_png(_png(tmp_path / "gray_as_rgb.png", np.repeat(gray[..., None], 3, -1), 8))
    assert image.array.shape == (3, 4)
    np.testing.assert_array_equal(image.array, gray)
    colour = np.stack([gray, gray + 1, gray + 2], -1)
    image = read_png(_png(tmp_path / "colour.png", colour, 8))
    assert image.array.shape == (3, 4, 3) and image.meta["photometric"] == "RGB"
    np.testing.assert_array_equal(image.array, colour)


def test_16bit_colour_png_refused(tmp_path):
    colour = np.zeros((2, 2, 3), dtype=np.uint16)
    colour[0, 0] = (65535, 40000, 3)
    with pytest.raises(ImageReadError, match=r"rgb16\.png: is a 16-bit colour PNG"):
        read_png(_png(tmp_path / "rgb16.png", colour, 16))


def test_jpeg_grayscale_and_exif_orientation(tmp_path):
    gray = np.tile(np.linspace(0, 255, 8, dtype=np.uint8), (4, 1))  # 4 rows x 8 cols
    Image.fromarray(gray).save(tmp_path / "plain.jpg", quality=95)
    image = read_image(str(tmp_path / "plain.jpg"), expect_3d=False)
    assert image.array.shape == (4, 8) and image.meta["format"] == "jpeg"
    assert np.abs(image.array - gray).max() <= 8  # lossy
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees clockwise
    Image.fromarray(gray).save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    assert read_png(str(tmp_path / "rotated.jpg")).array.shape == (8, 4)


def test_damaged_or_wrong_kind_names_the_file(tmp_path):
    data = open(_png(tmp_path / "ok.png", np.zeros((64, 64), np.uint16) + 500, 16), "rb").read()
    (tmp_path / "cut.png").write_bytes(data[:40])
    with pytest.raises(ImageReadError, match=r"cut\.png: is not a readable PNG/JPEG image"):
        read_image(str(tmp_path / "cut.png"))
    with pytest.raises(ImageReadError, match=r"ok\.png: expected a 3D volume but got a 2D image of shape \(64, 64\)"):
        read_image(str(tmp_path / "ok.png"), expect_3d=True)
