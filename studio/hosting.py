"""Hosting on Hugging Face Spaces ZeroGPU, where a GPU is lent per function call for a limited time.

On ZeroGPU (the `spaces` package is installed and SPACES_ZERO_GPU is set), GPU work goes through
`spaces.GPU(duration=...)`: a Playground render or an evaluation image is one call, and training runs
in chunks, each one call that loads the run, trains until its time is nearly up, writes a checkpoint
and returns "paused"; the next chunk resumes from the run folder. Anywhere else these wrappers
change nothing and training runs in one piece.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

# seconds: the longest call ZeroGPU grants by default, and what a chunk leaves for loading and saving
CALL_LIMIT_S = int(os.environ.get("STUDIO_GPU_CALL_S", "120"))
CHUNK_MARGIN_S = 30


def zero_gpu() -> bool:
    return bool(os.environ.get("SPACES_ZERO_GPU")) and importlib.util.find_spec("spaces") is not None


def gpu(fn: Callable, duration: int = CALL_LIMIT_S) -> Callable:
    """`fn` as a ZeroGPU call of at most `duration` seconds; `fn` itself anywhere else."""
    if not zero_gpu():
        return fn
    import spaces

    return spaces.GPU(duration=duration)(fn)


def train_in_chunks(cfg, run_dir: Path, should_stop: Callable[[], bool], on_event=None, resume: bool = False,
                    call_s: int = CALL_LIMIT_S, margin_s: float = CHUNK_MARGIN_S, fresh: Callable | None = None,
                    steps: int | None = None):
    """Train in GPU calls of `call_s` seconds: each trains for `call_s - margin_s` seconds of steps,
    then checkpoints and returns; the next resumes. The same seed gives the same run as one piece.
    `fresh(cfg, run_dir, on_event, should_stop, pause_after_s)` starts a new run (studio.launch.fresh,
    which fits the settings to the GPU first; train.run by default)."""
    from studio import train

    fresh = fresh or train.run
    budget = max(0.0, call_s - margin_s)  # each chunk trains at least one step
    if resume:
        chunk = gpu(lambda: train.resume(run_dir, on_event, should_stop, steps=steps, pause_after_s=budget), call_s)
    else:
        chunk = gpu(lambda: fresh(cfg, run_dir, on_event, should_stop, pause_after_s=budget), call_s)
    result = chunk()
    later = gpu(lambda: train.resume(run_dir, on_event, should_stop, pause_after_s=budget), call_s)
    while result.status == "paused":  # a cancel between chunks: the next one stops at once and saves
        result = later()
    return result


class GpuPlayground:
    """A Playground whose every render is one GPU call (for evaluations on ZeroGPU)."""

    def __init__(self, playground, duration: int = 60):
        self.playground, self.duration = playground, duration

    def generate(self, req):
        return gpu(self.playground.generate, self.duration)(req)
