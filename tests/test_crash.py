"""Crash safety: training processes killed with SIGKILL at random steps resume to exactly the run that
was never interrupted; files are replaced atomically; a kill between two renames is recovered."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio import adapters, events, train
from studio.config import build_config
from studio.paths import recover_folder, replace_atomically, staging, swap_into_place

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 24, 4
SETTINGS = dict(method="lora", steps=STEPS, checkpoint_every=EVERY, sample_every=0, learning_rate=1e-2, seed=3)


def _command(dataset_dir: Path, run: Path, resume: bool) -> list[str]:
    if resume:
        return [sys.executable, "-m", "studio", "train", "--resume", str(run)]
    sets = [a for k, v in SETTINGS.items() if k not in ("method", "steps") for a in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "studio", "train", "--model", "tiny", "--dataset", str(dataset_dir), "--method",
            "lora", "--steps", str(STEPS), "--out", str(run), *sets]


def _steps_logged(run: Path) -> list[int]:
    return [e.step for e in events.read_events(run / "events.jsonl") if isinstance(e, events.Step)]


def _kill_at(cmd: list[str], run: Path, step: int, timeout: float = 240) -> int:
    """Start `cmd`, SIGKILL it once the run has logged `step` (or later); the last step logged before the kill."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            logged = _steps_logged(run)
            if logged and logged[-1] >= step:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return _steps_logged(run)[-1]
            if proc.poll() is not None:
                raise AssertionError(f"training ended before step {step}: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        raise AssertionError(f"step {step} not reached in {timeout} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def reference(dataset_dir, tiny_model, tmp_path_factory):
    """The same run, never interrupted: its losses and its adapter."""
    result = train.run(build_config(values=dict(model="tiny", dataset=str(dataset_dir), **SETTINGS)),
                       tmp_path_factory.mktemp("reference") / "run")
    assert result.status == "completed", result.message
    losses = [e.loss for e in events.read_events(result.run_dir / "events.jsonl") if isinstance(e, events.Step)]
    return losses, load_file(str(result.adapter_dir / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("seed", [11, 29])
def test_sigkill_at_random_steps_then_resume_equals_the_uninterrupted_run(seed, dataset_dir, tiny_model, reference,
                                                                           tmp_path):
    rng = random.Random(seed)
    run = tmp_path / "run"
    first = rng.randint(2, 10)
    killed = [_kill_at(_command(dataset_dir, run, resume=False), run, first)]
    second = rng.randint(killed[0] + EVERY + 1, STEPS - 3)
    killed.append(_kill_at(_command(dataset_dir, run, resume=True), run, second))
    done = subprocess.run(_command(dataset_dir, run, resume=True), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    history = events.read_events(run / "events.jsonl")
    steps = [e for e in history if isinstance(e, events.Step)]
    assert [e.step for e in steps] == list(range(1, STEPS + 1))  # a continuous curve, each step once
    losses, weights = reference
    assert [e.loss for e in steps] == pytest.approx(losses, rel=1e-5, abs=1e-7)
    resumed = [e for e in history if isinstance(e, events.Progress) and e.message.startswith("Resumed from step")]
    for kill, note in zip(killed, resumed):  # at most one checkpoint interval was lost
        assert kill - EVERY <= note.done <= kill, (kill, note.message)
    finished = [e for e in history if isinstance(e, events.Finished)]
    assert [(f.status, f.step) for f in finished] == [("completed", STEPS)]
    ours = load_file(str(run / "adapter" / "pytorch_lora_weights.safetensors"))
    assert ours.keys() == weights.keys()
    assert max(float((ours[k] - weights[k]).abs().max()) for k in weights) < 1e-5
    assert adapters.read_meta(run / "adapter").step == STEPS


def test_a_kill_between_the_two_renames_of_a_folder_swap_is_recovered(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "weights.bin").write_text("old")
    new = staging(final)
    new.mkdir()
    (new / "weights.bin").write_text("new")
    final.rename(final.with_name("adapter.old-4242"))  # the first rename happened, then SIGKILL
    assert not final.exists()
    recover_folder(final)
    assert (final / "weights.bin").read_text() == "old"  # the previous complete folder is back
    swap_into_place(new, final)  # a later save still works
    assert (final / "weights.bin").read_text() == "new" and not list(tmp_path.glob("adapter.old-*"))


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("steps: 10\n")

    def half_then_crash(tmp):
        tmp.write_text("steps: 2")
        raise OSError("disk full")

    with pytest.raises(OSError):
        replace_atomically(path, half_then_crash)
    assert path.read_text() == "steps: 10\n"


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(dataset_dir, tiny_model, tmp_path, monkeypatch):
    real = train._Stepper.__call__

    def poisoned(self, step):
        loss = real(self, step)
        return float("nan") if step == 7 else loss

    monkeypatch.setattr(train._Stepper, "__call__", poisoned)
    result = train.run(build_config(values=dict(model="tiny", dataset=str(dataset_dir), **SETTINGS)), tmp_path / "run")
    assert result.status == "failed" and "loss became nan at step 7" in result.message
    assert "\n" not in result.message
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == ["step-000004"]  # the last good checkpoint, intact
    state = load_file(str(tmp_path / "run" / "checkpoints" / "step-000004" / "trainable.safetensors"))
    assert state and all(torch.isfinite(v).all() for v in state.values())


def test_out_of_memory_mid_run_is_one_sentence_and_the_checkpoint_stays(dataset_dir, tiny_model, tmp_path, monkeypatch):
    real = train._Stepper.__call__

    def runs_out(self, step):
        if step == 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, step)

    monkeypatch.setattr(train._Stepper, "__call__", runs_out)
    result = train.run(build_config(values=dict(model="tiny", dataset=str(dataset_dir), **SETTINGS)), tmp_path / "run")
    assert result.status == "failed" and result.step == 5
    assert result.message.startswith("The device ran out of memory;") and "\n" not in result.message
    assert "gradient checkpointing" in result.message and "resume" in result.message
    assert (tmp_path / "run" / "checkpoints" / "step-000004" / "trainer.yaml").exists()
    monkeypatch.setattr(train._Stepper, "__call__", real)
    resumed = train.resume(tmp_path / "run")  # what the sentence says to do works
    assert resumed.status == "completed" and resumed.step == STEPS
