"""JobManager: long work (training, evaluation) in a background thread the process owns.

A Gradio generator dies with its browser session; a thread owned here does not, so a page refresh
neither stops nor loses a run. Jobs report through events written to a file in their folder (the
UI polls it), and stop when their stop flag is set. One job at a time: the accelerator is shared.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.errors import StudioError

log = logging.getLogger(__name__)


@dataclass
class JobInfo:
    job_id: str
    kind: str  # "train" | "evaluate"
    label: str
    folder: Path  # where the job writes events.jsonl and its results
    status: str = "running"  # running | completed | cancelled | failed
    message: str = ""
    started_at: float = field(default_factory=time.time)
    result: Any = None

    @property
    def running(self) -> bool:
        return self.status == "running"


Work = Callable[[Callable[[], bool]], Any]  # receives should_stop; returns a result with .status/.message


class JobManager:
    def __init__(self):
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._current: JobInfo | None = None
        self._thread: threading.Thread | None = None
        self.history: list[JobInfo] = []

    def start(self, kind: str, label: str, folder: Path, work: Work) -> JobInfo:
        with self._lock:
            if self._current is not None and self._current.running:
                raise StudioError(f"A {self._current.kind} job ('{self._current.label}') is already running; "
                                  "cancel it or wait for it to finish.")
            self._stop.clear()
            job = JobInfo(uuid.uuid4().hex[:8], kind, label, Path(folder))
            self._current = job
            self.history.append(job)
            self._thread = threading.Thread(target=self._run, args=(job, work), name=f"job-{kind}", daemon=True)
            self._thread.start()
            return job

    def _run(self, job: JobInfo, work: Work) -> None:
        try:
            result = work(self._stop.is_set)
            job.result = result
            job.status = getattr(result, "status", "completed")
            job.message = getattr(result, "message", "")
        except StudioError as exc:
            job.status, job.message = "failed", str(exc)
        except Exception as exc:  # the UI must survive any job failure; the reason is logged and shown
            log.exception("Job %s (%s) failed", job.job_id, job.kind)
            job.status, job.message = "failed", f"{exc.__class__.__name__}: {exc}"

    def cancel(self) -> bool:
        """Ask the running job to stop after its current step; returns whether one was running."""
        job = self._current
        if job is None or not job.running:
            return False
        self._stop.set()
        return True

    def current(self) -> JobInfo | None:
        return self._current

    def wait(self, timeout: float | None = None) -> JobInfo | None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self._current
