"""One way to start a run: the Train tab, the API's train endpoint and the CLI all go through
studio.launch.start, so the memory pre-flight (and ZeroGPU's chunks) apply to every one of them."""

from __future__ import annotations

import dataclasses

import pytest

from studio import events, memory
from studio.__main__ import main
from studio.config import load_run_config
from studio.paths import Workspace
from studio.ui import train_tab
from studio.ui.context import Studio

NOTICE = "The pre-flight switched on gradient checkpointing so the run fits."


@pytest.fixture
def fitted(monkeypatch):
    """A pre-flight that changes a setting and says so, as it does on a GPU that is too small."""
    calls = []

    def preflight(cfg):
        calls.append(cfg.steps)
        return dataclasses.replace(cfg, gradient_checkpointing=True), [NOTICE]

    monkeypatch.setattr(memory, "preflight", preflight)
    return calls


def _ran_fitted(run_dir) -> bool:
    notes = [e.message for e in events.read_events(run_dir / "events.jsonl") if e.kind == "progress"]
    return load_run_config(run_dir / "config.yaml")["gradient_checkpointing"] is True and NOTICE in notes


def test_the_cli_starts_through_the_preflight(fitted, dataset_dir, tiny_model, tmp_path):
    out = tmp_path / "cli"
    assert main(["train", "--model", "tiny", "--dataset", str(dataset_dir), "--steps", "2", "--out", str(out),
                 "--set", "sample_every=0", "--set", "sample_prompts=[]"]) == 0
    assert fitted == [2] and _ran_fitted(out)


def test_the_train_tab_starts_through_the_preflight(fitted, dataset_dir, tiny_model, tmp_path):
    studio = Studio(Workspace(tmp_path), "tiny")
    data = {"ds": str(dataset_dir), "preset": "(none)", "model": "tiny", "method": "lora", "steps": 2,
            "sample_every": 0}
    run_id = train_tab._start(studio, data, "ds", "preset", "method", "model",
                              {"steps": "steps", "sample_every": "sample_every"}, "tab")
    job = studio.jobs.wait(timeout=300)
    assert job is not None and job.status == "completed", job
    assert fitted == [2] and _ran_fitted(studio.workspace.run(run_id).root)


def test_the_api_starts_through_the_preflight(fitted, photos_dir, tiny_model, tmp_path, monkeypatch):
    import gradio as gr

    from studio.ui import api

    registered = {}
    monkeypatch.setattr(gr, "api", lambda fn, **kw: registered.setdefault(kw.get("api_name") or fn.__name__, fn))
    studio = Studio(Workspace(tmp_path), "tiny")
    from studio.data.dataset import prep_folder

    prep_folder(photos_dir, studio.workspace.dataset("api-ds").root, "sks", "stuffed animal", 64)
    api.register(studio)
    run_id = registered["train"]("api-ds", "lora", 2, "tiny")
    job = studio.jobs.wait(timeout=300)
    assert job is not None and job.status == "completed", job
    assert fitted == [2] and _ran_fitted(studio.workspace.run(run_id).root)
