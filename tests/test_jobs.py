"""JobManager: background thread, one job at a time, cancel through the stop flag, failures kept."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from studio.errors import StudioError
from studio.jobs import JobManager

TIMEOUT = 10  # seconds; only reached when something hangs


@dataclass
class Outcome:
    status: str
    message: str


@pytest.fixture
def unhandled(monkeypatch):
    """Exceptions that escaped a thread (none may)."""
    seen = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    return seen


@pytest.fixture
def manager():
    jobs = JobManager()
    yield jobs
    jobs.cancel()
    jobs.wait(TIMEOUT)


def test_work_runs_in_a_background_thread(manager, tmp_path):
    release, inside = threading.Event(), {}

    def work(should_stop):
        inside["thread"] = threading.current_thread()
        assert release.wait(TIMEOUT)
        return Outcome("completed", "done")

    job = manager.start("train", "bear", tmp_path, work)

    assert job.running and manager.current() is job  # start returned while the work still runs
    release.set()
    assert manager.wait(TIMEOUT) is job
    assert inside["thread"] is not threading.main_thread()
    assert (job.status, job.message) == ("completed", "done")
    assert job.result == Outcome("completed", "done")
    assert manager.history == [job] and job.folder == tmp_path and job.kind == "train"


def test_second_start_while_running_is_refused(manager, tmp_path):
    release = threading.Event()
    first = manager.start("train", "bear", tmp_path, lambda stop: release.wait(TIMEOUT))
    ran = []

    with pytest.raises(StudioError, match="already running") as err:
        manager.start("evaluate", "other", tmp_path, lambda stop: ran.append(1))

    assert "'bear'" in str(err.value)
    assert manager.current() is first and first.running and ran == []
    release.set()
    manager.wait(TIMEOUT)
    second = manager.start("evaluate", "other", tmp_path, lambda stop: ran.append(1))  # free again
    manager.wait(TIMEOUT)
    assert ran == [1] and second.status == "completed"


def test_cancel_sets_the_stop_flag_the_work_sees(manager, tmp_path):
    started, polls = threading.Event(), []

    def work(should_stop):
        started.set()
        for _ in range(TIMEOUT * 100):
            polls.append(should_stop())
            if polls[-1]:
                return Outcome("cancelled", f"stopped after {len(polls)} polls")
            threading.Event().wait(0.01)
        return Outcome("completed", "never saw the flag")

    job = manager.start("train", "bear", tmp_path, work)
    assert started.wait(TIMEOUT)
    assert manager.cancel() is True
    manager.wait(TIMEOUT)

    assert job.status == "cancelled" and polls[-1] is True and not any(polls[:-1])
    assert manager.cancel() is False  # nothing running any more

    flags = []
    manager.start("train", "next", tmp_path, lambda stop: flags.append(stop()))
    manager.wait(TIMEOUT)
    assert flags == [False]  # a new job starts with the flag cleared


def test_cancel_without_a_job_is_a_no_op():
    assert JobManager().cancel() is False
    assert JobManager().wait(0.1) is None


@pytest.mark.parametrize("error, message", [
    (StudioError("The dataset has no images; add photos."), "The dataset has no images; add photos."),
    (ValueError("boom"), "ValueError: boom"),
])
def test_failing_work_marks_the_job_failed(manager, tmp_path, unhandled, error, message):
    def work(should_stop):
        raise error

    job = manager.start("evaluate", "bear", tmp_path, work)
    manager.wait(TIMEOUT)

    assert (job.status, job.message, job.result) == ("failed", message, None)
    assert unhandled == []  # the exception stayed inside the job
    after = manager.start("evaluate", "again", tmp_path, lambda stop: Outcome("completed", "ok"))
    manager.wait(TIMEOUT)
    assert after.status == "completed"


def test_result_without_status_counts_as_completed(manager, tmp_path):
    job = manager.start("evaluate", "bear", tmp_path, lambda stop: 42)
    manager.wait(TIMEOUT)
    assert (job.status, job.result) == ("completed", 42)


def test_a_failing_listener_is_logged_and_the_events_are_still_written(tmp_path, caplog):
    from studio import events

    def broken(event):
        raise RuntimeError("listener bug")

    emit = events.Emitter(tmp_path / "events.jsonl", broken)
    emit(events.Progress(0, 2, "first"))
    emit(events.Progress(1, 2, "second"))
    assert [e.message for e in events.read_events(tmp_path / "events.jsonl")] == ["first", "second"]
    assert "Event listener failed" in caplog.text


def test_evaluation_settings_are_checked():
    import pytest

    from studio.errors import StudioError
    from studio.evaluate.protocol import EvalConfig

    with pytest.raises(StudioError, match="'seeds' must be at least 1"):
        EvalConfig(dataset="x", seeds=0)
