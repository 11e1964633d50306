"""A job's time is said before it starts: from the probe of the newest earlier job at the same settings."""

from __future__ import annotations

import re

import pytest

from studio import events
from studio.__main__ import main
from studio.timings import eval_forecast, train_forecast


def _train(dataset_dir, out, steps, *extra) -> None:
    assert main(["train", "--model", "tiny", "--dataset", str(dataset_dir), "--steps", str(steps), "--out", str(out),
                 "--set", "sample_every=0", "--set", "sample_steps=2", *extra]) == 0


def _before_step_one(printed: str) -> str:
    return printed.split("step 1/")[0]


def test_train_forecast_scales_the_earlier_runs_probe(dataset_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    _train(dataset_dir, runs / "first", 6)
    assert "No run at these settings was timed on this machine yet" in _before_step_one(capsys.readouterr().out)

    history = events.read_events(runs / "first" / "events.jsonl")
    probe = next(e for e in history if e.kind == "estimate")
    finished = history[-1]
    assert finished.kind == "finished" and finished.status == "completed" and finished.wall_s > 6 * probe.unit_s

    _train(dataset_dir, runs / "second", 9)
    told = _before_step_one(capsys.readouterr().out)
    assert f"9 steps at {probe.unit_s:.2f} s a step, as run 'first' at these settings measured it" in told
    expected = 9 * probe.unit_s + (finished.wall_s - 6 * probe.unit_s)
    assert f"About {events.clock(expected)} on this machine" in told

    # The newest timed run is the probe; a run at other settings is none.
    from studio.config import load_run_config

    settings = load_run_config(runs / "second" / "config.yaml")
    second_probe = next(e for e in events.read_events(runs / "second" / "events.jsonl") if e.kind == "estimate")
    assert f"at {second_probe.unit_s:.2f} s a step, as run 'second'" in train_forecast(runs, settings).message
    for changed in ({"batch_size": settings["batch_size"] * 2}, {"resolution": 32}, {"method": "dora"},
                    {"model": "builtin"}, {"gradient_checkpointing": not settings["gradient_checkpointing"]}):
        forecast = train_forecast(runs, {**settings, **changed})
        assert forecast.seconds is None and "No run at these settings" in forecast.message, changed


def test_a_cancelled_or_resumed_run_gives_its_step_time_and_no_overhead(tmp_path):
    run = tmp_path / "runs" / "cut"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: tiny\nmethod: lora\nresolution: 64\nbatch_size: 1\n")
    log = events.EventLog(run / "events.jsonl")
    log(events.Estimate(10.0, 8, "step", 0.5, "About 10 s"))
    log(events.Finished("cancelled", 4, "Cancelled at step 4", "adapter", 30.0))
    forecast = train_forecast(tmp_path / "runs", {"model": "tiny", "method": "lora", "resolution": 64,
                                                  "batch_size": 1, "steps": 100})
    assert forecast.seconds == pytest.approx(50.0)  # 100 × 0.5 s; a cut run's total says nothing of the rest
    assert "plus loading, samples and saving." in forecast.message


def test_evaluate_forecast_counts_the_images_and_times_them_from_the_last_evaluation(trained_run, dataset_dir,
                                                                                        tmp_path, capsys):
    evals = tmp_path / "evals"
    args = ["evaluate", "--model", "tiny", "--runs", str(trained_run), "--dataset", str(dataset_dir), "--clip", "tiny",
            "--dino", "none", "--seeds", "1", "--steps", "2", "--per-kind", "1", "--scales", "1",
            "--kinds", "training,context", "--context", "in a forest"]
    assert main([*args, "--out", str(evals / "one")]) == 0
    first = capsys.readouterr().out
    size = re.search(r"(\d+) images \((\d+) points × (\d+) prompts × 1 seeds\)\.", first)
    assert size and int(size[1]) == int(size[2]) * int(size[3])
    assert "No evaluation at these settings was timed" in first.split(size[0])[1].splitlines()[0]
    drawn = sum(1 for e in events.read_events(evals / "one" / "events.jsonl") if e.kind == "progress" and e.total)
    assert drawn == int(size[1])  # the count told before is what was drawn

    probe = next(e for e in events.read_events(evals / "one" / "events.jsonl") if e.kind == "estimate")
    assert main([*args, "--out", str(evals / "two")]) == 0
    second = capsys.readouterr().out
    assert f"({probe.unit_s:.2f} s an image, as evaluation 'one' measured it)" in second.split("%")[0]
    assert eval_forecast(evals, {"model": "tiny", "steps": 5, "guidance": 7.5}, 10).seconds is None  # other steps
