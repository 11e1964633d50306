"""Memory pre-flight: the order of what is switched on when settings do not fit, the sentences that say
so, and the refusal when nothing helps. The probe is a stand-in with a known cost model (the real one
measures two steps and a sample on a GPU)."""

from __future__ import annotations

import importlib.util

import pytest

from studio import memory
from studio.config import build_config
from studio.errors import StudioError

GIB = memory.GIB


def cfg(**values):
    return build_config(values=dict(model="tiny", dataset="x", **values))


def cost(c) -> int:
    """A made-up model: 6 GiB fixed, activations 4 GiB per image (halved by checkpointing), Adam 2 GiB (0.5 in 8 bits)."""
    activations = 4 * c.batch_size * (0.5 if c.gradient_checkpointing else 1.0)
    adam = 0.5 if c.optimizer == "adamw8bit" else 2.0
    return int((6 + activations + adam) * GIB)


@pytest.fixture
def no_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))


def test_settings_that_fit_are_kept(no_bitsandbytes):
    start = cfg(batch_size=1)
    assert memory.fit(start, cost, 24 * GIB) == (start, [])


def test_checkpointing_comes_first(no_bitsandbytes):
    fitted, changes = memory.fit(cfg(batch_size=2), cost, 16 * GIB)  # 16 GiB needed, 14.7 usable; 12 with checkpointing
    assert fitted.gradient_checkpointing and fitted.batch_size == 2
    assert len(changes) == 2 and changes[1].startswith("Gradient checkpointing is on")
    assert "12.0 GiB of the GPU's 16.0 GiB" in changes[0]


def test_then_8_bit_adam_then_smaller_batches_with_the_same_effective_batch(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    fitted, changes = memory.fit(cfg(batch_size=4), cost, 10 * GIB)
    # 4: 24 -> ckpt 16 -> 8-bit 14.5 -> batch 2 (x2) 10.5 -> batch 1 (x4) 8.5 GiB, under 9.2 usable
    assert (fitted.batch_size, fitted.gradient_accumulation_steps, fitted.optimizer) == (1, 4, "adamw8bit")
    assert [c.split(" ")[1] for c in changes[1:]] == ["checkpointing", "optimizer", "batch", "batch"]


def test_when_nothing_fits_the_run_does_not_start(no_bitsandbytes):
    with pytest.raises(StudioError, match=r"need about 10\.0 GiB .* and the GPU has 6\.0 GiB; lower the resolution") as err:
        memory.fit(cfg(batch_size=2), cost, 6 * GIB)
    assert "\n" not in str(err.value)


def test_the_cpu_has_nothing_to_probe(monkeypatch):
    from studio import models

    monkeypatch.setattr(models, "pick_device", lambda: "cpu")
    start = cfg(batch_size=8)
    assert memory.preflight(start) == (start, [])
