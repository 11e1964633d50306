"""JobManager: long work (training, evaluation) in a background thread the process owns.

A Gradio generator dies with its browser session; a thread owned here does not, so a page refresh
neither stops nor loses a run. Jobs report through events written to a file in their folder (the
UI polls it), and stop when their stop flag is set.

One job runs at a time: the accelerator is shared. When the studio serves several people, each job
has an owner (a browser session); another owner's job waits in a first-come queue with a visible
position, and one owner has at most one job running or waiting. A crash inside a job never reaches
the caller: the job ends "failed" with one sentence, and the traceback goes to `error.log` in its folder.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.errors import StudioError

log = logging.getLogger(__name__)
ERROR_LOG = "error.log"


@dataclass
class JobInfo:
    job_id: str
    kind: str  # "train" | "evaluate"
    label: str
    folder: Path  # where the job writes events.jsonl and its results
    status: str = "running"  # queued | running | completed | cancelled | failed
    message: str = ""
    started_at: float = field(default_factory=time.time)
    result: Any = None
    owner: str | None = None  # the browser session that started it; None in a single-user studio

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def active(self) -> bool:
        return self.status in ("running", "queued")


Work = Callable[[Callable[[], bool]], Any]  # receives should_stop; returns a result with .status/.message


class JobManager:
    def __init__(self):
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._running: JobInfo | None = None
        self._queue: list[tuple[JobInfo, Work]] = []
        self._thread: threading.Thread | None = None
        self.history: list[JobInfo] = []

    def start(self, kind: str, label: str, folder: Path, work: Work, owner: str | None = None) -> JobInfo:
        """Run `work` now, or after the jobs ahead of it when another owner's job holds the accelerator."""
        with self._lock:
            mine = next((j for j in reversed(self.history) if j.owner == owner and j.active), None)
            if mine is not None:
                state = "is already running" if mine.running else "is waiting for the accelerator"
                raise StudioError(f"A {mine.kind} job ('{mine.label}') {state}; cancel it or wait for it to finish.")
            job = JobInfo(uuid.uuid4().hex[:8], kind, label, Path(folder), owner=owner)
            self.history.append(job)
            if self._running is not None:
                job.status = "queued"
                self._queue.append((job, work))
            else:
                self._launch(job, work)
            return job

    def _launch(self, job: JobInfo, work: Work) -> None:
        self._stop.clear()
        job.status, job.started_at = "running", time.time()
        self._running = job
        self._thread = threading.Thread(target=self._run, args=(job, work), name=f"job-{job.kind}", daemon=True)
        self._thread.start()

    def _run(self, job: JobInfo, work: Work) -> None:
        try:
            result = work(self._stop.is_set)
            job.result = result
            job.message = getattr(result, "message", "")
            job.status = getattr(result, "status", "completed")
        except StudioError as exc:
            job.status, job.message = "failed", str(exc)
        except Exception as exc:  # the UI must survive any job failure; the reason is shown, the trace kept
            log.exception("Job %s (%s) failed", job.job_id, job.kind)
            where = _write_error_log(job.folder)
            job.message = f"{exc.__class__.__name__}: {exc}" + (f" (details in {where})" if where else "")
            job.status = "failed"
        finally:
            with self._lock:
                self._running = None
                if self._queue:
                    self._launch(*self._queue.pop(0))

    def position(self, job: JobInfo) -> int:
        """0 while it runs, n when n jobs are ahead of it in the queue, -1 when it is not waiting."""
        with self._lock:
            if job.running:
                return 0
            for i, (queued, _) in enumerate(self._queue):
                if queued is job:
                    return i + 1
            return -1

    def cancel(self, owner: str | None = None) -> bool:
        """Stop the owner's job: a running one after its current step, a waiting one at once.
        Returns whether there was one."""
        with self._lock:
            for i, (job, _) in enumerate(self._queue):
                if job.owner == owner:
                    self._queue.pop(i)
                    job.status, job.message = "cancelled", "Cancelled before it started."
                    return True
            job = self._running
            if job is None or job.owner != owner:
                return False
            self._stop.set()
            return True

    def current(self, owner: str | None = None) -> JobInfo | None:
        """The owner's latest job (running, waiting or finished)."""
        with self._lock:
            return next((j for j in reversed(self.history) if j.owner == owner), None)

    def wait(self, timeout: float | None = None) -> JobInfo | None:
        """Wait until no job runs or waits (or `timeout` seconds); the last job started."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                thread, busy = self._thread, self._running is not None or bool(self._queue)
            if not busy:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            if thread is not None:
                thread.join(0.05 if remaining is None else min(0.05, remaining))
        return self.history[-1] if self.history else None


class JobsView:
    """The job manager as one owner sees it: the same calls, bound to the owner."""

    def __init__(self, manager: JobManager, owner: str | None):
        self.manager, self.owner = manager, owner

    def start(self, kind: str, label: str, folder: Path, work: Work) -> JobInfo:
        return self.manager.start(kind, label, folder, work, owner=self.owner)

    def cancel(self) -> bool:
        return self.manager.cancel(self.owner)

    def current(self) -> JobInfo | None:
        return self.manager.current(self.owner)

    def position(self, job: JobInfo) -> int:
        return self.manager.position(job)

    def wait(self, timeout: float | None = None) -> JobInfo | None:
        return self.manager.wait(timeout)


def _write_error_log(folder: Path) -> Path | None:
    try:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ERROR_LOG
        path.write_text(traceback.format_exc(), encoding="utf-8")
        return path
    except OSError:
        return None
