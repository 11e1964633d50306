"""The one training loop: run(config, run_dir, on_event, should_stop) -> RunResult.

Reads top to bottom: resolve inputs (fail before writing anything), write config.yaml, load the
model, cache what is frozen, attach the adapter, loop, save. It reports only through events and
checks the stop flag before every step, so Cancel takes effect within one step and still saves.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from studio import adapters, events, models
from studio.adapters import AdapterMeta
from studio.config import TrainConfig, save_config
from studio.data.captions import render
from studio.data.dataset import ConceptDataset, DatasetSpec, load_dataset
from studio.errors import StudioError
from studio.objectives import diffusion_target, instance_loss
from studio.paths import RunPaths

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    status: str  # completed | cancelled | failed
    step: int
    adapter_dir: Path | None
    message: str


@dataclass
class _Frozen:
    """Everything that does not change during training, computed once."""

    latent_mean: torch.Tensor  # VAE posterior per image (frozen VAE: encode once, sample per step)
    latent_std: torch.Tensor
    text: torch.Tensor  # text-encoder hidden states per caption (frozen text encoder)
    scaling: float


def prepare(cfg: TrainConfig, run_dir: Path) -> tuple[TrainConfig, DatasetSpec, models.ModelRef]:
    """Check every input and resolve defaults; nothing is written yet."""
    if not cfg.dataset:
        raise StudioError("No dataset was chosen; prepare one in the Dataset tab or give --dataset.")
    spec = load_dataset(Path(cfg.dataset))
    ref = models.resolve(cfg.model)
    if RunPaths(Path(run_dir)).config.exists():
        raise StudioError(f"Run folder '{run_dir}' already holds a run; choose a new output folder.")
    resolved = TrainConfig(**{**cfg.to_dict(), "model": ref.name,
                              "dataset": str(Path(cfg.dataset).resolve()),
                              "resolution": cfg.resolution or spec.resolution})
    return resolved, spec, ref


def run(cfg: TrainConfig, run_dir: Path, on_event: Callable | None = None,
        should_stop: Callable[[], bool] | None = None) -> RunResult:
    cfg, spec, ref = prepare(cfg, run_dir)
    paths = RunPaths(Path(run_dir))
    save_config(cfg, paths.config)  # fully resolved, before step 0
    emit = events.Emitter(paths.events, on_event)
    emit(events.Started(paths.run_id, cfg.steps))
    for notice in filter(None, [ref.notice]):
        emit(events.Progress(0, cfg.steps, notice))
    state = {"step": 0}
    try:
        return _train(cfg, spec, ref, paths, emit, should_stop or (lambda: False), state)
    except StudioError as exc:
        message = str(exc)
    except torch.OutOfMemoryError:
        message = ("The device ran out of memory; lower the batch size or resolution, "
                   "or choose a smaller rank, and start the run again.")
    except Exception as exc:
        (paths.root / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
        log.exception("Training run %s failed", paths.run_id)
        message = f"Training stopped on an internal error ({exc.__class__.__name__}: {exc}); details are in error.log."
    emit(events.Finished("failed", state["step"], message))
    return RunResult(paths.root, "failed", state["step"], None, message)


def _train(cfg, spec, ref, paths, emit, should_stop, state) -> RunResult:
    device = models.pick_device()
    dtype, notice = models.resolve_precision(cfg.mixed_precision, device)
    if notice:
        emit(events.Progress(0, cfg.steps, notice))
    pipe = models.load_pipeline(ref, device, dtype)
    torch.manual_seed(cfg.seed)
    frozen = _cache_frozen(pipe, ConceptDataset(Path(cfg.dataset), cfg.resolution), device, dtype)
    adapter = adapters.module_for(cfg.method)
    adapter.attach(pipe, cfg)
    params = adapter.trainable_parameters(pipe)
    for p in params:  # trainable weights stay float32 under mixed precision
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    step_fn = _Stepper(pipe, frozen, cfg, device, dtype, optimizer, schedule, params)
    order = _batches(len(frozen.text), cfg.batch_size, step_fn.generator)
    start, status = time.perf_counter(), "completed"
    pipe.unet.train()
    while state["step"] < cfg.steps:
        if should_stop():
            status = "cancelled"
            break
        loss = step_fn(next(order))
        if not math.isfinite(loss):
            raise StudioError(f"The loss became {loss} at step {state['step'] + 1}; lower the learning rate "
                              "and start again (saved checkpoints are kept).")
        state["step"] += 1
        step = state["step"]
        emit(events.Step(step, cfg.steps, loss, schedule.get_last_lr()[0], time.perf_counter() - start))
        if step < cfg.steps and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            _save(adapter, pipe, paths.checkpoint(step), cfg, spec, step, paths, emit, checkpoint=True)
        if step < cfg.steps and cfg.sample_every and step % cfg.sample_every == 0:
            _samples(pipe, cfg, spec, paths, step, emit)
    _save(adapter, pipe, paths.adapter, cfg, spec, state["step"], paths, emit, checkpoint=False)
    _export(adapter, pipe, paths, emit, state["step"])
    if status == "completed":
        _samples(pipe, cfg, spec, paths, state["step"], emit)
    message = (f"Cancelled at step {state['step']}; the adapter so far is saved." if status == "cancelled"
               else f"Finished {state['step']} steps.")
    emit(events.Finished(status, state["step"], message, "adapter"))
    return RunResult(paths.root, status, state["step"], paths.adapter, message)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to zero at the last step."""
    def factor(step: int) -> float:
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        if cfg.lr_schedule == "cosine":
            span = max(1, cfg.steps - cfg.lr_warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.lr_warmup_steps) / span)))
        return 1.0
    return factor


@torch.no_grad()
def _cache_frozen(pipe, data: ConceptDataset, device: str, dtype) -> _Frozen:
    posterior = pipe.vae.encode(data.pixels.to(device, dtype)).latent_dist
    tokens = pipe.tokenizer(data.captions, padding="max_length", truncation=True,
                            max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    text = pipe.text_encoder(tokens.input_ids.to(device))[0]
    return _Frozen(posterior.mean.float(), posterior.std.float(), text, pipe.vae.config.scaling_factor)


class _Stepper:
    """One optimizer step: sample latents and noise, predict, regress, update."""

    def __init__(self, pipe, frozen: _Frozen, cfg: TrainConfig, device, dtype, optimizer, schedule, params):
        from diffusers import DDPMScheduler

        self.unet, self.frozen, self.cfg = pipe.unet, frozen, cfg
        self.device, self.dtype = device, dtype
        self.optimizer, self.schedule, self.params = optimizer, schedule, params
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        # All randomness from one CPU generator: the same seed gives the same run on any device.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        half = device == "cuda" and dtype != torch.float32
        self.autocast = torch.autocast("cuda", dtype=dtype) if half else nullcontext()
        self.scaler = torch.amp.GradScaler("cuda", enabled=half and dtype == torch.float16)

    def __call__(self, index: torch.Tensor) -> float:
        f, g = self.frozen, self.generator
        mean, std = f.latent_mean[index], f.latent_std[index]
        latents = (mean + std * torch.randn(mean.shape, generator=g).to(mean.device)) * f.scaling
        noise = torch.randn(latents.shape, generator=g).to(latents.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(index),), generator=g)
        t = t.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        with self.autocast:
            pred = self.unet(noisy.to(self.dtype), t, encoder_hidden_states=f.text[index]).sample
        loss = instance_loss(pred, diffusion_target(self.noise_scheduler, latents, noise, t))
        self.scaler.scale(loss).backward()
        if self.cfg.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled epochs; a batch may wrap into the next epoch so every batch is full."""
    buffer: list[int] = []
    while True:
        while len(buffer) < batch_size:
            buffer += torch.randperm(n, generator=generator).tolist()
        yield torch.tensor(buffer[:batch_size])
        buffer = buffer[batch_size:]


def _save(adapter, pipe, out_dir: Path, cfg, spec, step, paths: RunPaths, emit, checkpoint: bool) -> None:
    adapter.save(pipe, out_dir)
    adapters.write_meta(out_dir, AdapterMeta(kind=cfg.method, base_model=cfg.model, token=spec.token,
                                             class_word=spec.class_word, step=step, rank=cfg.rank,
                                             alpha=cfg.alpha, has_scale=adapter.HAS_SCALE))
    if checkpoint:
        emit(events.Checkpoint(step, str(out_dir.relative_to(paths.root))))


def _export(adapter, pipe, paths: RunPaths, emit, step: int) -> None:
    """Community-format copies of the final adapter, each read back by an independent loader."""
    from studio.adapters.checks import write_reports

    export = getattr(adapter, "export", None)
    if export is None:
        return
    reports = export(paths.adapter, pipe)
    write_reports(paths.adapter, reports)
    for report in reports:
        emit(events.Progress(step, step, report.summary()))


@torch.no_grad()
def _samples(pipe, cfg: TrainConfig, spec: DatasetSpec, paths: RunPaths, step: int, emit) -> None:
    prompts = [render(p, spec.token, spec.class_word) for p in cfg.sample_prompts]
    if not prompts:
        return
    pipe.unet.eval()
    files = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(cfg.seed + i)  # same noise at every step: comparable
        image = pipe(prompt, num_inference_steps=cfg.sample_steps, generator=generator,
                     height=cfg.resolution, width=cfg.resolution).images[0]
        out = paths.sample(step, i)
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
        files.append(str(out.relative_to(paths.root)))
    pipe.unet.train()
    emit(events.Sample(step, tuple(files), tuple(prompts)))
