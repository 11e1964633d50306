"""Typed events emitted by long work (training, evaluation) and their JSON-lines form.

The training loop reports only through these; the UI and the CLI draw progress from them, and
``events.jsonl`` in each run folder is the same stream written to disk, so a page refresh or a
restart can redraw everything that happened.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class Started:
    run_id: str
    total_steps: int
    kind: Literal["started"] = "started"


@dataclass(frozen=True)
class Step:
    step: int  # 1-based count of optimizer steps done
    total_steps: int
    loss: float
    lr: float
    elapsed_s: float  # seconds since the run started
    kind: Literal["step"] = "step"


@dataclass(frozen=True)
class Sample:
    step: int
    images: tuple[str, ...]  # paths relative to the run folder
    prompts: tuple[str, ...]
    kind: Literal["sample"] = "sample"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: str  # relative to the run folder
    kind: Literal["checkpoint"] = "checkpoint"


@dataclass(frozen=True)
class Progress:
    """Progress of work that is not a training step (evaluation, class images).

    `elapsed_s` and `eta_s` are set where the work counts units of similar cost (images): the seconds
    since it started, and the seconds the units not yet done should take at the pace so far (None
    while there is no pace yet, or for a notice that counts nothing)."""

    done: int
    total: int
    message: str
    elapsed_s: float = 0.0
    eta_s: float | None = None
    kind: Literal["progress"] = "progress"


@dataclass(frozen=True)
class Estimate:
    """How long long work should take, said before most of it runs: one unit (a training step, an
    image) was timed as a probe, and the estimate is that time times the units still to do, plus
    `extra_s` for the phases measured apart (samples, export)."""

    seconds: float  # the whole remaining work, probe-based
    units: int  # how many units the estimate counts
    unit: str  # what one unit is: "step", "image"
    unit_s: float  # the probe: seconds one unit took
    message: str
    kind: Literal["estimate"] = "estimate"


# What long work does besides its counted steps: each gets a name a UI can key on and a sentence to show.
PhaseName = Literal["loading", "sampling", "exporting", "final_sample", "embedding", "report"]


@dataclass(frozen=True)
class Phase:
    """Long work entered a stage that no step or image counter measures (loading the model, exporting
    and checking files, drawing the final sample, embedding images): said when it starts, so a reader
    never sees a finished counter and silence."""

    name: PhaseName
    message: str  # e.g. "Exporting and checking files…"
    step: int = 0  # the training step (or images done) when the phase began
    kind: Literal["phase"] = "phase"


@dataclass(frozen=True)
class Finished:
    status: Literal["completed", "cancelled", "failed"]
    step: int
    message: str
    adapter_dir: str | None = None  # relative to the run folder
    wall_s: float | None = None  # the whole job's seconds, loading and saving included (the next job's forecast)
    kind: Literal["finished"] = "finished"


Event = Started | Step | Sample | Checkpoint | Progress | Estimate | Phase | Finished
_BY_KIND = {cls.__dataclass_fields__["kind"].default: cls
            for cls in (Started, Step, Sample, Checkpoint, Progress, Estimate, Phase, Finished)}


def to_json(event: Event) -> str:
    return json.dumps(dataclasses.asdict(event))


def from_json(line: str) -> Event:
    data = json.loads(line)
    cls = _BY_KIND[data["kind"]]
    for key, value in data.items():
        if isinstance(value, list):
            data[key] = tuple(value)
    return cls(**data)


def describe(event: Event) -> str | None:
    """The line a person reads for an estimate, a phase or a timed progress event (the CLI prints it, the UI
    shows it); None for events drawn otherwise (steps, samples)."""
    if isinstance(event, Estimate):
        return event.message
    if isinstance(event, Phase):
        return event.message
    if isinstance(event, Progress):
        if event.total and event.eta_s is not None:
            return (f"{event.done}/{event.total} · {clock(event.elapsed_s)} elapsed · about {clock(event.eta_s)} "
                    f"left · {event.message}")
        return event.message
    return None


def clock(seconds: float) -> str:
    """Seconds as a person reads a duration: '45 s', '3 min 05 s', '1 h 02 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def read_events(path: Path) -> list[Event]:
    """All events of a file; a half-written last line (process killed mid-write) is skipped."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(from_json(line))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return events


class Emitter:
    """Writes each event to its log, then tells an optional listener.

    A listener's bug (a UI callback, say) must not kill the work it listens to: it is logged, and
    the work goes on.
    """

    def __init__(self, path: Path, on_event=None):
        self.log = EventLog(path)
        self.on_event = on_event

    def __call__(self, event: Event) -> None:
        self.log(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                logging.getLogger(__name__).exception("Event listener failed on %s", event.kind)


class EventLog:
    """Appends events to a JSON-lines file, one flush per event so readers see them at once."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: Event) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(to_json(event) + "\n")
