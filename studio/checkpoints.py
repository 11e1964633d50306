"""Training state for resume: trainable weights, optimizer and grad-scaler state, step, elapsed time.

A checkpoint folder holds an adapter usable on its own (written by the adapter module) plus:
    trainable.safetensors   every parameter that trains, by "<component>.<parameter name>"
    optimizer.pt            the optimizer's state dict: the studio's own file, loaded weights_only
    trainer.yaml            step, elapsed seconds, grad-scaler state; written last, so a checkpoint
                            counts only when it is complete (a kill mid-write leaves the previous one)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from studio import events as ev
from studio.errors import StudioError
from studio.paths import RunPaths, replace_atomically

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
TRAINER = "trainer.yaml"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # text_encoder_2: SDXL


@dataclass(frozen=True)
class Saved:
    path: Path
    step: int
    elapsed_s: float


def trainable_state(pipe) -> dict:
    """Every weight that trains; of a weight whose gradient is masked to a few rows (`_studio_rows`: the
    new token rows of textual inversion), those rows alone (on SD 1.5 the whole token table is 152 MB)."""
    return {f"{component}.{name}": _trained_part(p).detach().to("cpu").contiguous()
            for component in COMPONENTS if getattr(pipe, component, None) is not None
            for name, p in getattr(pipe, component).named_parameters() if p.requires_grad}


def _trained_part(p):
    rows = getattr(p, "_studio_rows", None)
    return p if rows is None else p[rows.to(p.device)]


def write_state(folder: Path, pipe, optimizer, scaler, step: int, elapsed_s: float) -> None:
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    replace_atomically(folder / TRAINABLE, lambda p: save_file(trainable_state(pipe), str(p)))
    replace_atomically(folder / OPTIMIZER, lambda p: torch.save(optimizer.state_dict(), p))
    meta = {"step": step, "elapsed_s": float(elapsed_s),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None}
    replace_atomically(folder / TRAINER, lambda p: p.write_text(yaml.safe_dump(meta), encoding="utf-8"))


def latest(paths: RunPaths) -> Saved | None:
    """The newest complete checkpoint of a run."""
    if not paths.checkpoints.is_dir():
        return None
    found = []
    for folder in paths.checkpoints.iterdir():
        marker = folder / TRAINER
        if marker.exists() and (folder / TRAINABLE).exists() and (folder / OPTIMIZER).exists():
            meta = yaml.safe_load(marker.read_text(encoding="utf-8")) or {}
            found.append(Saved(folder, int(meta["step"]), float(meta.get("elapsed_s", 0.0))))
    return max(found, key=lambda s: s.step, default=None)


def restore(saved: Saved, pipe, optimizer, schedule, scaler) -> None:
    import torch
    from safetensors.torch import load_file

    state = load_file(str(saved.path / TRAINABLE))
    params = {f"{c}.{n}": p for c in COMPONENTS if getattr(pipe, c, None) is not None
              for n, p in getattr(pipe, c).named_parameters() if p.requires_grad}
    if state.keys() != params.keys():
        raise StudioError(f"Checkpoint '{saved.path.name}' does not match this run's settings "
                          f"({len(state.keys() ^ params.keys())} parameters differ); start a new run.")
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != _trained_part(p).shape:
                raise StudioError(f"Checkpoint '{saved.path.name}' does not match this run's settings "
                                  f"({name} has another shape); start a new run.")
            rows = getattr(p, "_studio_rows", None)
            if rows is None:
                p.copy_(state[name].to(p.device, p.dtype))
            else:
                p[rows.to(p.device)] = state[name].to(p.device, p.dtype)
    optimizer.load_state_dict(torch.load(saved.path / OPTIMIZER, weights_only=True, map_location="cpu"))
    meta = yaml.safe_load((saved.path / TRAINER).read_text(encoding="utf-8")) or {}
    if meta.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(meta["scaler"])
    with warnings.catch_warnings():  # the schedule is replayed without optimizer steps, on purpose
        warnings.simplefilter("ignore")
        for _ in range(saved.step):
            schedule.step()


def truncate_events(path: Path, step: int) -> None:
    """Drop what happened after `step` (it will happen again) and the old ending, keep the rest."""
    def keep(event) -> bool:
        if isinstance(event, ev.Finished):
            return False
        if isinstance(event, (ev.Step, ev.Sample, ev.Checkpoint)):
            return event.step <= step
        if isinstance(event, ev.Progress):
            return event.done <= step
        return True

    kept = [e for e in ev.read_events(path) if keep(e)]
    replace_atomically(path, lambda p: p.write_text("".join(ev.to_json(e) + "\n" for e in kept), encoding="utf-8"))
