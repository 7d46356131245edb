"""What an image file's header says before any pixel is decoded: its size and its EXIF
orientation.

Decoding checks both first: a file over the pixel limit (a 438 KB PNG can hold
20000 x 20000 pixels, 1.2 GB decoded) is refused without being decoded, and a photo
stored sideways with EXIF orientation 6 is turned upright, as every viewer shows it,
the same way in training, predict and serving. PNG and JPEG headers are read here
(a few hundred bytes, ~10 us a file); other formats through PIL, which reads only
their header too.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass

from engine.config import UserError

# IMAGE_MAX_MEGAPIXELS=N in the environment changes the limit of training, predict and the
# served model alike (0: none).
MAX_PIXELS_ENV = "IMAGE_MAX_MEGAPIXELS"
DEFAULT_MAX_MEGAPIXELS = 100.0
ORIENTATION_TAG = 0x0112
# JPEG start-of-frame markers (they hold the size); C4, C8 and CC are not frames.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class Header:
    """An image's stored size and EXIF orientation (1: upright as stored, 2..8: turn)."""

    width: int
    height: int
    orientation: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height


def exif_orientation(tiff: bytes) -> int:
    """The orientation tag (1..8) of an EXIF block (a TIFF structure); 1 when absent."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    (first_ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if first_ifd + 2 > len(tiff):
        return 1
    (entries,) = struct.unpack_from(order + "H", tiff, first_ifd)
    for entry in range(entries):
        at = first_ifd + 2 + 12 * entry
        if at + 12 > len(tiff):
            break
        tag, kind, _count = struct.unpack_from(order + "HHI", tiff, at)
        if tag == ORIENTATION_TAG and kind == 3:  # SHORT
            (value,) = struct.unpack_from(order + "H", tiff, at + 8)
            return value if 1 <= value <= 8 else 1
    return 1


def _png_header(f, start: bytes) -> Header:
    width, height = struct.unpack(">II", start[16:24])
    orientation = 1
    f.seek(8)
    while True:  # chunks up to the image data: an eXIf chunk comes before it
        head = f.read(8)
        if len(head) < 8:
            break
        length, kind = struct.unpack(">I4s", head)
        if kind == b"eXIf":
            orientation = exif_orientation(f.read(length))
            break
        if kind in (b"IDAT", b"IEND"):
            break
        f.seek(length + 4, 1)
    return Header(width, height, orientation)


def _jpeg_header(f) -> Header | None:
    f.seek(2)
    orientation, size = 1, None
    while size is None:
        marker = f.read(2)
        while len(marker) == 2 and marker[0] == 0xFF and marker[1] == 0xFF:  # fill bytes
            marker = marker[1:] + f.read(1)
        if len(marker) < 2 or marker[0] != 0xFF or marker[1] in (0xD9, 0xDA):
            return None  # the image data or the end, and no frame seen
        (length,) = struct.unpack(">H", f.read(2))
        body = f.read(length - 2)
        if marker[1] == 0xE1 and body.startswith(b"Exif\0\0"):
            orientation = exif_orientation(body[6:])
        elif marker[1] in _SOF and len(body) >= 5:
            height, width = struct.unpack(">HH", body[1:5])
            size = (width, height)
    return Header(size[0], size[1], orientation)


def _pil_header(path: str) -> Header:
    from PIL import Image  # only for formats read less often than PNG and JPEG

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's own bomb warning: the limit is checked here
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(path) as image:
                orientation = image.getexif().get(ORIENTATION_TAG, 1)
                return Header(*image.size, orientation if 1 <= orientation <= 8 else 1)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def read_header(path: str) -> Header | None:
    """The size and orientation an image file declares; None when its header is unreadable
    (the decoder then says why)."""
    try:
        with open(path, "rb") as f:
            start = f.read(32)
            if start.startswith(b"\x89PNG\r\n\x1a\n") and start[12:16] == b"IHDR":
                return _png_header(f, start)
            if start.startswith(b"\xff\xd8"):
                return _jpeg_header(f)
        return _pil_header(path)
    except (OSError, ValueError, struct.error, SyntaxError):
        return None


def max_pixels() -> int:
    """The pixel limit: IMAGE_MAX_MEGAPIXELS (default 100) megapixels; 0 for none."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    try:
        megapixels = float(text) if text else DEFAULT_MAX_MEGAPIXELS
    except ValueError:
        raise UserError(
            f"{MAX_PIXELS_ENV}={text!r} is not a number of megapixels; set it to e.g. 100, "
            "or 0 for no limit"
        ) from None
    return int(max(megapixels, 0) * 1e6)


def too_large(header: Header | None, max_pixels: int) -> str:
    """Why an image is refused before decoding, or "" when it is not."""
    if header is None or max_pixels <= 0 or header.pixels <= max_pixels:
        return ""
    return (
        f"{header.width}x{header.height} pixels ({header.pixels / 1e6:.0f} megapixels) is over "
        f"the limit of {max_pixels / 1e6:g} megapixels ({MAX_PIXELS_ENV}); it was not decoded"
    )
