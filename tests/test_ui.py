"""UI handlers without a browser: start-up stays light, and bad input becomes one sentence."""

from __future__ import annotations

import subprocess
import sys

import gradio as gr
import pytest

from studio.paths import Workspace
from studio.ui import build_app
from studio.ui.context import Studio, friendly
from studio.ui import dataset_tab, train_tab


def test_building_the_app_imports_no_torch_or_diffusers():
    code = ("import sys; from studio.ui import build_app; build_app(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_app_has_the_four_tabs(tmp_path):
    app = build_app(Studio(Workspace(tmp_path), "tiny"))
    labels = [b.label for b in app.blocks.values() if isinstance(b, gr.Tab)]
    assert labels == ["Dataset", "Train", "Playground", "Evaluate"]


def test_friendly_turns_studio_errors_into_one_sentence():
    from studio.errors import StudioError

    @friendly
    def boom():
        raise StudioError("Dataset 'x' has no images; add photos in the Dataset tab.")

    with pytest.raises(gr.Error) as info:
        boom()
    assert info.value.message == "Dataset 'x' has no images; add photos in the Dataset tab."


def test_prepare_with_an_empty_upload():
    with pytest.raises(gr.Error, match="No photos were uploaded"):
        dataset_tab._prepare([], "sks", "dog", "a photo of {token} {class}", 64)


def test_prepare_reports_bad_files_by_name_and_keeps_the_rest(photos_dir, tmp_path):
    bad = tmp_path / "holiday.png"
    bad.write_text("not an image")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(next(photos_dir.glob("*.jpg")).read_bytes()[:600])
    good = sorted(str(p) for p in photos_dir.glob("*.jpg"))
    prepared, gallery, rows, note, *_ = dataset_tab._prepare(good + [str(bad), str(truncated)], "sks", "dog",
                                                             "a photo of {token} {class}", 64, audit_model="off")
    assert len(prepared) == len(good) == len(gallery) == len(rows)
    assert "holiday.png" in note and "cut.jpg" in note and "2 file(s) skipped" in note
    assert rows[0][1] == "a photo of sks dog"
    assert all(item.image.size == (64, 64) for item in prepared)


def test_save_keeps_edited_captions(photos_dir, tmp_path):
    studio = Studio(Workspace(tmp_path), "tiny")
    prepared, _, rows, *_ = dataset_tab._prepare(sorted(str(p) for p in photos_dir.glob("*.jpg")), "sks", "dog",
                                                 "a photo of {token} {class}", 64, audit_model="off")
    rows[0][1] = "a photo of sks dog on a sofa"
    message = dataset_tab._save(studio, prepared, rows, "my dog", "sks", "dog", 64, "a photo of {token} {class}")
    assert "my-dog" in message
    assert (tmp_path / "datasets" / "my-dog" / "images" / "0001.txt").read_text() == "a photo of sks dog on a sofa"
    with pytest.raises(gr.Error, match="needs a caption"):
        rows[1][1] = " "
        dataset_tab._save(studio, prepared, rows, "my dog", "sks", "dog", 64, "a photo of {token} {class}")
    # the failed save lost nothing already saved
    assert (tmp_path / "datasets" / "my-dog" / "images" / "0001.txt").exists()


def test_start_training_without_a_dataset_is_one_sentence(tmp_path):
    studio = Studio(Workspace(tmp_path), "tiny")
    with pytest.raises(gr.Error, match="Choose a dataset first"):
        train_tab._start(studio, {"ds": None}, "ds", None, None, None, {}, "lora")


def test_start_training_with_an_unknown_model_is_one_sentence_and_starts_nothing(dataset_dir, tmp_path):
    studio = Studio(Workspace(tmp_path), "tiny")
    data = {"ds": str(dataset_dir), "preset": "(none)", "model": "no-such-model", "method": "lora", "steps": 5}
    with pytest.raises(Exception, match="is not 'builtin', an existing folder, or a hub id"):
        train_tab._start(studio, data, "ds", "preset", "method", "model", {"steps": "steps"}, "lora")
    assert studio.jobs.current() is None
    assert studio.workspace.list_runs() == []


def test_run_view_redraws_a_run_from_its_events_alone(trained_run, workspace):
    studio = Studio(workspace, "tiny")  # a fresh UI state, as after a restart: only the files remain
    status, figure, gallery = train_tab.run_view(studio, trained_run.name)
    assert "completed" in status and "30" in status
    raw, smoothed = figure.data
    assert len(raw.y) == 30 and all(v > 0 for v in raw.y)
    assert len(smoothed.y) == 30
    assert len(gallery) == 1  # the final sample


def test_small_images_are_enlarged_for_display_with_sharp_pixels():
    from PIL import Image

    from studio.ui.playground_tab import for_display

    small = Image.new("RGB", (64, 64), (10, 200, 30))
    small.putpixel((0, 0), (255, 0, 0))
    shown = for_display(small)
    assert shown.size == (256, 256)
    assert shown.getpixel((3, 3)) == (255, 0, 0) and shown.getpixel((4, 4)) == (10, 200, 30)
    big = Image.new("RGB", (512, 512))
    assert for_display(big) is big


def test_the_train_form_offers_every_method_and_option(tmp_path):
    from studio.config import field_kind

    app = build_app(Studio(Workspace(tmp_path), "tiny"))
    by_id = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert [c[1] for c in by_id["train-method"].choices] == list(field_kind("method")[1])
    assert isinstance(by_id["train-gradient_checkpointing"], gr.Checkbox)
    assert [c[1] for c in by_id["train-optimizer"].choices] == ["adamw", "adamw8bit"]
    for name in train_tab.FORM | train_tab.MORE:
        assert f"train-{name}" in by_id, name


def test_an_empty_number_box_is_one_sentence(dataset_dir, tmp_path):
    studio = Studio(Workspace(tmp_path), "tiny")
    data = {"ds": str(dataset_dir), "preset": "(none)", "model": "tiny", "method": "lora", "steps": None}
    with pytest.raises(gr.Error, match="'Steps' is empty"):
        train_tab._start(studio, data, "ds", "preset", "method", "model", {"steps": "steps"}, "lora")


def test_resume_in_the_page(trained_run, tmp_path):
    import shutil

    studio = Studio(Workspace(tmp_path), "tiny")
    with pytest.raises(gr.Error, match="Choose the run"):
        train_tab._resume(studio, None)
    shutil.copytree(trained_run, tmp_path / "runs" / "done")
    with pytest.raises(gr.Error, match="already finished its 30 steps"):
        train_tab._resume(studio, "done")
    shutil.rmtree(tmp_path / "runs" / "done" / "checkpoints")
    with pytest.raises(gr.Error, match="no complete checkpoint"):
        train_tab._resume(studio, "done")
    assert studio.jobs.current() is None


def test_the_scale_slider_is_hidden_for_kinds_without_a_scale(trained_run, tmp_path):
    import shutil

    from studio.adapters import read_meta, write_meta
    from studio.ui.playground_tab import has_scale

    studio = Studio(Workspace(tmp_path), "tiny")
    shutil.copytree(trained_run, tmp_path / "runs" / "lora")
    shutil.copytree(trained_run, tmp_path / "runs" / "embedding")
    meta = read_meta(tmp_path / "runs" / "embedding" / "adapter")
    meta.kind, meta.has_scale = "embedding", False
    write_meta(tmp_path / "runs" / "embedding" / "adapter", meta)
    assert has_scale(studio, "lora") is True
    assert has_scale(studio, "embedding") is False
    assert has_scale(studio, None) is True and has_scale(studio, "no-such-run") is True
