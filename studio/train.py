"""The one training loop: run(config, run_dir, on_event, should_stop) -> RunResult, and resume(run_dir).

Reads top to bottom: resolve inputs (fail before writing anything), write config.yaml, load the
model, cache what is frozen, attach the adapter, loop, save. It reports only through events and
checks the stop flag before every step, so Cancel takes effect within one step and still saves.

Randomness is a pure function of (seed, step): each step draws its batch, flips, noise and timesteps
from its own seeded generator, so a resumed run replays exactly what an uninterrupted one would.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from studio import adapters, checkpoints, distributed, events, models, preflight, prior
from studio.adapters import AdapterMeta
from studio.config import TrainConfig, from_saved, load_run_config, save_config
from studio.data.captions import render
from studio.data.dataset import ConceptDataset, DatasetSpec, load_dataset, load_pixels
from studio.errors import DISK_FULL, StudioError, disk_full
from studio.generate import truncation_notice
from studio.objectives import diffusion_target, instance_loss, min_snr_weights, prior_preservation_loss
from studio.paths import RunPaths

log = logging.getLogger(__name__)


# Set by a SIGTERM handler (the CLI's, the app's): the loop stops after its current step, writes a
# checkpoint and ends "interrupted", so the run resumes from there.
TERMINATE = threading.Event()


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

    latent_mean: torch.Tensor  # (flips, images, ...): VAE posterior of each image, and of its mirror image
    latent_std: torch.Tensor
    text: torch.Tensor | None  # text-encoder hidden states per caption (None: the text encoder trains)
    scaling: float
    pooled: torch.Tensor | None = None  # SDXL: text_encoder_2's pooled embedding per caption
    class_mean: torch.Tensor | None = None  # prior preservation: class images' posteriors
    class_std: torch.Tensor | None = None
    class_text: torch.Tensor | None = None  # each class prompt's hidden states, (class words, tokens, dim)
    class_pooled: torch.Tensor | None = None  # SDXL: each class prompt's pooled embedding, (class words, dim)
    class_of: torch.Tensor | None = None  # class image -> row of class_text
    class_ids: tuple[torch.Tensor, ...] | None = None  # class prompts as ids, when text is encoded every step
    captions: list[str] | None = None
    class_prompts: list[str] | None = None
    token_ids: tuple[torch.Tensor, ...] | None = None  # captions as ids per tokenizer, when text is encoded every step
    n_images: int = 0
    slots: torch.Tensor | None = None  # each image once per its own repeats, listed (small tests only)
    repeats: torch.Tensor | None = None  # each image's own repeats (dataset.yaml), for batch_indices
    groups: list | None = None  # aspect-ratio buckets: each image's latent (h, w); a micro-batch keeps to one


class PerImage(list):
    """Latents of images of different sizes (aspect-ratio buckets): item i is (views, C, h, w).
    Indexed like the stacked tensor, [views, images] -> (batch, C, h, w), for images of one size."""

    @property
    def shape(self) -> tuple[int, int]:
        return self[0].shape[0], len(self)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            views, index = key
            return torch.stack([list.__getitem__(self, int(i))[int(v)] for v, i in zip(views, index)])
        return list.__getitem__(self, key)


def prepare(cfg: TrainConfig, run_dir: Path) -> tuple[TrainConfig, DatasetSpec, models.ModelRef]:
    """Check every input and resolve defaults; nothing is written yet."""
    if not cfg.dataset:
        raise StudioError("No dataset was chosen; prepare one in the Dataset tab or give --dataset.")
    spec = load_dataset(Path(cfg.dataset))
    specs = [spec, *_check_extra(spec, cfg.extra_datasets)]
    if cfg.prior_preservation and any(s.buckets for s in specs):
        raise StudioError("Aspect-ratio buckets cannot be combined with prior preservation yet (class images are "
                          "square); re-export the dataset without buckets or turn prior preservation off.")
    ref = models.resolve(cfg.model, cfg.vae)
    preflight.check_hub_model(ref.source, "Base model")  # offline: one sentence now, not hub retries
    _check_before_loading(cfg)
    if RunPaths(Path(run_dir)).config.exists():
        raise StudioError(f"Run folder '{run_dir}' already holds a run; choose a new output folder, "
                          "or resume it with `python -m studio train --resume`.")
    w = distributed.world()
    if cfg.batch_size % w.size:
        raise StudioError(f"Setting 'batch_size' ({cfg.batch_size}) is the global batch and must be a multiple of "
                          f"the {w.size} training processes; choose {w.size * max(1, cfg.batch_size // w.size)}.")
    resolved = TrainConfig(**{**cfg.to_dict(), "model": ref.name, "vae": ref.vae,
                              "dataset": str(Path(cfg.dataset).resolve()),
                              "extra_datasets": [str(Path(d).resolve()) for d in cfg.extra_datasets],
                              "resolution": cfg.resolution or spec.resolution})
    return resolved, spec, ref


def _check_before_loading(cfg: TrainConfig) -> None:
    """Settings that used to fail only once the model had loaded: checked first, in a moment."""
    if cfg.prior_preservation and cfg.class_data_dir:
        prior.check_folder(Path(cfg.class_data_dir))
    if cfg.optimizer == "adamw8bit":
        if models.pick_device() != "cuda":
            raise StudioError("8-bit Adam needs a CUDA GPU; set optimizer to 'adamw' on this machine.")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise StudioError("8-bit Adam needs the bitsandbytes package; `pip install bitsandbytes`, "
                              "or set optimizer to 'adamw'.")


def _check_extra(spec: DatasetSpec, extra: list[str]) -> list[DatasetSpec]:
    """The extra datasets' specs; each concept needs a trigger word of its own."""
    specs = [load_dataset(Path(d)) for d in extra]
    tokens = [spec.token] + [s.token for s in specs]
    for token in tokens:
        if tokens.count(token) > 1:
            raise StudioError(f"Two of the datasets trained together use the trigger word '{token}'; "
                              "give each concept its own trigger word.")
    return specs


def run(cfg: TrainConfig, run_dir: Path, on_event: Callable | None = None,
        should_stop: Callable[[], bool] | None = None, pause_after_s: float | None = None,
        notices: list[str] = ()) -> RunResult:
    """Train from step 0. `pause_after_s`: stop with a checkpoint (status "paused") once this many
    seconds of steps have run, for hosts that lend a GPU in timed calls; `resume` continues. `notices`:
    sentences the run reports before its first step (what the memory pre-flight changed).

    The loop itself: the UI, the API and the CLI start runs through studio.launch.start, which fits the
    settings to the GPU first and trains in chunks where the host lends the GPU by the call."""
    w = distributed.world()
    distributed.setup(w)
    cfg, spec, ref = prepare(cfg, run_dir)
    fitted = list(notices)
    distributed.barrier(w)  # every rank has checked the folder is new before rank 0 writes into it
    paths = RunPaths(Path(run_dir))
    if w.main:
        save_config(cfg, paths.config)  # fully resolved, before step 0
    emit = _emitter(paths, on_event, w)
    emit(events.Started(paths.run_id, cfg.steps))
    if ref.notice:
        emit(events.Progress(0, cfg.steps, ref.notice))
    if fitted:
        emit(events.Progress(0, cfg.steps, " ".join(fitted)))
    return _guarded(cfg, spec, ref, paths, emit, should_stop, None, pause_after_s)


def _emitter(paths: RunPaths, on_event, w: distributed.World):
    """Rank 0 logs and reports; the other ranks of a multi-process run stay silent."""
    return events.Emitter(paths.events, on_event) if w.main else (lambda event: None)


def resume(run_dir: Path, on_event: Callable | None = None, should_stop: Callable[[], bool] | None = None,
           steps: int | None = None, pause_after_s: float | None = None) -> RunResult:
    """Continue a run from its last checkpoint: same step count, optimizer state and loss curve.

    Args:
        steps: a new total number of steps (to train longer than first planned); None keeps it.
    """
    paths = RunPaths(Path(run_dir))
    cfg, last = resumable(run_dir, steps)
    spec, ref = load_dataset(Path(cfg.dataset)), models.resolve(cfg.model, cfg.vae)
    _check_extra(spec, cfg.extra_datasets)
    w = distributed.world()
    distributed.setup(w)
    distributed.barrier(w)
    if w.main:
        save_config(cfg, paths.config)
        checkpoints.truncate_events(paths.events, last.step)  # the curve continues from the checkpoint
    emit = _emitter(paths, on_event, w)
    emit(events.Progress(last.step, cfg.steps, f"Resumed from step {last.step} of {cfg.steps}."))
    return _guarded(cfg, spec, ref, paths, emit, should_stop, last, pause_after_s)


def resumable(run_dir: Path, steps: int | None = None):
    """(the run's config, with `steps` in all when given; its last complete checkpoint), or one sentence
    why the run cannot be resumed."""
    paths = RunPaths(Path(run_dir))
    if not paths.config.exists():
        raise StudioError(f"'{run_dir}' is not a run folder (no config.yaml); give the folder a run wrote.")
    values = load_run_config(paths.config)  # the sectioned layout, or an older run's flat one
    if steps is not None:
        values["steps"] = steps
    cfg = from_saved(values)
    last = checkpoints.latest(paths)
    if last is None:
        raise StudioError(f"Run '{paths.run_id}' has no complete checkpoint to resume from; start a new run.")
    if last.step >= cfg.steps:
        finished = "" if steps is not None else f" (it already finished its {cfg.steps} steps)"
        raise StudioError(f"Run '{paths.run_id}' already reached step {last.step} of {cfg.steps}{finished}; to "
                          f"train longer, give a larger step count (`python -m studio train --resume "
                          f"{paths.root} --steps N`).")
    return cfg, last


def _guarded(cfg, spec, ref, paths: RunPaths, emit, should_stop, resume_from, pause_after_s=None) -> RunResult:
    """Run the loop; whatever goes wrong ends as one Finished event with one sentence."""
    state = {"step": resume_from.step if resume_from else 0, "began": time.perf_counter()}
    try:
        return _train(cfg, spec, ref, paths, emit, should_stop or (lambda: False), state, resume_from, pause_after_s)
    except StudioError as exc:
        message = str(exc)
    except torch.OutOfMemoryError:
        message = ("The device ran out of memory; lower the batch size or resolution, turn on gradient "
                   "checkpointing, or choose a smaller rank, and resume the run.")
    except Exception as exc:
        log.exception("Training run %s failed", paths.run_id)
        if disk_full(exc, paths.root):
            message = DISK_FULL
        else:
            (paths.root / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
            message = f"Training stopped on an internal error ({exc.__class__.__name__}: {exc}); details are in error.log."
    try:
        emit(events.Finished("failed", state["step"], message))
    except OSError:  # a full disk takes the event log too; the caller still gets the sentence
        log.warning("Could not log the end of run %s: %s", paths.run_id, message)
    return RunResult(paths.root, "failed", state["step"], None, message)


def _train(cfg, spec, ref, paths, emit, should_stop, state, resume_from, pause_after_s=None) -> RunResult:
    w = distributed.world()
    device = models.pick_device()
    if device == "cuda" and w.parallel:
        device = f"cuda:{w.local_rank}"
    dtype, notice = models.resolve_precision(cfg.mixed_precision, device)
    if notice:
        emit(events.Progress(state["step"], cfg.steps, notice))
    emit(events.Phase("loading", "Loading the model and caching the images' latents…", state["step"]))
    pipe = models.load_pipeline(ref, device, dtype)
    data = [ConceptDataset(Path(d), cfg.resolution) for d in [cfg.dataset, *cfg.extra_datasets]]
    frozen = _cache_frozen(pipe, data, device, dtype, cfg.flip_p > 0)
    if resume_from is None and (should_stop() or TERMINATE.is_set()):  # asked to stop while loading a new
        # run: end now, there is nothing to save (a resumed run goes on to save the adapter it restores)
        return _stopped_before_training(paths, emit, "cancelled" if should_stop() else "interrupted")
    long = [c for c in frozen.captions if truncation_notice(pipe.tokenizer, c)]
    if long:
        emit(events.Progress(state["step"], cfg.steps, f"{len(long)} caption(s) are longer than the text encoder "
                             f"reads ({pipe.tokenizer.model_max_length} tokens) and are cut there; the first: "
                             f"'{long[0][:60]}…'."))
    if cfg.prior_preservation:  # drawn by the base model, so before any adapter is attached
        if not w.main:
            distributed.barrier(w)  # rank 0 draws the class images into the cache first
        _cache_class(pipe, frozen, cfg, [d.spec for d in data], device, dtype, emit, should_stop)
        if w.main:
            distributed.barrier(w)
    torch.manual_seed(cfg.seed)  # adapter initialisation
    adapter = adapters.get(cfg.method)
    with models.CONSTRUCTION_LOCK:  # new layers: never while another thread loads a model
        adapter.attach(pipe, adapters.setup_for(cfg))
    if adapter.trains_text(cfg.adapter):  # the captions' encoding changes
        frozen.text, frozen.pooled = None, None
        frozen.token_ids = tokenize_all(pipe, frozen.captions, device)
        if adapter.trains_text_weights(cfg.adapter) and frozen.class_text is not None:  # so do the class prompts' (new rows of
            # textual inversion are not in them): the prior term then reaches the encoder's weights too
            frozen.class_ids = tokenize_all(pipe, frozen.class_prompts, device)
    params = adapter.trainable_parameters(pipe)
    for p in params:  # trainable weights stay float32 under mixed precision
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    optimizer = _optimizer(cfg, params, device, adapter.caps.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    stepper = _Stepper(pipe, frozen, cfg, device, dtype, optimizer, schedule, params, w)
    if resume_from is not None:
        checkpoints.restore(resume_from, pipe, optimizer, schedule, stepper.scaler)
    start, status = time.perf_counter() - (resume_from.elapsed_s if resume_from else 0.0), "completed"
    pipe.unet.train()
    chunk_start, first_step = time.perf_counter(), state["step"]
    clock = _Clock(cfg, first_step, emit)
    last_saved = chunk_start  # checkpoints by time count from here
    while state["step"] < cfg.steps:
        if should_stop():
            status = "cancelled"
            break
        if TERMINATE.is_set():
            status = "interrupted"
            break
        if (pause_after_s is not None and state["step"] > first_step
                and time.perf_counter() - chunk_start >= pause_after_s):
            status = "paused"
            break
        loss = stepper(state["step"] + 1)
        if not math.isfinite(loss):
            raise StudioError(f"The loss became {loss} at step {state['step'] + 1}; lower the learning rate "
                              "and start again (saved checkpoints are kept).")
        state["step"] += 1
        step = state["step"]
        elapsed = time.perf_counter() - start
        emit(events.Step(step, cfg.steps, loss, schedule.get_last_lr()[0], elapsed))
        clock.stepped(step)
        due = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
        due = due or (cfg.checkpoint_minutes > 0 and time.perf_counter() - last_saved >= cfg.checkpoint_minutes * 60)
        if w.main and step < cfg.steps and due:
            _checkpoint(adapter, pipe, stepper, cfg, spec, paths, emit, step, elapsed)
            last_saved = time.perf_counter()
        if w.main and step < cfg.steps and cfg.sample_every and step % cfg.sample_every == 0:
            emit(events.Phase("sampling", f"Drawing samples at step {step}…", step))
            with clock.sampling(step):
                _samples(pipe, cfg, spec, paths, step, emit)
    if status in ("paused", "interrupted"):  # what resume needs, and nothing else: the next call continues
        if w.main and (state["step"] > first_step or status == "paused"):
            _checkpoint(adapter, pipe, stepper, cfg, spec, paths, emit, state["step"], time.perf_counter() - start)
        distributed.barrier(w)
        message = (f"Paused at step {state['step']} of {cfg.steps} to fit the GPU time limit; it continues next."
                   if status == "paused" else
                   f"Stopped at step {state['step']} of {cfg.steps} because the studio was asked to shut down "
                   "(SIGTERM); a checkpoint is saved, resume the run to continue.")
        emit(events.Finished(status, state["step"], message))
        return RunResult(paths.root, status, state["step"], None, message)
    if w.main:  # every rank holds the same weights; one writes them
        emit(events.Phase("exporting", "Saving the adapter, exporting and checking its files…", state["step"]))
        _save(adapter, pipe, paths.adapter, cfg, spec, state["step"])
        _checkpoint(adapter, pipe, stepper, cfg, spec, paths, emit, state["step"], time.perf_counter() - start)
        _export(adapter, pipe, paths, emit, state["step"], cfg.resolution)
        if status == "completed":
            if cfg.sample_prompts:
                emit(events.Phase("final_sample", "Drawing the final sample…", state["step"]))
            _samples(pipe, cfg, spec, paths, state["step"], emit)
    distributed.barrier(w)  # no rank returns before the files exist
    message = (f"Cancelled at step {state['step']}; the adapter so far is saved." if status == "cancelled"
               else f"Finished {state['step']} steps.")
    wall_s = time.perf_counter() - state["began"] if resume_from is None else None  # a whole run only
    emit(events.Finished(status, state["step"], message, "adapter", wall_s))
    return RunResult(paths.root, status, state["step"], paths.adapter, message)


class _Clock:
    """The time a run is told before most of it runs. The first step of a process also warms up (allocations,
    kernels), so the second step is the probe: its time times the steps left, plus one sample round's time
    times the rounds left once one was drawn. A new Estimate follows the first sample round, when it is known."""

    def __init__(self, cfg: TrainConfig, first_step: int, emit):
        self.cfg, self.first_step, self.emit = cfg, first_step, emit
        self.last = time.perf_counter()
        self.step_s: float | None = None
        self.sample_s: float | None = None

    def stepped(self, step: int) -> None:
        now, before = time.perf_counter(), self.last
        self.last = now
        if step == self.first_step + 2 and step < self.cfg.steps:
            self.step_s = now - before
            self._tell(step)

    @contextmanager
    def sampling(self, step: int):
        start = time.perf_counter()
        yield
        self.last = time.perf_counter()  # the next step's time excludes the samples
        if self.sample_s is None:
            self.sample_s = self.last - start
            if self.step_s is not None:
                self._tell(step)

    def _tell(self, step: int) -> None:
        cfg, left = self.cfg, self.cfg.steps - step
        rounds = (sum(1 for s in range(step + 1, cfg.steps) if cfg.sample_every and s % cfg.sample_every == 0)
                  + 1) if cfg.sample_prompts else 0  # the rounds to come and the final sample
        seconds = self.step_s * left + (self.sample_s or 0.0) * rounds
        samples = (f" and {rounds} sample round(s) ({self.sample_s:.1f} s each)" if self.sample_s is not None
                   else " (samples not yet timed)" if rounds else "")
        self.emit(events.Estimate(seconds, left, "step", self.step_s,
                                  f"About {events.clock(seconds)} for the {left} steps left ({self.step_s:.2f} s a "
                                  f"step){samples}, then saving and checking the adapter's files."))


def _stopped_before_training(paths: RunPaths, emit, status: str) -> RunResult:
    """Cancel (or SIGTERM) while a new run loads its model and caches latents: no step was trained, so
    there is nothing to save or export, and the accelerator is free at once."""
    message = "Stopped before training step 1; nothing was trained."
    emit(events.Finished(status, 0, message))
    return RunResult(paths.root, status, 0, None, message)


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


def _optimizer(cfg: TrainConfig, params: list, device: str, weight_decay: float):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=weight_decay)
    if device != "cuda":
        raise StudioError("8-bit Adam needs a CUDA GPU; set optimizer to 'adamw' on this machine.")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise StudioError("8-bit Adam needs the bitsandbytes package; `pip install bitsandbytes`, "
                          "or set optimizer to 'adamw'.") from None
    return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=weight_decay)


@torch.no_grad()
def _cache_frozen(pipe, data: ConceptDataset | list[ConceptDataset], device: str, dtype, flips: bool) -> _Frozen:
    """Several datasets (concepts trained jointly) become one list of images and captions."""
    data = data if isinstance(data, list) else [data]
    images = [p for d in data for p in d.pixels]  # (3, h, w) each
    captions = [c for d in data for c in d.captions]
    if len({tuple(p.shape) for p in images}) == 1:
        pixels = torch.stack(images)
        views = [pixels, pixels.flip(-1)] if flips else [pixels]
        encoded = [encode_latents(pipe.vae, v, device, dtype) for v in views]
        mean, std = torch.stack([m for m, _ in encoded]), torch.stack([s for _, s in encoded])
        groups = None
    else:  # aspect-ratio buckets: each image is encoded at its own size
        mean, std = PerImage(), PerImage()
        for p in images:
            posterior = pipe.vae.encode(torch.stack([p, p.flip(-1)] if flips else [p]).to(device, dtype)).latent_dist
            mean.append(posterior.mean.float())
            std.append(posterior.std.float())
        groups = [tuple(m.shape[-2:]) for m in mean]
    text, pooled = encode_text(pipe, tokenize_all(pipe, captions, device))
    frozen = _Frozen(mean, std, text, pipe.vae.config.scaling_factor, pooled, groups=groups)
    frozen.captions, frozen.n_images = captions, len(captions)
    repeats = [r for d in data for r in getattr(d, "repeats", [1] * len(d.captions))]
    frozen.repeats = torch.tensor(repeats, dtype=torch.long)  # one number per image, never a list of slots
    return frozen


ENCODE_BATCH = 8  # images per VAE call when caching latents: 8 x 512 px is ~1 GB of activations on SD 1.5


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, device, dtype, batch: int = ENCODE_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std, float32) of each image, encoded `batch` images at a time: one call
    over a whole dataset or 200 class images would hold all their activations at once."""
    means, stds = [], []
    for start in range(0, len(pixels), batch):
        posterior = vae.encode(pixels[start:start + batch].to(device, dtype)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def _cache_class(pipe, frozen: _Frozen, cfg, specs: list[DatasetSpec], device, dtype, emit, should_stop) -> None:
    """Class images of every class word among the datasets, each paired with its own class prompt."""
    words = list(dict.fromkeys(s.class_word for s in specs))
    files, of = [], []
    for i, word in enumerate(words):
        drawn = prior.class_images(pipe, cfg, word, emit, should_stop)
        if not drawn:
            return  # cancelled before the first class image: the loop stops at once
        files += drawn
        of += [i] * len(drawn)
    frozen.class_mean, frozen.class_std = encode_latents(pipe.vae, load_pixels(files, cfg.resolution), device, dtype)
    prompts = [render(cfg.class_prompt, "", w) for w in words]
    frozen.class_prompts = prompts
    frozen.class_text, frozen.class_pooled = encode_text(pipe, tokenize_all(pipe, prompts, device))
    frozen.class_of = torch.tensor(of)


def _tokenize(pipe, prompts: list[str], device, tokenizer=None) -> torch.Tensor:
    tokenizer = tokenizer or pipe.tokenizer
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids.to(device)


def tokenize_all(pipe, prompts: list[str], device) -> tuple[torch.Tensor, ...]:
    """The prompts as token ids, once per tokenizer of the model (one for SD 1.x/2.x, two for SDXL)."""
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2) if models.is_sdxl(pipe) else (pipe.tokenizer,)
    return tuple(_tokenize(pipe, prompts, device, t) for t in tokenizers)


def encode_text(pipe, ids: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states the UNet cross-attends to, pooled embedding or None), as the pipeline encodes.

    SD 1.x/2.x: the text encoder's last hidden state; no pooled embedding. SDXL (Podell et al. 2023,
    as `StableDiffusionXLPipeline.encode_prompt` with clip_skip=None): both encoders' penultimate
    hidden states, concatenated on the feature axis, and text_encoder_2's projected pooled output.
    """
    if not models.is_sdxl(pipe):
        return pipe.text_encoder(ids[0])[0], None
    states, out = [], None
    for encoder, tokens in zip((pipe.text_encoder, pipe.text_encoder_2), ids):
        out = encoder(tokens, output_hidden_states=True)
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), out.text_embeds


def _encode_prompts(pipe, prompts: list[str], device) -> torch.Tensor:
    return encode_text(pipe, tokenize_all(pipe, prompts, device))[0]


def unet_kwargs(pooled: torch.Tensor | None, resolution: int | tuple[int, int]) -> dict:
    """The UNet's extra inputs: none for SD 1.x/2.x; for SDXL the pooled text and the micro-conditioning
    time ids (original size, crop top-left, target size; each (height, width) in pixels). The studio's
    images are crops already at their training size (a square, or a bucket's (height, width)), so
    original = target and the crop is (0, 0).
    """
    if pooled is None:
        return {}
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    ids = torch.tensor([h, w, 0, 0, h, w], dtype=pooled.dtype,
                       device=pooled.device)
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.expand(len(pooled), -1)}}


def batch_indices(cfg: TrainConfig, n_images: int, step: int, micro: int, slots: torch.Tensor | None = None,
                  groups: list | None = None, repeats: torch.Tensor | None = None) -> torch.Tensor:
    """Images of one micro-batch: shuffled epochs of n_images x repeats, a pure function of the step.

    Per-image balancing from dataset.yaml comes as `repeats` (each image's count) or, equivalently, as
    `slots` (each image listed as often as its count). The work is proportional to the batch, not to
    the epoch: slot s belongs to the first image whose running total of repeats exceeds s, and epochs
    too long to shuffle as a list are shuffled by a keyed permutation (`_permuted`).
    With `groups` (each image's bucket), an image from another bucket than the micro-batch's first is
    swapped for one drawn from the first's bucket, so the batch stacks.
    """
    if slots is not None:
        repeats = torch.bincount(slots, minlength=n_images)
    totals = None if repeats is None else torch.cumsum(repeats, 0)
    n_slots = n_images if totals is None else int(totals[-1])
    per_epoch = n_slots * cfg.repeats
    first = ((step - 1) * cfg.gradient_accumulation_steps + micro) * cfg.batch_size
    picks = []
    for position in range(first, first + cfg.batch_size):
        epoch, offset = divmod(position, per_epoch)
        slot = _permuted(per_epoch, seed_key(cfg.seed * 7919 + epoch), offset) % n_slots
        picks.append(slot if totals is None else int(torch.searchsorted(totals, slot, right=True)))
    if groups is not None and len({groups[p] for p in picks}) > 1:
        same = [i for i in range(n_images) if groups[i] == groups[picks[0]]]
        g = torch.Generator().manual_seed(seed_key(cfg.seed * 7919 + first + 1))
        picks = [p if groups[p] == groups[picks[0]] else same[int(torch.randint(len(same), (1,), generator=g))]
                 for p in picks]
    return torch.tensor(picks)


def seed_key(value: int) -> int:
    """A seed derived from the run's seed, folded into the 64 bits torch.Generator takes (a no-op for
    seeds below ~10**13, so every run made so far draws what it drew before)."""
    return value % (1 << 64)


SHUFFLE_LIST_MAX = 1 << 22  # epochs up to ~4M slots are shuffled as a list (32 MB), longer ones by a keyed permutation


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, key: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(key))


def _permuted(n: int, key: int, index: int) -> int:
    """Position `index` of a shuffle of range(n) seeded by `key`, in time independent of n.

    Short epochs: torch.randperm, computed once per epoch. Long ones: a 4-round Feistel network on
    the smallest square power of two that holds n, cycle-walking until the value falls below n
    (Black & Rogaway 2002, "Ciphers with arbitrary finite domains"); fewer than 4 rounds per value
    on average, since that domain is less than 4 n.
    """
    if n <= SHUFFLE_LIST_MAX:
        return int(_epoch_order(n, key)[index])
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    x = index
    while True:
        left, right = x >> half, x & mask
        for round_ in range(4):
            left, right = right, left ^ (_mix(key, round_, right) & mask)
        x = (left << half) | right
        if x < n:
            return x


def _mix(key: int, round_: int, value: int) -> int:
    """splitmix64 of (key, round, value): the Feistel round function."""
    z = (key * 0x9E3779B97F4A7C15 + round_ * 0xBF58476D1CE4E5B9 + value + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


class _Stepper:
    """One optimizer step: over each micro-batch sample latents and noise, predict, regress; then update."""

    def __init__(self, pipe, frozen: _Frozen, cfg: TrainConfig, device, dtype, optimizer, schedule, params,
                 world: distributed.World | None = None):
        from diffusers import DDPMScheduler

        self.world = world or distributed.World()
        self.pipe, self.unet, self.frozen, self.cfg = pipe, pipe.unet, frozen, cfg
        self.device, self.dtype = device, dtype
        self.optimizer, self.schedule, self.params = optimizer, schedule, params
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        half = device == "cuda" and dtype != torch.float32
        self.autocast = torch.autocast("cuda", dtype=dtype) if half else nullcontext()
        self.scaler = torch.amp.GradScaler("cuda", enabled=half and dtype == torch.float16)

    def __call__(self, step: int) -> float:
        accumulate = self.cfg.gradient_accumulation_steps
        total = 0.0
        for micro in range(accumulate):
            # One CPU generator per (step, micro-batch): the same seed gives the same run on any device.
            g = torch.Generator().manual_seed(seed_key(self.cfg.seed * 1_000_003 + step * 101 + micro))
            loss = self._loss(batch_indices(self.cfg, self.frozen.n_images, step, micro, self.frozen.slots,
                                            self.frozen.groups, self.frozen.repeats), g)
            self.scaler.scale(loss / accumulate).backward()
            total += loss.item() / accumulate
        # Each rank's loss is the mean over its equal share of the global batch, so the mean of the
        # ranks' gradients is the gradient of the global batch's mean loss.
        distributed.average_([p.grad for p in self.params if p.grad is not None], self.world)
        if self.world.parallel:
            reported = torch.tensor([total])
            distributed.average_([reported], self.world)
            total = reported.item()
        if self.cfg.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _loss(self, index: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        f, cfg = self.frozen, self.cfg
        flip = (torch.rand(len(index), generator=g) < cfg.flip_p).long() if f.latent_mean.shape[0] > 1 \
            else torch.zeros(len(index), dtype=torch.long)
        mean, std = f.latent_mean[flip, index], f.latent_std[flip, index]
        with_prior = f.class_mean is not None
        if with_prior:  # as many class images as instance images, in the same UNet call
            picks = torch.randint(0, len(f.class_mean), (len(index),), generator=g)
            mean, std = torch.cat([mean, f.class_mean[picks]]), torch.cat([std, f.class_std[picks]])
        latents = (mean + std * torch.randn(mean.shape, generator=g).to(mean.device)) * f.scaling
        noise = torch.randn(latents.shape, generator=g)
        if cfg.noise_offset:  # a per-channel constant shift (Guttenberg 2023): learns global brightness
            noise = noise + cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=g)
        noise = noise.to(latents.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), generator=g)
        t = t.to(latents.device)
        # Every rank drew the randomness of the whole global batch above; it computes its own rows.
        mine = distributed.shard(len(index), self.world)
        take = torch.cat([mine, mine + len(index)]) if with_prior else mine
        latents, noise, t = latents[take], noise[take], t[take]
        index = index[mine]
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        with self.autocast:
            if f.text is not None:
                text, pooled = f.text[index], None if f.pooled is None else f.pooled[index]
            else:
                text, pooled = encode_text(self.pipe, tuple(ids[index] for ids in f.token_ids))
            if with_prior:
                rows = f.class_of[picks[mine]].to(f.class_text.device)
                if f.class_ids is not None:  # the trained encoder reads the class prompts as it is now
                    class_text, class_pooled = encode_text(self.pipe, tuple(ids[rows] for ids in f.class_ids))
                else:
                    class_text, class_pooled = f.class_text[rows], None if f.class_pooled is None else f.class_pooled[rows]
                text = torch.cat([text, class_text.to(text.dtype)])
                if pooled is not None:
                    pooled = torch.cat([pooled, class_pooled.to(pooled.dtype)])
            pred = self.unet(noisy.to(self.dtype), t, encoder_hidden_states=text,
                             **unet_kwargs(pooled, tuple(s * self.pipe.vae_scale_factor for s in noisy.shape[-2:]))).sample
        weights = min_snr_weights(self.noise_scheduler, t, cfg.min_snr_gamma) if cfg.min_snr_gamma else None
        target = diffusion_target(self.noise_scheduler, latents, noise, t)
        if with_prior:
            return prior_preservation_loss(pred, target, len(index), cfg.prior_loss_weight, weights)
        return instance_loss(pred, target, weights)


def _save(adapter, pipe, out_dir: Path, cfg, spec, step) -> None:
    adapter.save(pipe, out_dir)
    adapters.write_meta(out_dir, AdapterMeta(kind=cfg.method, base_model=cfg.model, token=spec.token,
                                             class_word=spec.class_word, step=step,
                                             rank=getattr(cfg.adapter, "rank", None),
                                             alpha=getattr(cfg.adapter, "alpha", None),
                                             has_scale=adapter.caps.has_scale, vae=cfg.vae,
                                             base_hash=models.base_record(cfg.model)["base_hash"]))


def _checkpoint(adapter, pipe, stepper: _Stepper, cfg, spec, paths: RunPaths, emit, step: int, elapsed: float) -> None:
    """An adapter usable on its own, plus what resume needs (trainable weights, optimizer state)."""
    folder = paths.checkpoint(step)
    try:
        if adapter.caps.saves_model:
            # A whole model per checkpoint would be a second multi-GB copy beside trainable.safetensors,
            # which already holds every trained weight: such checkpoints keep only what resume needs.
            folder.mkdir(parents=True, exist_ok=True)
        else:
            _save(adapter, pipe, folder, cfg, spec, step)
        checkpoints.write_state(folder, pipe, stepper.optimizer, stepper.scaler, step, elapsed)
    except Exception:
        if not (folder / checkpoints.TRAINER).exists():  # half a checkpoint: give its space back
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        raise
    emit(events.Checkpoint(step, str(folder.relative_to(paths.root))))


def _export(adapter, pipe, paths: RunPaths, emit, step: int, resolution: int) -> None:
    """Community-format copies of the final adapter, each read back by an independent loader, and
    stamped with the ss_* / modelspec.* fields the clients show (base model, trigger word, steps...)."""
    from studio.adapters import metadata, probe
    from studio.adapters.checks import write_reports

    # whole-UNet checks at the size the adapter was trained at, not the model's native one
    with models.CONSTRUCTION_LOCK, probe.at_resolution(resolution, getattr(pipe, "vae_scale_factor", 8)):
        reports = adapter.export(paths.adapter, pipe)
    metadata.stamp_reports(paths.adapter, reports, metadata.family_of(pipe))
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
        generator = torch.Generator().manual_seed(seed_key(cfg.seed + i))  # same noise at every step: comparable
        image = pipe(prompt, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance,
                     generator=generator, height=cfg.resolution, width=cfg.resolution).images[0]
        out = paths.sample(step, i)
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
        files.append(str(out.relative_to(paths.root)))
    pipe.unet.train()
    emit(events.Sample(step, tuple(files), tuple(prompts)))
