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
    """Progress of work that is not a training step (evaluation, class images)."""

    done: int
    total: int
    message: str
    kind: Literal["progress"] = "progress"


@dataclass(frozen=True)
class Finished:
    status: Literal["completed", "cancelled", "failed"]
    step: int
    message: str
    adapter_dir: str | None = None  # relative to the run folder
    kind: Literal["finished"] = "finished"


Event = Started | Step | Sample | Checkpoint | Progress | Finished
_BY_KIND = {cls.__dataclass_fields__["kind"].default: cls
            for cls in (Started, Step, Sample, Checkpoint, Progress, Finished)}


def to_json(event: Event) -> str:
    return json.dumps(dataclasses.asdict(event))


def from_json(line: str) -> Event:
    data = json.loads(line)
    cls = _BY_KIND[data["kind"]]
    for key, value in data.items():
        if isinstance(value, list):
            data[key] = tuple(value)
    return cls(**data)


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
