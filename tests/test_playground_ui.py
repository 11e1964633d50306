"""The Playground's form logic without a browser: the prompt follows the chosen run's own words (also when
the Evaluate tab opens a run), unless the person wrote their own; files added are offered by name."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import save_file

from studio.adapters import read_meta, write_meta
from studio.paths import Workspace
from studio.ui import playground_tab
from studio.ui.context import Studio


def studio_with_run(trained_run, tmp_path, class_word="shape") -> Studio:
    shutil.copytree(trained_run, tmp_path / "runs" / "shapes")
    for yaml_file in (tmp_path / "runs" / "shapes").rglob("adapter.yaml"):  # the final adapter and checkpoints
        meta = read_meta(yaml_file.parent)
        meta.class_word = class_word
        write_meta(yaml_file.parent, meta)
    return Studio(Workspace(tmp_path), "tiny")


def test_the_prompt_follows_the_run_unless_the_person_wrote_one(trained_run, tmp_path):
    studio = studio_with_run(trained_run, tmp_path)
    default = playground_tab.DEFAULT_PROMPT
    assert playground_tab.follow(default, default, studio, "shapes") == ("a photo of sks shape", "a photo of sks shape")
    mine = "an oil painting of sks shape on a beach"
    prompt, auto = playground_tab.follow(mine, "a photo of sks shape", studio, "shapes")
    assert isinstance(prompt, dict) and isinstance(auto, dict)  # gr.update(): the person's prompt stays


def test_open_in_playground_uses_the_runs_words_and_scale(trained_run, tmp_path):
    studio = studio_with_run(trained_run, tmp_path)
    default = playground_tab.DEFAULT_PROMPT
    rows, options, prompt, auto, saved = playground_tab.open_run(studio, "shapes@step-000015", 0.75, default, default)
    assert [(r["value"], r["scale"]) for r in rows] == [("shapes@step-000015", 0.75)] and saved == rows
    assert ("shapes@step-000015", "shapes@step-000015") in options
    assert prompt == auto == "a photo of sks shape"


def test_files_are_offered_by_name_and_an_embedding_has_no_slider(trained_run, tmp_path):
    studio = studio_with_run(trained_run, tmp_path)
    files = studio.workspace.adapter_files
    files.mkdir(parents=True)
    save_file({"emb_params": torch.zeros(1, 32)}, str(files / "glowword.safetensors"))
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(files / "style.safetensors"))
    values = [v for _, v in playground_tab.adapter_options(studio)]
    assert values == ["shapes", "file:glowword.safetensors", "file:style.safetensors"]
    assert playground_tab.choice_path(studio, "file:style.safetensors") == files / "style.safetensors"
    assert playground_tab.has_scale(studio, "file:glowword.safetensors") is False
    assert playground_tab.has_scale(studio, "file:style.safetensors") is True
    default = playground_tab.DEFAULT_PROMPT
    assert playground_tab.follow(default, default, studio, "file:glowword.safetensors")[0] == "a photo of glowword"
