"""Photos in, dataset folder out: orientation, cropping, captions, bad files, safe overwrites."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from studio.data.captions import render
from studio.data.dataset import (ConceptDataset, Prepared, PrepOptions, load_dataset, prep_folder, prepare_photos,
                                 save_dataset)
from studio.data.images import center_crop_box, center_crop_resize, open_photo
from studio.errors import StudioError
from studio.paths import DatasetPaths

ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the stored pixels upright (EXIF 2.32, tag 274).
UPRIGHT = {6: Image.Transpose.ROTATE_270,  # stored rotated 90° counter-clockwise: turn clockwise
           8: Image.Transpose.ROTATE_90}


def one_sentence(message: str, name: str) -> None:
    assert name in message, f"{message!r} does not name {name!r}"
    assert "\n" not in message and "Traceback" not in message
    assert message.endswith(".")
    # No second sentence: no '. X' / '! X' / '? X' inside (file names like 'a.jpg' have no space).
    assert not re.search(r"[.!?]\s+[A-Z]", message), message


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


@pytest.fixture
def landscape(photos_dir) -> Image.Image:
    """A 256x160 landscape crop of a real photo: asymmetric, so a wrong rotation shows."""
    with Image.open(photos_dir / "00.jpg") as im:
        return im.convert("RGB").crop((0, 40, 256, 200))


def save_with_orientation(image: Image.Image, path: Path, orientation: int) -> Path:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    image.save(path, quality=95, exif=exif)
    return path


# ----------------------------------------------------------------------------- orientation

@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_photo_opens_upright(tmp_path, landscape, orientation):
    path = save_with_orientation(landscape, tmp_path / "phone.jpg", orientation)
    with Image.open(path) as raw:
        assert raw.getexif()[ORIENTATION] == orientation
        stored = raw.convert("RGB")
    assert stored.size == (256, 160)  # stored landscape, as a phone writes it

    opened = open_photo(path)

    assert opened.mode == "RGB"
    assert opened.size == (160, 256)  # shown portrait
    assert np.array_equal(np.asarray(opened), np.asarray(stored.transpose(UPRIGHT[orientation])))
    # Against the original pixels (JPEG loss aside): the right rotation is close, the other is not.
    wrong = UPRIGHT[8 if orientation == 6 else 6]
    assert diff(opened, landscape.transpose(UPRIGHT[orientation])) < 4
    assert diff(opened, landscape.transpose(wrong)) > 20


def test_dataset_import_orients_before_cropping(tmp_path, photos_dir, landscape):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(photos_dir / "01.jpg", src / "01.jpg")
    save_with_orientation(landscape, src / "phone.jpg", 6)

    spec, problems = prep_folder(src, tmp_path / "ds", "sks", "stuffed animal", 64, options=PrepOptions(crop="center"))

    assert problems == []
    item = next(i for i in spec.items if i.source == "phone.jpg")
    assert item.crop == (0, 48, 160, 208)  # centred square of the 160x256 portrait
    saved = Image.open(tmp_path / "ds" / "images" / item.file).convert("RGB")
    expected, _ = center_crop_resize(landscape.transpose(UPRIGHT[6]), 64)
    assert diff(saved, expected) < 4


# ----------------------------------------------------------------------------- cropping

@pytest.mark.parametrize("size, box", [((300, 100), (100, 0, 200, 100)),
                                       ((100, 300), (0, 100, 100, 200)),
                                       ((101, 100), (0, 0, 100, 100)),
                                       ((80, 80), (0, 0, 80, 80))])
def test_center_crop_box(size, box):
    assert center_crop_box(*size) == box


@pytest.mark.parametrize("horizontal", [True, False])
def test_center_crop_keeps_the_middle_and_is_square(horizontal):
    bands = Image.new("RGB", (300, 100) if horizontal else (100, 300))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        box = (i * 100, 0, i * 100 + 100, 100) if horizontal else (0, i * 100, 100, i * 100 + 100)
        bands.paste(colour, box)

    square, box = center_crop_resize(bands, 48)

    assert square.size == (48, 48)
    assert box == ((100, 0, 200, 100) if horizontal else (0, 100, 100, 200))
    assert np.all(np.asarray(square) == (0, 255, 0))  # only the middle band survives


def test_prepared_dataset_is_square_at_resolution_with_captions(dataset_dir):
    paths = DatasetPaths(dataset_dir)
    images = paths.image_files()
    assert [p.name for p in images] == [f"{i:04d}.png" for i in range(1, 6)]
    for image in images:
        with Image.open(image) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
        assert paths.caption(image).read_text(encoding="utf-8") == "a photo of sks stuffed animal"

    meta = yaml.safe_load(paths.meta.read_text(encoding="utf-8"))
    assert (meta["token"], meta["class_word"], meta["resolution"]) == ("sks", "stuffed animal", 64)
    assert [i["source"] for i in meta["items"]] == [f"0{i}.jpg" for i in range(5)]
    assert all(i["crop"] == [0, 0, 256, 256] for i in meta["items"])  # the photos are square

    spec = load_dataset(dataset_dir)
    assert [i.caption for i in spec.items] == ["a photo of sks stuffed animal"] * 5


def test_caption_template_and_edited_captions(tmp_path, photos_dir):
    out = tmp_path / "ds"
    prep_folder(photos_dir, out, "zwx", "toy", 32, template="{token} {class}, studio photo")
    first = DatasetPaths(out).image(1)
    assert first.with_suffix(".txt").read_text(encoding="utf-8") == "zwx toy, studio photo"

    first.with_suffix(".txt").write_text("zwx toy on a shelf\n", encoding="utf-8")
    spec = load_dataset(out)
    assert spec.items[0].caption == "zwx toy on a shelf"  # the .txt on disk wins over dataset.yaml
    assert spec.template == "{token} {class}, studio photo"


def test_render_fills_token_and_class():
    assert render("a photo of {token} {class}", "sks", "stuffed animal") == "a photo of sks stuffed animal"
    assert render("{token}  {class} ", "sks", "") == "sks"


def test_concept_dataset_gives_pixels_in_range(dataset_dir):
    data = ConceptDataset(dataset_dir, 32)
    assert len(data) == 5
    assert tuple(data.pixels.shape) == (5, 3, 32, 32)
    assert data.pixels.min() >= -1.0 and data.pixels.max() <= 1.0
    assert data.pixels.std() > 0.1  # real photo content, not a constant
    assert data.captions == ["a photo of sks stuffed animal"] * 5


# ----------------------------------------------------------------------------- bad files

@pytest.fixture
def mixed_folder(tmp_path, photos_dir) -> Path:
    src = tmp_path / "mixed"
    src.mkdir()
    shutil.copy(photos_dir / "00.jpg", src / "good1.jpg")
    shutil.copy(photos_dir / "01.jpg", src / "good2.jpg")
    (src / "notes.png").write_text("this is not a picture", encoding="utf-8")
    data = (photos_dir / "02.jpg").read_bytes()
    (src / "cut.jpg").write_bytes(data[: len(data) // 2])
    (src / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(src / "dot.png")
    (src / "readme.txt").write_text("not an image suffix: ignored, not reported", encoding="utf-8")
    return src


BAD = ["cut.jpg", "dot.png", "empty.jpg", "notes.png"]


def test_bad_files_are_reported_and_good_ones_kept(tmp_path, mixed_folder):
    spec, problems = prep_folder(mixed_folder, tmp_path / "ds", "sks", "stuffed animal", 64)

    assert [i.source for i in spec.items] == ["good1.jpg", "good2.jpg"]
    assert len(DatasetPaths(tmp_path / "ds").image_files()) == 2
    assert len(problems) == len(BAD)
    for name, message in zip(BAD, problems):  # sorted order of the folder
        one_sentence(message, f"'{name}'")
        assert not any(f"'{other}'" in message for other in BAD if other != name)
    assert "truncated" in problems[0] and "1×1" in problems[1]


def test_prepare_photos_names_the_display_name(tmp_path, mixed_folder):
    upload = tmp_path / "gradio-upload-8f3a.bin"
    shutil.copy(mixed_folder / "notes.png", upload)
    good = tmp_path / "gradio-upload-11aa.bin"
    shutil.copy(mixed_folder / "good1.jpg", good)

    prepared, problems = prepare_photos([(upload, "holiday.png"), (good, "bear.jpg")], 64)

    assert [p.source for p in prepared] == ["bear.jpg"]
    assert prepared[0].image.size == (64, 64)
    assert len(problems) == 1
    one_sentence(problems[0], "'holiday.png'")
    assert "gradio-upload" not in problems[0]


def test_only_bad_files_is_an_error(tmp_path, mixed_folder):
    for good in mixed_folder.glob("good*.jpg"):
        good.unlink()
    with pytest.raises(StudioError, match="no usable images"):
        prep_folder(mixed_folder, tmp_path / "ds", "sks", "stuffed animal", 64)
    assert not (tmp_path / "ds").exists()


def test_empty_or_missing_source_folder_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(StudioError, match="has no image files") as err:
        prep_folder(empty, tmp_path / "ds", "sks", "toy", 64)
    one_sentence(str(err.value), str(empty))
    with pytest.raises(StudioError, match="does not exist"):
        prep_folder(tmp_path / "nowhere", tmp_path / "ds", "sks", "toy", 64)
    assert not (tmp_path / "ds").exists()


def test_dataset_without_images_or_metadata_is_an_error(tmp_path, dataset_dir):
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy)
    for image in DatasetPaths(copy).image_files():
        image.unlink()
    with pytest.raises(StudioError, match="has no images"):
        load_dataset(copy)
    with pytest.raises(StudioError, match="has no images"):
        ConceptDataset(copy, 64)

    DatasetPaths(copy).meta.unlink()
    with pytest.raises(StudioError, match="dataset.yaml"):
        load_dataset(copy)
    with pytest.raises(StudioError, match="does not exist"):
        load_dataset(tmp_path / "missing")


def test_malformed_dataset_yaml_is_an_error(tmp_path, dataset_dir):
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy)
    DatasetPaths(copy).meta.write_text("token: sks\nsurprise: 1\n", encoding="utf-8")
    with pytest.raises(StudioError, match="malformed"):
        load_dataset(copy)


def test_missing_trigger_or_class_word_is_an_error(tmp_path, photos_dir):
    with pytest.raises(StudioError, match="trigger word"):
        prep_folder(photos_dir, tmp_path / "ds", " ", "toy", 64)
    assert not (tmp_path / "ds").exists()


# ----------------------------------------------------------------------------- safe overwrite

@pytest.fixture
def existing(tmp_path, photos_dir) -> Path:
    out = tmp_path / "datasets" / "bear"
    prep_folder(photos_dir, out, "sks", "stuffed animal", 32)
    return out


def test_failed_save_keeps_the_old_dataset(tmp_path, existing, mixed_folder):
    before = digest(existing)
    for good in mixed_folder.glob("good*.jpg"):
        good.unlink()

    with pytest.raises(StudioError):
        prep_folder(mixed_folder, existing, "new", "thing", 64)

    assert digest(existing) == before
    assert len(load_dataset(existing).items) == 5


class _DiskFull:
    """An image whose save fails midway through writing the new dataset."""

    def save(self, *args, **kwargs):
        raise OSError(28, "No space left on device")


def test_save_failing_midway_keeps_the_old_dataset(existing, photos_dir):
    before = digest(existing)
    good = prepare_photos([(photos_dir / "00.jpg", "00.jpg")], 32)[0][0]
    broken = [good, Prepared(_DiskFull(), (0, 0, 1, 1), "bad.jpg")]

    with pytest.raises(StudioError, match="could not be written.*free some disk space"):
        save_dataset(DatasetPaths(existing), broken, ["a", "b"], "new", "thing", 32)

    assert digest(existing) == before
    assert load_dataset(existing).token == "sks"
    assert sorted(p.name for p in existing.parent.iterdir()) == [existing.name]  # no .partial left behind


def test_successful_save_replaces_the_old_dataset(existing, photos_dir, tmp_path):
    src = tmp_path / "two"
    src.mkdir()
    for name in ("03.jpg", "04.jpg"):
        shutil.copy(photos_dir / name, src / name)

    spec, _ = prep_folder(src, existing, "zwx", "bear", 32)

    loaded = load_dataset(existing)
    assert loaded.token == "zwx" and [i.source for i in loaded.items] == ["03.jpg", "04.jpg"]
    assert len(DatasetPaths(existing).image_files()) == 2  # old images 0003-0005 are gone
    assert sorted(p.name for p in existing.parent.iterdir()) == ["bear"]  # no .partial / .old left
