"""Importing photos: every format and mode, EXIF orientations 1-8, and hostile files reported by name."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.data import images as images_mod
from studio.data.dataset import PrepOptions, load_dataset, prep_folder, prepare_photos
from studio.data.images import open_photo
from studio.errors import StudioError
from tests.test_data import one_sentence

ORIENTATION = 0x0112
RED, GREEN, BLUE, WHITE = (230, 20, 20), (20, 200, 40), (20, 40, 220), (250, 250, 250)


def upright() -> np.ndarray:
    """A 96x64 (w x h) picture whose four quadrants differ, so every flip and turn shows."""
    a = np.zeros((64, 96, 3), np.uint8)
    a[:32, :48], a[:32, 48:], a[32:, :48], a[32:, 48:] = RED, GREEN, BLUE, WHITE
    return a


# What a camera stores for each EXIF orientation, from the tag's definition (EXIF 2.32, tag 274: where
# row 0 and column 0 of the stored pixels lie in the upright picture), written out independently of Pillow.
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],            # mirrored left-right
    3: lambda a: a[::-1, ::-1],         # turned 180°
    4: lambda a: a[::-1, :],            # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # row 0 is the upright's left column
    6: lambda a: np.rot90(a, 1),        # the camera was turned clockwise: stored turned counter-clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}


def quadrant_colours(im: Image.Image) -> list[tuple[int, ...]]:
    a = np.asarray(im.convert("RGB"), dtype=np.float64)
    h, w = a.shape[0] // 2, a.shape[1] // 2
    return [tuple(int(round(v)) for v in q.reshape(-1, 3).mean(axis=0))
            for q in (a[4:h - 4, 4:w - 4], a[4:h - 4, w + 4:-4], a[h + 4:-4, 4:w - 4], a[h + 4:-4, w + 4:-4])]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_opens_upright(tmp_path, orientation):
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright())))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    stored.save(path, quality=95, exif=exif)

    opened = open_photo(path, min_side=16)

    assert opened.size == (96, 64)
    for got, want in zip(quadrant_colours(opened), (RED, GREEN, BLUE, WHITE)):
        assert max(abs(g - w) for g, w in zip(got, want)) < 12, (orientation, quadrant_colours(opened))


# ----------------------------------------------------------------------------- formats and modes

@pytest.fixture(scope="module")
def bear(dreambench_photos) -> Image.Image:
    return dreambench_photos("bear_plushie", 128)[0]


@pytest.mark.parametrize("suffix, kwargs", [(".jpg", {"quality": 95}), (".png", {}), (".webp", {"quality": 95}),
                                            (".bmp", {}), (".tif", {}), (".tiff", {"compression": "tiff_lzw"})])
def test_common_formats_decode_to_the_same_picture(tmp_path, bear, suffix, kwargs):
    path = tmp_path / f"bear{suffix}"
    bear.save(path, **kwargs)
    opened = open_photo(path)
    assert opened.mode == "RGB" and opened.size == bear.size
    assert np.abs(np.asarray(opened, np.int16) - np.asarray(bear, np.int16)).mean() < 3


def test_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (80, 80), RED), Image.new("RGB", (80, 80), BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    opened = open_photo(path)
    assert np.abs(np.asarray(opened, np.int16) - np.array(RED)).max() < 10


def test_rgba_is_composited_on_the_chosen_background(tmp_path):
    rgba = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    rgba.paste((10, 200, 10, 255), (20, 20, 60, 60))
    path = tmp_path / "cutout.png"
    rgba.save(path)
    on_grey = open_photo(path, background="#808080")
    assert on_grey.getpixel((2, 2)) == (128, 128, 128) and on_grey.getpixel((40, 40)) == (10, 200, 10)
    assert open_photo(path).getpixel((2, 2)) == (255, 255, 255)  # white unless chosen otherwise
    half = Image.new("LA", (80, 80), (0, 128))  # black at half opacity over white -> mid grey
    half.save(tmp_path / "la.png")
    assert abs(open_photo(tmp_path / "la.png").getpixel((5, 5))[0] - 127) <= 2


def test_palette_grayscale_and_cmyk(tmp_path, bear):
    bear.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(tmp_path / "p.png")
    bear.convert("L").save(tmp_path / "l.png")
    bear.convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    bear.convert("CMYK").save(tmp_path / "c.tif")
    transparent = Image.new("P", (80, 80), 0)
    transparent.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    transparent.paste(1, (40, 0, 80, 80))
    transparent.save(tmp_path / "tp.png", transparency=0)
    for name in ("p.png", "c.jpg", "c.tif"):
        opened = open_photo(tmp_path / name)
        assert opened.mode == "RGB" and np.abs(np.asarray(opened, np.int16) - np.asarray(bear, np.int16)).mean() < 12, name
    grey = np.asarray(open_photo(tmp_path / "l.png"))
    assert (grey[..., 0] == grey[..., 1]).all() and grey.std() > 10
    tp = open_photo(tmp_path / "tp.png", background=(0, 255, 0))
    assert tp.getpixel((10, 10)) == (0, 255, 0) and tp.getpixel((60, 10)) == (0, 0, 255)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256 * 80).reshape(80, 256) % 256 * 257).astype(np.uint16)  # full 16-bit range
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")
    opened = np.asarray(open_photo(tmp_path / "deep.png"))[..., 0]
    assert opened[0, 0] == 0 and opened[0, 255] == 255 and opened[0, 128] == 128  # Pillow's convert gives 255


def test_heic_opens_with_the_plugin(tmp_path, bear):
    pillow_heif = pytest.importorskip("pillow_heif")
    path = tmp_path / "phone.heic"
    pillow_heif.from_pillow(bear).save(path, quality=95)
    opened = open_photo(path)
    assert opened.size == bear.size and np.abs(np.asarray(opened, np.int16) - np.asarray(bear, np.int16)).mean() < 8


def test_heic_without_the_plugin_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(images_mod._heif_state, "ok", False)
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    with pytest.raises(StudioError) as err:
        open_photo(path)
    one_sentence(str(err.value), "'IMG_0001.HEIC'")
    assert "pillow-heif" in str(err.value)


# ----------------------------------------------------------------------------- hostile files

def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds no pixels: a decompression bomb's first bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


HOSTILE = {  # name -> (bytes maker, words the one sentence must contain)
    "bomb.png": (lambda good: png_header(20000, 20000), "megapixel"),
    "scan.png": (lambda good: png_header(12000, 9000), "megapixel"),  # over our limit, under Pillow's
    "cut.jpg": (lambda good: good[: len(good) // 2], "truncated"),
    "empty.jpg": (lambda good: b"", "empty"),
    "notes.png": (lambda good: b"shopping list: milk, eggs\n", "not an image"),
    "dot.png": (None, "1×1"),
}


@pytest.fixture
def hostile_folder(tmp_path, photos_dir) -> Path:
    src = tmp_path / "hostile"
    src.mkdir()
    for name in ("00.jpg", "01.jpg", "02.jpg"):
        shutil.copy(photos_dir / name, src / f"good_{name}")
    good = (photos_dir / "03.jpg").read_bytes()
    for name, (make, _) in HOSTILE.items():
        if make is None:
            Image.new("RGB", (1, 1), RED).save(src / name)
        else:
            (src / name).write_bytes(make(good))
    return src


def test_hostile_files_are_reported_by_name_and_nothing_else_is_lost(tmp_path, hostile_folder):
    spec, problems = prep_folder(hostile_folder, tmp_path / "ds", "sks", "stuffed animal", 64)

    assert sorted(i.source for i in spec.items) == ["good_00.jpg", "good_01.jpg", "good_02.jpg"]
    assert len(load_dataset(tmp_path / "ds").items) == 3
    assert len(problems) == len(HOSTILE)
    for name, (_, words) in HOSTILE.items():
        message = next(p for p in problems if f"'{name}'" in p)
        one_sentence(message, f"'{name}'")
        assert words in message, message
    # the originals are kept byte for byte, under names of the studio's own
    originals = sorted((tmp_path / "ds" / "originals").iterdir())
    assert [p.name for p in originals] == ["0001.jpg", "0002.jpg", "0003.jpg"]
    assert originals[0].read_bytes() == (hostile_folder / "good_00.jpg").read_bytes()


def test_a_bomb_header_is_refused_without_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(20000, 20000))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("the bomb's pixels were decoded"))
    with pytest.raises(StudioError, match="megapixel limit"):
        open_photo(path)


def test_upload_names_never_reach_the_filesystem(tmp_path, photos_dir):
    upload = tmp_path / "gradio-tmp-1.bin"
    shutil.copy(photos_dir / "00.jpg", upload)
    from studio.data.dataset import save_dataset
    from studio.paths import DatasetPaths

    prepared, _ = prepare_photos([(upload, "../../evil name?.JPG")], 64, PrepOptions(crop="center"))
    spec = save_dataset(DatasetPaths(tmp_path / "ds"), prepared, ["x"], "sks", "toy", 64)
    files = sorted(p.relative_to(tmp_path / "ds").as_posix() for p in (tmp_path / "ds").rglob("*") if p.is_file())
    assert files == ["dataset.yaml", "images/0001.png", "images/0001.txt", "images/metadata.jsonl", "originals/0001.jpg"]
    assert spec.items[0].source == "../../evil name?.JPG"  # kept only as text, for the user to recognise
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "gradio-tmp-1.bin"]
