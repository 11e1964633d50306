"""Memory pre-flight: will these settings fit the GPU, and if not, what to switch on.

On a GPU, before a run starts, `fit` probes the settings: two training steps and one sample image in a
throw-away folder, measuring the peak of allocated memory. If the peak does not fit (with a margin), it
switches on what helps, in this order, and probes again:

1. gradient checkpointing (recompute activations in the backward pass);
2. 8-bit Adam (bitsandbytes), when installed;
3. half the batch with twice the gradient accumulation (the same effective batch), down to batch 1.

Frozen latents and text embeddings are always cached, so the VAE and text encoder never run per step.
Each change is reported in one sentence. When nothing is left to try, the run does not start and the
sentence says what does not fit. On the CPU there is nothing to probe: the settings are kept.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

from studio.errors import StudioError

log = logging.getLogger(__name__)
MARGIN = 0.92  # of the GPU's memory a probe's peak may use: the allocator needs room to spare
GIB = 1024 ** 3


def ladder(cfg) -> list[tuple[str, object]]:
    """The settings to try after `cfg`, each with the sentence that reports it."""
    steps, current = [], cfg
    if not current.gradient_checkpointing:
        current = replace(current, gradient_checkpointing=True)
        steps.append(("Gradient checkpointing is on (activations are recomputed in the backward pass).", current))
    if current.optimizer == "adamw" and importlib.util.find_spec("bitsandbytes") is not None:
        current = replace(current, optimizer="adamw8bit")
        steps.append(("The optimizer is 8-bit Adam (its state takes a quarter of the memory).", current))
    while current.batch_size > 1 and current.batch_size % 2 == 0:
        current = replace(current, batch_size=current.batch_size // 2,
                          gradient_accumulation_steps=current.gradient_accumulation_steps * 2)
        steps.append((f"The batch is {current.batch_size} with {current.gradient_accumulation_steps}-step gradient "
                      "accumulation (the same effective batch).", current))
    return steps


def fit(cfg, probe: Callable[[object], int], capacity: int) -> tuple[object, list[str]]:
    """The first settings of `[cfg] + ladder(cfg)` whose probed peak fits `capacity` bytes, and the
    sentences saying what was changed. Raises StudioError when none fits."""
    peak = probe(cfg)
    if peak <= MARGIN * capacity:
        return cfg, []
    changes = []
    for sentence, candidate in ladder(cfg):
        changes.append(sentence)
        peak = probe(candidate)
        log.info("memory probe: %.2f GiB of %.2f GiB with %s", peak / GIB, capacity / GIB, sentence)
        if peak <= MARGIN * capacity:
            first = f"These settings need about {probe_gib(peak)} of the GPU's {probe_gib(capacity)}"
            return candidate, [f"{first} after these changes, made so the run fits:"] + changes
    raise StudioError(f"These settings need about {probe_gib(peak)} of GPU memory even with gradient checkpointing"
                      f"{', 8-bit Adam' if any('8-bit' in c for c in changes) else ''} and batch 1, and the GPU has "
                      f"{probe_gib(capacity)}; lower the resolution or the rank, or choose a LoRA method.")


def probe_gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def gpu_probe(cfg) -> int:
    """Peak allocated GPU memory of two training steps and one sample image with `cfg` (CUDA only)."""
    import torch

    from studio import train

    folder = Path(tempfile.mkdtemp(prefix="studio-probe-"))
    try:
        # Prior preservation stays on (it doubles the UNet batch); its class images are drawn once and cached,
        # so the run itself reuses them.
        probe_cfg = replace(cfg, steps=2, checkpoint_every=0, sample_every=0, sample_prompts=cfg.sample_prompts[:1],
                            fit_memory=False)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result = train.run(probe_cfg, folder / "probe")
        peak = torch.cuda.max_memory_allocated()
        if result.status != "completed" and "out of memory" not in result.message:
            raise StudioError(result.message)
        if result.status != "completed":  # ran out: more than the whole GPU
            return torch.cuda.get_device_properties(0).total_memory * 2
        return peak
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        torch.cuda.empty_cache()


def preflight(cfg) -> tuple[object, list[str]]:
    """`fit` with the real probe on a GPU; the settings unchanged elsewhere."""
    from studio import models

    if models.pick_device() != "cuda" or not getattr(cfg, "fit_memory", True):
        return cfg, []
    import torch

    return fit(cfg, gpu_probe, torch.cuda.get_device_properties(0).total_memory)
