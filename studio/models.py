"""Base models: resolve a reference (hub id, local folder, 'builtin'), load it, pick device and dtype.

The built-in model is a small Stable-Diffusion-architecture model written as an ordinary diffusers
folder and loaded through the same ``from_pretrained`` call as real checkpoints, so every code path
that serves SD 1.5 serves it too.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.paths import staging, swap_into_place

BUILTIN = "builtin"
DEFAULT_HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS / "clip-tokenizer"
# Bump when the built-in model's definition changes, so cached copies are rewritten.
BUILTIN_VERSION = 1
BUILTIN_MARKER = "studio_builtin.json"
BUILTIN_RESOLUTION = 64


@dataclass(frozen=True)
class ModelRef:
    """A resolved base model: what the user named, where it loads from, and a notice to show."""

    name: str  # as recorded in configs: 'builtin', a hub id, or an absolute folder
    source: str  # what from_pretrained receives
    notice: str | None = None


def hub_reachable(timeout_s: float = 1.5) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def builtin_dir() -> Path:
    """Where the built-in model is written on first use (one copy per machine, not per workspace)."""
    cache = os.environ.get("STUDIO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "concept-studio")
    return Path(cache) / "builtin-model"


def resolve(name: str | None, builtin: Path | None = None) -> ModelRef:
    """Turn what the user typed into something loadable; empty means the default."""
    name = (name or "").strip()
    builtin_dir_ = Path(builtin) if builtin else builtin_dir()
    if not name:
        if hub_reachable():
            return ModelRef(DEFAULT_HUB_MODEL, DEFAULT_HUB_MODEL)
        ref = resolve(BUILTIN, builtin_dir_)
        notice = "The model hub cannot be reached, so the studio uses the built-in model."
        return ModelRef(ref.name, ref.source, notice)
    if name == BUILTIN:
        ensure_builtin(builtin_dir_)
        return ModelRef(BUILTIN, str(builtin_dir_))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists():
            raise StudioError(f"Folder '{name}' is not a diffusers model (it has no model_index.json); "
                              "name a diffusers folder, a hub id, or 'builtin'.")
        return ModelRef(str(path.resolve()), str(path.resolve()))
    parts = name.split("/")
    if len(parts) != 2 or not all(parts):
        raise StudioError(f"Model '{name}' is not 'builtin', an existing folder, or a hub id like "
                          f"'{DEFAULT_HUB_MODEL}'; check the spelling.")
    return ModelRef(name, name)


# ---------------------------------------------------------------------------- built-in model

def _builtin_components() -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # Sizes follow diffusers' own test models: large enough to have every SD block type,
    # small enough that a LoRA step takes a fraction of a second on two CPU cores.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=BUILTIN_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8)
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=BUILTIN_RESOLUTION)
    torch.manual_seed(2)
    text_config = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407, projection_dim=32)
    text_encoder = CLIPTextModel(text_config)
    # The scheduler of SD 1.x (scaled-linear betas 0.00085..0.012 over 1000 steps).
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def write_builtin(out_dir: Path) -> Path:
    """Write the built-in model as a diffusers folder (deterministic: same seeds, same weights)."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    tmp = staging(out_dir)
    quiet_libraries()
    pipe = StableDiffusionPipeline(**_builtin_components(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / BUILTIN_MARKER).write_text(json.dumps({"version": BUILTIN_VERSION}))
    return swap_into_place(tmp, out_dir)  # a half-written model is never picked up


_builtin_lock = threading.Lock()


@contextmanager
def cache_lock(folder: Path):
    """Exclusive across threads and processes (the app and a CLI run may both write a built-in model)."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with _builtin_lock, open(folder.with_name(folder.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_current(folder: Path, version: int) -> bool:
    marker = folder / BUILTIN_MARKER
    return marker.exists() and json.loads(marker.read_text()).get("version") == version


def ensure_builtin(out_dir: Path) -> Path:
    with cache_lock(out_dir):
        return out_dir if is_current(out_dir, BUILTIN_VERSION) else write_builtin(out_dir)


# ---------------------------------------------------------------------------- device and dtype

def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(requested: str, device: str):
    """(weight dtype, notice): half precision only where a GPU exists."""
    import torch

    if device != "cuda":
        notice = None if requested in ("auto", "no") else (
            f"Mixed precision '{requested}' needs a GPU; training in full precision on the CPU.")
        return torch.float32, notice
    if requested == "no":
        return torch.float32, None
    if requested == "bf16" or (requested == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, None
    return torch.float16, None


# ---------------------------------------------------------------------------- loading

def load_pipeline(ref: ModelRef, device: str = "cpu", dtype=None):
    """A StableDiffusionPipeline for the reference, or one sentence saying why it cannot load."""
    import torch
    from diffusers import StableDiffusionPipeline

    quiet_libraries()
    dtype = dtype or torch.float32
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            ref.source, dtype=dtype, safety_checker=None, requires_safety_checker=False,
            use_safetensors=True)
    except (OSError, ValueError) as exc:
        if Path(ref.source).exists():
            raise StudioError(f"Model folder '{ref.name}' could not be loaded ({_first_line(exc)}); "
                              "check that it is a complete diffusers folder with safetensors weights.") from None
        raise StudioError(f"Model '{ref.name}' could not be loaded from the model hub (offline, "
                          "unknown id, or no safetensors weights); check the id, or use 'builtin'.") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def quiet_libraries() -> None:
    """No per-component progress bars in the terminal; the studio reports its own progress."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else exc.__class__.__name__


class PipelineCache:
    """Keeps one inference pipeline loaded (the last asked for); thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key = None
        self._pipe = None

    def get(self, ref: ModelRef, device: str, dtype):
        key = (ref.source, device, str(dtype))
        with self._lock:
            if self._key != key:
                self._pipe = None  # free the old one before loading the next
                self._pipe = load_pipeline(ref, device, dtype)
                self._key = key
            return self._pipe

    def clear(self) -> None:
        with self._lock:
            self._key, self._pipe = None, None
