"""How long a job should take, said before it starts: from the probes of earlier jobs on this machine.

Every run times its second step and every evaluation its second image (their Estimate events, in
``events.jsonl``); a run also records how long it took in all (``Finished.wall_s``). Before the next job
starts, the Train tab, the Evaluate tab and the CLI look for the newest earlier job at the same settings
in the same workspace and scale its probe to the new job's size. Nothing is timed twice, and nothing is
guessed: with no earlier job at these settings, the sentence says the job will time itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from studio import events
from studio.config import flatten

# The settings that decide how long a step takes; a run differing in any of them is no probe for another.
STEP_COST = ("model", "vae", "method", "resolution", "batch_size", "gradient_accumulation_steps",
             "gradient_checkpointing", "mixed_precision", "train_text_encoder", "prior_preservation", "locon")
# The same for an evaluation's image: the model, its denoising steps, and whether guidance doubles the batch.
IMAGE_COST = ("model", "steps", "guided")


@dataclass(frozen=True)
class Forecast:
    seconds: float | None  # None: nothing at these settings was timed here yet
    message: str


def _same_model(a, b) -> bool:
    """Model names as typed: a hub id or 'builtin' as is, a path by where it points."""
    if a == b:
        return True
    try:
        return bool(a) and bool(b) and Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def _off(value):
    return None if value is False else value


def _matches(earlier: dict, wanted: dict, keys) -> bool:
    for key in keys:
        if key in ("model", "vae"):
            if not (earlier.get(key) in (None, "") and wanted.get(key) in (None, "")) and not _same_model(
                    earlier.get(key), wanted.get(key)):
                return False
        elif _off(earlier.get(key)) != _off(wanted.get(key)):  # a method without the option: as off
            return False
    return True


def _timed(folder: Path, unit: str):
    """(probe estimate, finished event) of a job folder, or None when it never timed a unit."""
    history = events.read_events(folder / "events.jsonl")
    probe = next((e for e in reversed(history) if e.kind == "estimate" and e.unit == unit), None)
    if probe is None:
        return None
    finished = next((e for e in reversed(history) if e.kind == "finished"), None)
    return probe, finished


def _newest_first(root: Path, config_name: str):
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"*/{config_name}") if (p.parent / "events.jsonl").exists()]
    return sorted(found, key=lambda p: (p.parent / "events.jsonl").stat().st_mtime, reverse=True)


def train_forecast(runs_root: Path, settings: dict) -> Forecast:
    """The time a run of `settings` (TrainConfig fields, resolution resolved; flat, or in config.yaml's
    sections) should take here."""
    settings = flatten(settings)
    steps = int(settings.get("steps") or 0)
    for config_path in _newest_first(Path(runs_root), "config.yaml"):
        try:
            earlier = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(earlier, dict):
            earlier = flatten(earlier)  # the sectioned layout (or an older run's flat one)
        if not isinstance(earlier, dict) or not _matches(earlier, settings, STEP_COST):
            continue
        timed = _timed(config_path.parent, "step")
        if timed is None:
            continue
        probe, finished = timed
        step_s = probe.unit_s
        overhead = None
        if finished is not None and finished.status == "completed" and finished.wall_s is not None:
            overhead = max(0.0, finished.wall_s - finished.step * step_s)
        seconds = steps * step_s + (overhead or 0.0)
        rest = (f", plus {events.clock(overhead)} for loading, samples and saving as that run took" if overhead
                is not None else ", plus loading, samples and saving")
        return Forecast(seconds, f"About {events.clock(seconds)} on this machine: {steps} steps at {step_s:.2f} s "
                                 f"a step, as run '{config_path.parent.name}' at these settings measured it{rest}.")
    return Forecast(None, f"{steps} steps. No run at these settings was timed on this machine yet: the second "
                          "step times it, and the estimate follows.")


def eval_forecast(evals_root: Path, settings: dict, images: int) -> Forecast:
    """The time an evaluation drawing `images` images with `settings` (EvalConfig fields) should take here."""
    wanted = {"model": settings.get("model"), "steps": settings.get("steps"),
              "guided": float(settings.get("guidance") or 0) > 1}
    for path in _newest_first(Path(evals_root), "evaluation.yaml"):
        try:
            earlier = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("config") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        earlier = {"model": earlier.get("model"), "steps": earlier.get("steps"),
                   "guided": float(earlier.get("guidance") or 0) > 1}
        if not _matches(earlier, wanted, IMAGE_COST):
            continue
        timed = _timed(path.parent, "image")
        if timed is None:
            continue
        per_image = timed[0].unit_s
        seconds = images * per_image
        return Forecast(seconds, f"About {events.clock(seconds)} on this machine for the images ({per_image:.2f} s "
                                 f"an image, as evaluation '{path.parent.name}' measured it), plus loading, "
                                 "embedding and scoring.")
    return Forecast(None, "No evaluation at these settings was timed on this machine yet: the second image "
                          "times it, and the estimate follows.")
