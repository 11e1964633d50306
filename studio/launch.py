"""The one way a training run starts or resumes: the Train tab, the API and the CLI all call `start`.

What wraps the loop lives here, once: the memory pre-flight (on a GPU, settings fitted to its memory
before step 0, studio.memory) and, on Hugging Face ZeroGPU, training in timed GPU calls
(studio.hosting.train_in_chunks). `check` and `check_resume` are the same checks a start makes, for a
page that wants the sentence before a background job begins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from studio import distributed, hosting, memory, train
from studio.config import TrainConfig


def _never() -> bool:
    return False


def start(cfg: TrainConfig | None, run_dir: Path, on_event: Callable | None = None,
          should_stop: Callable[[], bool] | None = None, resume: bool = False, steps: int | None = None):
    """Train `cfg` into the new folder `run_dir`, or with `resume` continue the run there (to `steps`
    in all, when given). Returns train.RunResult."""
    should_stop = should_stop or _never
    if hosting.zero_gpu():  # in chunks of one GPU call each; the first fits the settings like any start
        return hosting.train_in_chunks(cfg, run_dir, should_stop, on_event, resume=resume, fresh=fresh, steps=steps)
    if resume:
        return train.resume(run_dir, on_event, should_stop, steps=steps)
    return fresh(cfg, run_dir, on_event, should_stop)


def fresh(cfg: TrainConfig, run_dir: Path, on_event: Callable | None = None,
          should_stop: Callable[[], bool] | None = None, pause_after_s: float | None = None):
    """A new run, its settings first fitted to the GPU's memory (a single process on a GPU only: the probe
    trains two steps in a folder of its own)."""
    cfg, _, _ = train.prepare(cfg, run_dir)
    notices: list[str] = []
    if not distributed.world().parallel:
        cfg, notices = memory.preflight(cfg)
    return train.run(cfg, run_dir, on_event, should_stop, pause_after_s, notices=notices)


def check(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """What a start refuses, said now (one sentence, StudioError): bad settings, a missing dataset or model,
    a folder that already holds a run. Returns the resolved config."""
    return train.prepare(cfg, run_dir)[0]


def check_resume(run_dir: Path, steps: int | None = None) -> int:
    """What a resume refuses, said now; returns the step it continues from."""
    return train.resumable(run_dir, steps)[1].step
