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


@pytest.mark.parametrize("error, message, logged", [
    (StudioError("The dataset has no images; add photos."), "The dataset has no images; add photos.", False),
    (ValueError("boom"), "ValueError: boom (details in {folder}/error.log)", True),
])
def test_failing_work_marks_the_job_failed(manager, tmp_path, unhandled, error, message, logged):
    def work(should_stop):
        raise error

    job = manager.start("evaluate", "bear", tmp_path, work)
    manager.wait(TIMEOUT)

    assert (job.status, job.message, job.result) == ("failed", message.format(folder=tmp_path), None)
    assert unhandled == []  # the exception stayed inside the job
    assert (tmp_path / "error.log").exists() == logged  # an unexpected crash keeps its traceback
    if logged:
        assert "ValueError: boom" in (tmp_path / "error.log").read_text()
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

    with pytest.raises(StudioError, match="'seeds' must be a whole number of at least 1"):
        EvalConfig(dataset="x", seeds=0)


# ----------------------------------------------------------------------------- several sessions

def test_other_sessions_jobs_wait_their_turn_with_a_position(manager, tmp_path):
    gates = {name: threading.Event() for name in "abc"}
    order = []

    def work(name):
        def run(should_stop):
            order.append(name)
            assert gates[name].wait(TIMEOUT)
            return Outcome("completed", name)
        return run

    a = manager.start("train", "a", tmp_path, work("a"), owner="alice")
    b = manager.start("evaluate", "b", tmp_path, work("b"), owner="bob")
    c = manager.start("train", "c", tmp_path, work("c"), owner="carol")
    assert (a.status, b.status, c.status) == ("running", "queued", "queued")
    assert [manager.position(j) for j in (a, b, c)] == [0, 1, 2]
    with pytest.raises(StudioError, match="'b'.*is waiting for the accelerator"):
        manager.start("train", "b2", tmp_path, work("b"), owner="bob")  # one job per session
    assert manager.current("bob") is b and manager.current("dave") is None
    assert manager.cancel("carol") is True and c.status == "cancelled"  # a waiting job leaves the queue at once
    gates["a"].set()
    assert manager.wait(0.5) is not None  # returns while b still holds its gate
    for _ in range(TIMEOUT * 100):
        if b.running:
            break
        threading.Event().wait(0.01)
    assert b.running and a.status == "completed" and manager.position(b) == 0  # the next in line started
    gates["b"].set()
    manager.wait(TIMEOUT)
    assert order == ["a", "b"] and (b.status, c.status) == ("completed", "cancelled")  # carol's never ran


def test_cancel_only_touches_the_callers_job(manager, tmp_path):
    started, polls = threading.Event(), []

    def work(should_stop):
        started.set()
        for _ in range(TIMEOUT * 100):
            if should_stop():
                return Outcome("cancelled", "stopped")
            threading.Event().wait(0.01)
        return Outcome("completed", "ran out")

    job = manager.start("train", "mine", tmp_path, work, owner="alice")
    assert started.wait(TIMEOUT)
    assert manager.cancel("bob") is False and job.running  # another session cannot stop it
    assert manager.cancel("alice") is True
    manager.wait(TIMEOUT)
    assert job.status == "cancelled"
