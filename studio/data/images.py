"""Opening user photos safely and turning them into square training images."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from studio.errors import StudioError

# Pillow's default bomb limit is ~179 Mpx; a concept photo never needs more than 100 Mpx.
MAX_PIXELS = 100_000_000
MIN_SIDE = 64


def open_photo(path: Path, display_name: str | None = None, min_side: int = MIN_SIDE) -> Image.Image:
    """Decode, apply EXIF orientation, convert to RGB; one sentence on failure naming the file."""
    name = display_name or Path(path).name
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise StudioError(f"'{name}' is {im.width}×{im.height} pixels, larger than the "
                                  f"{MAX_PIXELS // 1_000_000} megapixel limit; downscale it first.")
            im.load()
            oriented = ImageOps.exif_transpose(im)
    except StudioError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise StudioError(f"'{name}' is not an image file the studio can read; use JPEG, PNG or WebP.") from None
    except (OSError, SyntaxError, ValueError):
        raise StudioError(f"'{name}' is damaged or truncated and cannot be decoded; export it again.") from None
    if min(oriented.size) < min_side:
        raise StudioError(f"'{name}' is only {oriented.width}×{oriented.height} pixels; "
                          f"use photos at least {min_side} pixels on each side.")
    return _to_rgb(oriented)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def center_crop_resize(im: Image.Image, resolution: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The largest centred square, resized to resolution × resolution; returns the crop box too."""
    box = center_crop_box(*im.size)
    return im.crop(box).resize((resolution, resolution), Image.Resampling.LANCZOS), box
