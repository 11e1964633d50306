"""Opening user photos safely: every common format, EXIF orientation first, one sentence per bad file.

Formats: JPEG, PNG, WebP, BMP, TIFF, GIF (first frame), and HEIC/HEIF when the pillow-heif plugin is
installed. Modes: RGBA/LA/transparent palette images are composited on a chosen background colour;
palette, grayscale, CMYK and 16-bit images become 8-bit RGB.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from studio.errors import StudioError

# Pillow's default bomb limit is ~179 Mpx; a concept photo never needs 100 Mpx (a 48-Mpx phone photo is
# the largest common one), and decoding that many pixels takes over 1 GB: refused at the limit.
MAX_PIXELS = 100_000_000
MIN_SIDE = 64
HEIC_SUFFIXES = (".heic", ".heif")
# ISO-BMFF brands of HEIC/HEIF files (bytes 8-12 of the 'ftyp' box), for telling a HEIC apart when
# the plugin is missing and Pillow cannot even identify it.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif"}
WHITE = (255, 255, 255)

_heif_state: dict[str, bool] = {}


def heif_available() -> bool:
    """Register pillow-heif's opener once, if the package is installed."""
    if "ok" not in _heif_state:
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _heif_state["ok"] = True
        except ImportError:
            _heif_state["ok"] = False
    return _heif_state["ok"]


def _looks_like_heif(head: bytes) -> bool:
    return len(head) >= 12 and head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


def parse_colour(value, default: tuple[int, int, int] = WHITE) -> tuple[int, int, int]:
    """'#rrggbb', 'rgb(r, g, b)', 'white' or an (r, g, b) sequence -> (r, g, b)."""
    if value is None or value == "":
        return default
    if isinstance(value, (tuple, list)) and len(value) >= 3:
        return tuple(int(max(0, min(255, round(float(c))))) for c in value[:3])
    from PIL import ImageColor

    text = str(value).strip()
    if text.startswith("rgba(") or text.startswith("rgb("):  # gradio's ColorPicker may give rgba(r, g, b, a)
        parts = text[text.index("(") + 1:text.rindex(")")].split(",")
        return parse_colour([float(p) for p in parts[:3]], default)
    try:
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise StudioError(f"'{text}' is not a colour; give one like '#ffffff' or 'white'.") from None


def open_photo(path: Path, display_name: str | None = None, min_side: int = MIN_SIDE,
               background=WHITE) -> Image.Image:
    """Decode the first frame, apply EXIF orientation, convert to 8-bit RGB; one sentence on failure naming the file."""
    name = display_name or Path(path).name
    path = Path(path)
    try:
        head = path.open("rb").read(32)
    except OSError as exc:
        raise StudioError(f"'{name}' could not be read ({exc.strerror or exc}); check the file and try again.") from None
    if not head:
        raise StudioError(f"'{name}' is empty (0 bytes); copy the photo again.")
    if _looks_like_heif(head) or path.suffix.lower() in HEIC_SUFFIXES:
        if not heif_available():
            raise StudioError(f"'{name}' is a HEIC photo and reading HEIC needs the pillow-heif package; "
                              "`pip install pillow-heif`, or export the photo as JPEG.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below decides
            im = Image.open(path)
        with im:
            if im.width * im.height >= MAX_PIXELS:  # at the limit too: decoding 100 Mpx costs over 1 GB
                raise _bomb(name, f"{im.width}×{im.height} pixels")
            im.seek(0)  # GIF, multi-page TIFF: the first frame
            im.load()
            oriented = ImageOps.exif_transpose(im)  # before anything else looks at the pixels
    except StudioError:
        raise
    except Image.DecompressionBombError:  # Pillow refuses at open beyond twice its own limit
        raise _bomb(name, "more pixels than Pillow will decode") from None
    except UnidentifiedImageError:
        raise StudioError(f"'{name}' is not an image file the studio can read; use JPEG, PNG, WebP, BMP, TIFF or GIF.") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise StudioError(f"'{name}' is damaged or truncated and cannot be decoded; export it again.") from None
    if min(oriented.size) < min_side:
        raise StudioError(f"'{name}' is only {oriented.width}×{oriented.height} pixels; "
                          f"use photos at least {min_side} pixels on each side.")
    return to_rgb(oriented, parse_colour(background))


def _bomb(name: str, what: str) -> StudioError:
    return StudioError(f"'{name}' declares {what}, at or over the {MAX_PIXELS // 1_000_000} megapixel limit "
                       "(a decompression bomb or a huge scan); downscale it below that first.")


def to_rgb(im: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """8-bit RGB; transparency composited on `background`, 16-bit and float scaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = _eight_bit(im)
    if im.mode == "PA" or (im.mode == "P" and "transparency" in im.info) or im.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return im.convert("RGB")


def _eight_bit(im: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit int/float) grayscale image as 8-bit 'L': Pillow's convert would clip at 255."""
    arr = np.asarray(im).astype(np.float64)
    top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
    if im.mode == "F" and arr.max(initial=0) <= 1.0:
        top = 1.0
    return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def center_crop_resize(im: Image.Image, resolution: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The largest centred square, resized to resolution × resolution; returns the crop box too."""
    box = center_crop_box(*im.size)
    return im.crop(box).resize((resolution, resolution), Image.Resampling.LANCZOS), box
