"""The Dataset tab's handlers without a browser: crop modes, manual boxes with a preview, captions, warnings."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import yaml
from PIL import Image

from studio.paths import Workspace
from studio.ui import build_app, dataset_tab
from studio.ui.context import Studio, friendly

TEMPLATE = "a photo of {token} {class}"


@pytest.fixture
def uploads(tmp_path, photos_dir):
    """Three photos (one of them twice, under another name) and a kohya caption for one of them."""
    folder = tmp_path / "up"
    folder.mkdir()
    for name in ("00.jpg", "01.jpg", "02.jpg"):
        shutil.copy(photos_dir / name, folder / name)
    shutil.copy(photos_dir / "00.jpg", folder / "copy.jpg")
    (folder / "01.txt").write_text("sks stuffed animal on a wooden floor\n", encoding="utf-8")
    return sorted(str(p) for p in folder.iterdir())


def test_the_tab_offers_every_crop_mode(tmp_path):
    from studio.data.crops import CROP_MODES

    app = build_app(Studio(Workspace(tmp_path), "builtin"))
    by_id = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert [c[1] for c in by_id["dataset-crop"].choices] == list(CROP_MODES)
    assert by_id["dataset-crop"].value == "subject"
    for elem in ("dataset-buckets", "dataset-warnings", "dataset-crop-preview", "dataset-captioner"):
        assert elem in by_id


def test_prepare_keeps_uploaded_captions_and_warns_of_duplicates(uploads):
    prepared, gallery, rows, note, found, warnings, pick = dataset_tab._prepare(
        uploads, "sks", "stuffed animal", TEMPLATE, 64, audit_model="off")
    assert [r[0] for r in rows] == ["00.jpg", "01.jpg", "02.jpg", "copy.jpg"]  # the .txt is a caption, not a photo
    captions = {r[0]: r[1] for r in rows}
    assert captions["01.jpg"] == "sks stuffed animal on a wooden floor"
    assert captions["00.jpg"] == "a photo of sks stuffed animal"
    assert all(r[3] == "64×64" for r in rows) and rows[0][4].startswith("subject: ")
    assert [f.kind for f in found] == ["duplicate"] and set(found[0].names) == {"00.jpg", "copy.jpg"}
    assert warnings["visible"] is True and warnings["choices"][0][1] == found[0].key
    assert pick["choices"] == ["00.jpg", "01.jpg", "02.jpg", "copy.jpg"]

    left, update = dataset_tab._dismiss(found, [found[0].key])  # ticking a warning dismisses it
    assert left == [] and update["visible"] is False


def test_manual_box_previews_exactly_what_is_saved(uploads, tmp_path):
    studio = Studio(Workspace(tmp_path / "ws"), "builtin")
    prepared, _, rows, *_ = dataset_tab._prepare(uploads, "sks", "dog", TEMPLATE, 64, audit_model="off")
    shown, preview, *box = dataset_tab._show_crop(prepared, "02.jpg")
    assert tuple(box) == prepared[2].crop and preview.size == (64, 64)
    assert np.asarray(shown)[box[1], box[0] + 10].tolist() == [255, 40, 40]  # the box is drawn on the original

    moved = dataset_tab._centre_box(prepared, "02.jpg", 0, 0, 128, 128, SimpleNamespace(index=[64, 192]))
    assert moved == (0, 128, 128, 256)
    prepared, gallery, rows, _, preview = dataset_tab._set_box(prepared, "02.jpg", *moved, 64, "subject", False,
                                                               "#ffffff", "#ffffff", "", rows)
    assert prepared[2].mode == "manual" and prepared[2].crop == (0, 128, 128, 256)
    assert rows[2][4] == "manual: 0, 128, 128, 256"
    with Image.open(next(u for u in uploads if u.endswith("02.jpg"))) as original:
        expected = original.convert("RGB").crop((0, 128, 128, 256)).resize((64, 64), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(preview), np.asarray(expected))

    rows[1][2] = 3  # repeats, edited in the table
    dataset_tab._save(studio, prepared, rows, "bear", "sks", "dog", 64, TEMPLATE)
    meta = yaml.safe_load((tmp_path / "ws" / "datasets" / "bear" / "dataset.yaml").read_text(encoding="utf-8"))
    assert meta["items"][2]["crop"] == [0, 128, 128, 256] and meta["items"][2]["mode"] == "manual"
    assert [i["repeats"] for i in meta["items"]] == [1, 3, 1, 1]
    saved = Image.open(tmp_path / "ws" / "datasets" / "bear" / "images" / "0003.png").convert("RGB")
    assert np.array_equal(np.asarray(saved), np.asarray(preview))  # the preview is what trains


def test_a_box_outside_the_image_is_one_sentence(uploads):
    prepared, _, rows, *_ = dataset_tab._prepare(uploads, "sks", "dog", TEMPLATE, 64, audit_model="off")
    with pytest.raises(gr.Error, match="outside its 256×256 image"):
        friendly(dataset_tab._set_box)(prepared, "00.jpg", 300, 300, 400, 400, 64, "subject", False, "#fff", "#fff", "", rows)


def test_apply_prefix_suffix_and_find_replace_to_all_captions(uploads):
    _, _, rows, *_ = dataset_tab._prepare(uploads, "sks", "dog", TEMPLATE, 64, audit_model="off")
    rows, note = dataset_tab._apply_text(rows, "", ", studio light", "a photo of", "a picture of")
    assert rows[0][1] == "a picture of sks dog, studio light"
    assert rows[1][1] == "sks stuffed animal on a wooden floor, studio light"
    assert "replaced in 3 caption(s)" in note


def test_a_captioner_that_cannot_load_is_one_sentence(uploads):
    prepared, _, rows, *_ = dataset_tab._prepare(uploads, "sks", "dog", TEMPLATE, 64, audit_model="off")
    with pytest.raises(gr.Error) as err:
        friendly(dataset_tab._run_captioner)(prepared, rows, "Salesforce/blip-image-captioning-base", "caption", "", "sks", "dog")
    assert "could not be loaded" in err.value.message and "\n" not in err.value.message
