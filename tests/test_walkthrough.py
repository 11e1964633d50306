"""The README's walkthrough, typed as a user types it: its commands are read out of README.md (so this test
breaks when the README changes) and run, word for word, from a fresh working directory that holds the
clone's `assets/` the way a user's checkout does. Only the step counts are cut (flags appended after the
README's own, which argparse lets win), so the run takes seconds instead of minutes; the full-size run
and its figures are bench/bench_pocket.py's.

Also here: the evaluation's and training's time events (probe estimate, ETA, named phases) and the paths a
user types, relative to where they typed them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio import events
from pocket import quality

REPO = Path(__file__).resolve().parents[1]
# Appended to the README's commands: fewer training steps, samples and denoising steps; everything else as written.
SHORTER = {"train": ["--steps", "3", "--set", "sample_every=2", "--set", "sample_steps=2"],
           "generate": ["--steps", "4"],
           "evaluate": ["--steps", "2", "--seeds", "1"]}


def _studio(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "studio", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"python -m studio {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """The README's commands run in a user's working directory; returns (cwd, outputs by command, commands)."""
    cwd = tmp_path_factory.mktemp("user")
    (cwd / "assets").symlink_to(REPO / "assets", target_is_directory=True)  # the clone's assets, as a user has them
    # One torch thread: on a machine whose cores are busy with other work, two threads wait on each other at
    # every operation (a demo training step took 70 s with two, 3 s with one, while the test suite ran).
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), STUDIO_CACHE=str(cwd / ".cache"),
               OMP_NUM_THREADS="1")
    commands = quality.walkthrough_commands()
    outputs = [_studio(words + SHORTER.get(words[0], []), cwd, env) for words in commands]
    return cwd, outputs, commands, env


def _arg(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


def test_walkthrough_commands_are_read_from_the_readme():
    commands = quality.walkthrough_commands()
    assert [c[0] for c in commands] == ["prep", "train", "generate", "generate", "evaluate"]
    train = commands[1]
    assert _arg(train, "--preset") == "demo" and _arg(train, "--model") == "builtin"
    # every path in the walkthrough is relative: it must mean the user's working directory
    assert not any(Path(w).is_absolute() for c in commands for w in c)


def test_walkthrough_prep_and_train_write_what_the_readme_says(walkthrough):
    cwd, outputs, commands, _ = walkthrough
    data = cwd / _arg(commands[0], "--out")
    assert (data / "dataset.yaml").is_file()
    captions = sorted(p.read_text().strip() for p in (data / "images").glob("*.txt"))
    assert len(captions) == 6 and all("sks shape" in c for c in captions), captions
    run = cwd / _arg(commands[1], "--out")
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "adapter" / "pytorch_lora_weights_kohya.safetensors").is_file()
    history = events.read_events(run / "events.jsonl")
    estimate = next(e for e in history if isinstance(e, events.Estimate))
    assert estimate.unit == "step" and estimate.unit_s > 0 and estimate.seconds > 0
    phases = [e.name for e in history if isinstance(e, events.Phase)]
    assert phases[0] == "loading" and phases[-2:] == ["exporting", "final_sample"], phases
    # the CLI says each of them
    printed = outputs[1].stdout
    assert estimate.message in printed and "Drawing the final sample…" in printed
    assert printed.index("Saving the adapter") < printed.index("Drawing the final sample…") < printed.index("Finished")


def test_walkthrough_images_show_the_adapter(walkthrough):
    """red.png and blue.png exist, and the adapter changed them: the base model alone, given red.png's
    prompt and settings, draws another image."""
    from studio.generate import GenerateRequest, Playground

    cwd, _, commands, _ = walkthrough
    images = {}
    for words in commands[2:4]:
        images[_arg(words, "--out")] = np.asarray(Image.open(cwd / _arg(words, "--out")).convert("RGB"), dtype=float)
    assert [im.shape for im in images.values()] == [(64, 64, 3)] * 2
    red = commands[2]
    steps = int(SHORTER["generate"][SHORTER["generate"].index("--steps") + 1])  # the appended flag wins
    base = Playground().generate(GenerateRequest(_arg(red, "--prompt"), _arg(red, "--model"), [], seed=0, steps=steps,
                                                 guidance=float(_arg(red, "--guidance"))))
    assert np.abs(images[_arg(red, "--out")] - np.asarray(base.convert("RGB"), dtype=float)).mean() > 1.0


def test_walkthrough_evaluation_reports_its_figures(walkthrough):
    """The README's evaluate command (relative --dataset, --runs and --out) finishes and prints the base
    model's and the LoRA's image and prompt similarity."""
    import pandas as pd

    cwd, outputs, commands, _ = walkthrough
    out = cwd / _arg(commands[4], "--out")
    summary = pd.read_csv(out / "summary.csv").set_index("point")
    run = summary[summary["kind"] == "run"]
    assert len(run) == 1 and "base model" in summary.index
    for column in ("image_similarity", "prompt_similarity"):
        assert math.isfinite(summary.loc["base model", column]) and math.isfinite(run[column].iloc[0]), column
    printed = outputs[4].stdout
    assert "image_similarity" in printed and "prompt_similarity" in printed and "Results:" in printed
    history = events.read_events(out / "events.jsonl")
    estimate = next(e for e in history if isinstance(e, events.Estimate))
    assert estimate.unit == "image" and estimate.units == run["n_images"].iloc[0] * 2 - 2
    timed = [e for e in history if isinstance(e, events.Progress) and e.eta_s is not None]
    assert timed and timed[-1].done == timed[-1].total - 1 and timed[-1].elapsed_s > 0
    assert [e.name for e in history if isinstance(e, events.Phase)] == ["embedding", "report"]


# ----------------------------------------------------------------------------- time and paths, in the small

def test_evaluation_counter_tells_eta_from_the_images_after_the_first(monkeypatch):
    """The first image also loads the model: the pace, the ETA and the Estimate come from the images after it."""
    from studio.evaluate import protocol

    now = iter([0.0, 0.0, 30.0, 32.0, 34.0, 36.0])  # the first image took 30 s (loading), the others 2 s
    monkeypatch.setattr(protocol.time, "perf_counter", lambda: next(now))
    seen = []
    counter = protocol._Counter(10, seen.append, lambda: False)
    for i in range(5):
        counter.tick(f"image {i}")
    progress = [e for e in seen if isinstance(e, events.Progress)]
    assert [p.done for p in progress] == [0, 1, 2, 3, 4]
    assert progress[0].eta_s is None
    assert progress[1].eta_s == pytest.approx(30.0 * 9)  # only the first, loading included, to go by
    assert progress[2].eta_s == pytest.approx(2.0 * 8) and progress[4].eta_s == pytest.approx(2.0 * 6)
    assert progress[4].elapsed_s == pytest.approx(36.0)
    (estimate,) = [e for e in seen if isinstance(e, events.Estimate)]
    assert (estimate.units, estimate.unit_s, estimate.seconds) == (8, pytest.approx(2.0), pytest.approx(16.0))
    assert "16 s" in estimate.message
    assert "about 12 s left" in events.describe(progress[4])


def test_estimate_and_phase_events_round_trip_and_read_as_sentences():
    for event in (events.Estimate(75.0, 58, "step", 1.3, "About 1 min 15 s for the 58 steps left."),
                  events.Phase("exporting", "Saving the adapter, exporting and checking its files…", 60),
                  events.Progress(3, 10, "base model: a photo", 6.0, 14.0)):
        assert events.from_json(events.to_json(event)) == event
        assert events.describe(event)
    # event logs written before these fields existed still read
    old = events.from_json('{"done": 1, "total": 4, "message": "x", "kind": "progress"}')
    assert old.eta_s is None and events.describe(old) == "x"
    assert [events.clock(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]


def test_evaluation_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    from studio.evaluate.protocol import EvalConfig, absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(EvalConfig(dataset="data/crescent", runs=["runs/crescent"]))
    assert cfg.dataset == str(tmp_path / "data" / "crescent") and cfg.runs == [str(tmp_path / "runs" / "crescent")]
