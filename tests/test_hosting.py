"""ZeroGPU hosting: GPU work goes through spaces.GPU calls, and training in chunks (each one call that
pauses with a checkpoint) ends exactly where one uninterrupted run ends. A stand-in `spaces` module
records the calls; no Space is needed."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
from safetensors.torch import load_file

from studio import events, hosting, train
from studio.config import build_config

SETTINGS = dict(model="tiny", method="lora", steps=5, checkpoint_every=0, sample_every=0, learning_rate=1e-2, seed=4)


@pytest.fixture
def fake_spaces(monkeypatch):
    calls = []
    module = types.ModuleType("spaces")
    module.__spec__ = importlib.machinery.ModuleSpec("spaces", None)

    def GPU(duration=60):  # noqa: N802 (the real decorator's name)
        def wrap(fn):
            def call(*args, **kwargs):
                calls.append(duration)
                return fn(*args, **kwargs)
            return call
        return wrap

    module.GPU = GPU
    monkeypatch.setitem(sys.modules, "spaces", module)
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    return calls


def test_nothing_changes_off_zerogpu(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    fn = lambda: 1  # noqa: E731
    assert not hosting.zero_gpu() and hosting.gpu(fn) is fn


def test_renders_are_gpu_calls(fake_spaces):
    class Playground:
        def generate(self, req):
            return f"image of {req}"

    assert hosting.zero_gpu()
    assert hosting.GpuPlayground(Playground(), duration=45).generate("x") == "image of x"
    assert fake_spaces == [45]


def test_training_in_chunks_equals_one_piece(fake_spaces, dataset_dir, tiny_model, tmp_path):
    cfg = build_config(values=dict(dataset=str(dataset_dir), **SETTINGS))
    whole = train.run(cfg, tmp_path / "whole")
    seen = []
    chunked = hosting.train_in_chunks(cfg, tmp_path / "chunked", lambda: False, seen.append, call_s=40, margin_s=40)

    assert chunked.status == "completed" and chunked.step == 5
    assert fake_spaces == [40] * 5  # a budget of 0 s: one step per call, each call resuming the last
    history = events.read_events(tmp_path / "chunked" / "events.jsonl")
    steps = [e for e in history if isinstance(e, events.Step)]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5]
    assert [f.status for f in history if isinstance(f, events.Finished)] == ["completed"]  # pauses are not kept
    assert sum(isinstance(e, events.Finished) and e.status == "paused" for e in seen) == 4  # but were reported
    reference = [e.loss for e in events.read_events(whole.run_dir / "events.jsonl") if isinstance(e, events.Step)]
    assert [e.loss for e in steps] == pytest.approx(reference, rel=1e-5, abs=1e-7)
    a = load_file(str(whole.adapter_dir / "pytorch_lora_weights.safetensors"))
    b = load_file(str(chunked.adapter_dir / "pytorch_lora_weights.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_a_cancel_between_chunks_saves_the_adapter(fake_spaces, dataset_dir, tiny_model, tmp_path):
    cfg = build_config(values=dict(dataset=str(dataset_dir), **SETTINGS))
    stop = {"now": False}

    def on_event(event):
        if isinstance(event, events.Finished) and event.status == "paused" and event.step == 2:
            stop["now"] = True  # the user pressed Cancel while the GPU was handed back

    result = hosting.train_in_chunks(cfg, tmp_path / "run", lambda: stop["now"], on_event, call_s=40, margin_s=40)
    assert result.status == "cancelled" and result.step == 2
    assert (result.adapter_dir / "pytorch_lora_weights.safetensors").exists()
