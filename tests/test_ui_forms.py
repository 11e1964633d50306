"""The Train, Dataset and Evaluate tabs' handlers without a browser: presets fill the form, small datasets
are saved with a warning, and refusals are one sentence (the browser tests click the same controls)."""

from __future__ import annotations

import gradio as gr
import pytest

from studio.config import TrainConfig, list_presets, load_preset
from studio.errors import StudioError
from studio.paths import Workspace
from studio.ui import dataset_tab, evaluate_tab, train_tab
from studio.ui.context import Studio


@pytest.mark.parametrize("name", list_presets())
def test_a_preset_fills_the_form_with_its_own_values(name):
    form, preset, defaults = train_tab.preset_values(name), load_preset(name), TrainConfig()
    assert form["method"] == preset.get("method", defaults.method)
    for key, value in preset.items():
        assert form[key] == value or form[key] == pytest.approx(value), key
    untouched = [k for k in train_tab.FORM | train_tab.MORE if k not in preset]
    assert all(form[k] == getattr(defaults, k) for k in untouched)


def test_no_preset_is_the_defaults_and_the_builtin_model_starts_from_the_demo(tmp_path):
    assert train_tab.preset_values(train_tab.NO_PRESET) == TrainConfig().to_dict()
    assert train_tab.default_preset(Studio(Workspace(tmp_path), "tiny")) == train_tab.NO_PRESET
    builtin = train_tab.default_preset(Studio(Workspace(tmp_path), "builtin"))
    assert builtin == ("demo" if "demo" in list_presets() else train_tab.NO_PRESET)


def test_a_one_image_dataset_is_saved_with_a_warning(photos_dir, tmp_path):
    studio = Studio(Workspace(tmp_path), "builtin")
    one = [str(sorted(photos_dir.glob("*.jpg"))[0])]
    prepared, _, rows, *_ = dataset_tab._prepare(one, "sks", "shape", "a photo of {token} {class}", 64,
                                                 audit_model="off")
    message = dataset_tab._save(studio, prepared, rows, "single", "sks", "shape", 64, "a photo of {token} {class}")
    assert "Saved **1** images" in message and "fewer than the 3–20" in message
    assert (tmp_path / "datasets" / "single" / "images" / "0001.png").exists()
    three = [str(p) for p in sorted(photos_dir.glob("*.jpg"))[:3]]
    prepared, _, rows, *_ = dataset_tab._prepare(three, "sks", "shape", "a photo of {token} {class}", 64,
                                                 audit_model="off")
    assert "Warning" not in dataset_tab._save(studio, prepared, rows, "three", "sks", "shape", 64,
                                              "a photo of {token} {class}")


def test_a_refused_save_is_a_sentence_beside_the_button(tmp_path):
    message = dataset_tab._save_or_say(Studio(Workspace(tmp_path), "tiny"), [], [], "x", "sks", "shape", 64, "")
    assert message.startswith("**Not saved:** There are no prepared photos to save")


def test_prep_given_a_file_says_it_is_a_file(photos_dir, tmp_path):
    from studio.data.dataset import prep_folder

    photo = sorted(photos_dir.glob("*.jpg"))[0]
    with pytest.raises(StudioError, match="is a file, not a folder"):
        prep_folder(photo, tmp_path / "out", "sks", "shape", 64)
    with pytest.raises(StudioError, match="does not exist"):
        prep_folder(tmp_path / "nowhere", tmp_path / "out", "sks", "shape", 64)


def test_evaluate_without_a_run_is_one_sentence_and_starts_nothing(dataset_dir, tmp_path):
    studio = Studio(Workspace(tmp_path), "tiny")
    data = dict(runs=[], dataset=str(dataset_dir), clip="tiny", dino="none", kinds=list(evaluate_tab.KIND_LABELS),
                per_kind=1, scales="1", checkpoints="final", seeds=1, steps=1, guidance=5.0, own="", contexts="")
    with pytest.raises(gr.Error, match="Choose at least one run to evaluate"):
        evaluate_tab._start(studio, "tiny", data)
    assert studio.jobs.current() is None and not (tmp_path / "evals").exists()


def test_the_evaluation_form_of_a_shown_evaluation(tmp_path):
    import yaml

    folder = tmp_path / "evals" / "20260101-000000"
    folder.mkdir(parents=True)
    cfg = dict(dataset=str(tmp_path / "datasets" / "crescent"), runs=[str(tmp_path / "runs" / "r1")],
               kinds=["training", "context"], per_kind=3, scales=[0.5, 1.0], checkpoints="all", seeds=1, steps=7,
               guidance=5.0, prompts=["a {token} {class}"], contexts=["on a red background"])
    from studio.evaluate.protocol import SETTINGS

    (folder / SETTINGS).write_text(yaml.safe_dump(dict(config=cfg)))
    form = evaluate_tab._settings_form(str(folder))
    assert form == dict(runs=["r1"], dataset="crescent", kinds=["training captions", "context pairs"], per_kind=3,
                        scales="0.5, 1", checkpoints="all", seeds=1, steps=7, guidance=5.0, own="a {token} {class}",
                        contexts="on a red background")
    assert evaluate_tab._settings_form(str(tmp_path / "missing")) == {}


def test_a_cancelled_evaluation_leaves_no_half_folder_and_says_so(trained_run, dataset_dir, workspace):
    studio = Studio(workspace, "tiny")
    data = dict(runs=[trained_run.name], dataset=dataset_dir.name, clip="tiny", dino="none",
                kinds=list(evaluate_tab.KIND_LABELS), per_kind=0, scales="0.5, 1", checkpoints="all", seeds=2,
                steps=2, guidance=5.0, own="", contexts="in a forest")
    folder, said = evaluate_tab._start(studio, "tiny", data)
    assert "images (" in said  # the size of the job, before anything loads
    assert evaluate_tab._cancel(studio).startswith("Cancelling")
    status = evaluate_tab._view(studio, folder)[0]  # while it stops: never its image count again
    job = studio.jobs.wait(120)
    assert job.status == "cancelled", job.message
    assert status in ("Cancelling after the current image…",
                      "Evaluation cancelled; the images it had drawn were deleted and nothing was kept."), status
    from pathlib import Path

    assert not Path(folder).exists()
    assert evaluate_tab._view(studio, folder)[0].startswith("Evaluation cancelled; the images it had drawn were deleted")
