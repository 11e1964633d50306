"""Base models: resolve a reference (hub id, local folder, single-file .safetensors checkpoint, 'builtin',
'tiny', 'builtin-sdxl'), load it, pick device and dtype.

A single-file checkpoint (a community fine-tune in the original layout) is read by studio/single_file.py,
offline, with configs shipped in assets/single-file; an optional separate VAE (file or folder) replaces
the model's own for any kind of base.

'builtin' is the pocket model shipped in assets/pocket-sd: a small Stable Diffusion (VAE, CLIP text
encoder with the real CLIP vocabulary, UNet) trained on the pocket world of 64-px shapes
(pocket/, scripts/train_pocket.py). It follows prompts such as "a big red star on a white
background" and is what the studio uses when no hub can be reached.

'tiny' and 'builtin-sdxl' are tiny SD 1.x and SDXL models with random weights, written as diffusers
folders on first use: they exercise every code path in a fraction of a second (the tests use them),
but their images are noise. All of them load through the same ``from_pretrained`` call as real
checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.paths import staging, swap_into_place

log = logging.getLogger(__name__)

BUILTIN = "builtin"  # the shipped pocket model
TINY = "tiny"  # a tiny random-weight SD 1.x model for tests
BUILTIN_SDXL = "builtin-sdxl"  # a tiny SDXL (two text encoders, pooled text, time ids) for tests
DEFAULT_HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS / "clip-tokenizer"
POCKET_DIR = ASSETS / "pocket-sd"
# Bump when the shipped pocket weights change: caches keyed on the built-in model (class images) are redrawn.
# scripts/train_pocket.py stamps it into assets/pocket-sd/studio_builtin.json; the training code (pocket/)
# stays outside the studio package, and this constant is all the runtime needs of it.
POCKET_VERSION = 4
# Bump when the tiny model's definition changes, so cached copies are rewritten.
TINY_VERSION = 1
BUILTIN_MARKER = "studio_builtin.json"
BUILTIN_RESOLUTION = 64
BUILTIN_SDXL_VERSION = 1

# model_index.json `_class_name` -> the pipeline the studio loads it with. Family "sdxl" means two
# text encoders, a pooled text embedding and size/crop time ids as extra UNet inputs.
PIPELINES = {"StableDiffusionPipeline": "StableDiffusionPipeline",
             "StableDiffusionXLPipeline": "StableDiffusionXLPipeline"}


@dataclass(frozen=True)
class ModelRef:
    """A resolved base model: what the user named, where it loads from, and a notice to show."""

    name: str  # as recorded in configs: 'builtin', a hub id, an absolute folder or file
    source: str  # what from_pretrained receives (for a single file: the file)
    notice: str | None = None
    vae: str = ""  # a separate VAE (absolute file or folder) replacing the model's own; "" keeps it

    @property
    def is_file(self) -> bool:
        return Path(self.source).is_file()


def hub_reachable(timeout_s: float = 1.5) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def cache_root() -> Path:
    """The studio's machine-wide cache (generated models, class images): $STUDIO_CACHE or ~/.cache/concept-studio."""
    cache = os.environ.get("STUDIO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "concept-studio")
    return Path(cache)


def tiny_dir() -> Path:
    """Where the tiny model is written on first use (one copy per machine, not per workspace)."""
    return cache_root() / "tiny-model"


def builtin_sdxl_dir() -> Path:
    return cache_root() / "builtin-sdxl-model"


def builtin_version(name: str) -> str | None:
    """A key that changes when a built-in model's weights change (None for other models)."""
    return {BUILTIN: f"pocket-v{POCKET_VERSION}", TINY: f"tiny-v{TINY_VERSION}",
            BUILTIN_SDXL: f"builtin-sdxl-v{BUILTIN_SDXL_VERSION}"}.get(name)


def is_sdxl(pipe) -> bool:
    """SDXL-family pipelines carry a second text encoder (OpenCLIP bigG in the real model)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def resolve(name: str | None, vae: str | None = None) -> ModelRef:
    """Turn what the user typed into something loadable; empty means the default. `vae`: a separate VAE
    file or folder to use instead of the model's own. Reads no weights (a file's header at most)."""
    ref = _resolve_model(name)
    vae_path = resolve_vae(vae)
    if ref.is_file and not vae_path:
        from studio import single_file

        if not single_file.has_vae(single_file.read_header(Path(ref.source))):
            raise StudioError(f"File '{ref.name}' has no VAE of its own; name the VAE its model page recommends "
                              "(--vae FILE, or the VAE field).")
    return ModelRef(ref.name, ref.source, ref.notice, vae_path) if vae_path else ref


def resolve_vae(vae: str | None) -> str:
    """A separate VAE as an absolute path ('' for none), checked without reading weights."""
    vae = (vae or "").strip()
    if not vae:
        return ""
    from studio import single_file

    path = Path(vae).expanduser()
    if not path.exists():
        raise StudioError(f"VAE '{vae}' does not exist; give a VAE .safetensors file or a diffusers VAE folder.")
    single_file.vae_header(str(path))  # a pickle, a truncated file or no VAE at all: one sentence
    return str(path.resolve())


def _resolve_model(name: str | None) -> ModelRef:
    name = (name or "").strip()
    if not name:
        if hub_reachable():
            return ModelRef(DEFAULT_HUB_MODEL, DEFAULT_HUB_MODEL)
        ref = resolve(BUILTIN)
        notice = "The model hub cannot be reached, so the studio uses the built-in pocket model (64-px shapes)."
        return ModelRef(ref.name, ref.source, notice)
    if name == BUILTIN:
        return ModelRef(BUILTIN, str(builtin_dir()))
    if name == TINY:
        ensure_tiny(tiny_dir())
        return ModelRef(TINY, str(tiny_dir()))
    if name == BUILTIN_SDXL:
        ensure_builtin_sdxl(builtin_sdxl_dir())
        return ModelRef(BUILTIN_SDXL, str(builtin_sdxl_dir()))
    path = Path(name).expanduser()
    if path.is_file() or path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return _resolve_file(name, path)
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


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".pkl")


def _resolve_file(name: str, path: Path) -> ModelRef:
    """A single-file checkpoint, checked from its header: the family must be one the studio loads."""
    from studio import single_file

    if not path.exists():
        raise StudioError(f"Checkpoint file '{name}' does not exist; check the path.")
    header = single_file.read_header(path)  # a pickle, damaged or truncated file: one sentence
    single_file.family(header)  # a LoRA, an embedding, a refiner, an unknown architecture: one sentence
    notice = f"Base model {path.name}: {single_file.describe(header)}."
    return ModelRef(str(path.resolve()), str(path.resolve()), notice)


def base_record(name: str) -> dict:
    """What a run records about its base model so it can be reopened: for a single file its path and
    content hash (single_file.content_hash); for anything else just the name."""
    path = Path(name)
    if path.is_file():
        from studio import single_file

        return {"base_model": str(path), "base_hash": single_file.content_hash(path)}
    return {"base_model": name, "base_hash": ""}


def check_recorded(base_model: str, base_hash: str, what: str) -> None:
    """One sentence when the single file `what` (e.g. "run 'x'") was trained on is missing or changed."""
    if not base_hash:
        return
    from studio import single_file

    path = Path(base_model)
    if not path.is_file():
        raise StudioError(f"The checkpoint '{base_model}' that {what} was trained on is no longer there; put the file "
                          "back at that path, or choose another base model and retrain.")
    if single_file.content_hash(path) != base_hash:
        raise StudioError(f"The checkpoint '{base_model}' has changed since {what} was trained on it; put the "
                          "original file back, or retrain on the new one.")


# ---------------------------------------------------------------------------- built-in models

def builtin_dir() -> Path:
    """The shipped pocket model's folder; one sentence if a checkout lacks it."""
    if not (POCKET_DIR / "model_index.json").exists():
        raise StudioError(f"The built-in model is missing from {POCKET_DIR}; restore it with `git checkout -- assets`, "
                          "or retrain it with `python scripts/train_pocket.py`.")
    return POCKET_DIR


def write_builtin(out_dir: Path) -> Path:
    """A copy of the built-in pocket model as a diffusers folder (what `python -m studio builtin-model` writes)."""
    import shutil

    out_dir = Path(out_dir)
    tmp = staging(out_dir)
    shutil.copytree(builtin_dir(), tmp)
    return swap_into_place(tmp, out_dir)


def _tiny_components() -> dict[str, Any]:
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


def write_tiny(out_dir: Path) -> Path:
    """Write the tiny model as a diffusers folder (deterministic: same seeds, same weights)."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    tmp = staging(out_dir)
    quiet_libraries()
    pipe = StableDiffusionPipeline(**_tiny_components(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / BUILTIN_MARKER).write_text(json.dumps({"version": TINY_VERSION}))
    return swap_into_place(tmp, out_dir)  # a half-written model is never picked up


_builtin_lock = threading.Lock()


@contextmanager
def cache_lock(folder: Path):
    """Exclusive across threads and processes (the app and a CLI run may both write a generated model)."""
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


def ensure_tiny(out_dir: Path) -> Path:
    with cache_lock(out_dir):
        return out_dir if is_current(out_dir, TINY_VERSION) else write_tiny(out_dir)


def _builtin_sdxl_components() -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    # Shaped like diffusers' SDXL test components. The two encoders have different widths (32, 48) so
    # that a mix-up of their hidden states cannot go unnoticed. The UNet's extra embedding reads
    # 6 time ids x addition_time_embed_dim (8) + the pooled text (text_encoder_2's projection, 48) = 96.
    time_dim, hidden_1, hidden_2 = 8, 32, 48
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=BUILTIN_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, transformer_layers_per_block=(1, 2), norm_num_groups=1,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden_2,
        cross_attention_dim=hidden_1 + hidden_2)
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=BUILTIN_RESOLUTION,
                        scaling_factor=0.13025)  # SDXL's VAE scaling factor
    encoders = []
    for seed, hidden, cls in ((2, hidden_1, CLIPTextModel), (3, hidden_2, CLIPTextModelWithProjection)):
        torch.manual_seed(seed)
        encoders.append(cls(CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407, projection_dim=hidden, hidden_act="gelu")))
    # SDXL's scheduler: Euler over the SD scaled-linear betas, "leading" timestep spacing.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer_2 = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!")  # as SDXL's second tokenizer
    return dict(unet=unet, vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, scheduler=scheduler)


def write_builtin_sdxl(out_dir: Path) -> Path:
    """Write the built-in SDXL model as a diffusers folder (deterministic: same seeds, same weights)."""
    from diffusers import StableDiffusionXLPipeline

    out_dir = Path(out_dir)
    tmp = staging(out_dir)
    quiet_libraries()
    pipe = StableDiffusionXLPipeline(**_builtin_sdxl_components(), add_watermarker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / BUILTIN_MARKER).write_text(json.dumps({"version": BUILTIN_SDXL_VERSION}))
    return swap_into_place(tmp, out_dir)


def ensure_builtin_sdxl(out_dir: Path) -> Path:
    with cache_lock(out_dir):
        return out_dir if is_current(out_dir, BUILTIN_SDXL_VERSION) else write_builtin_sdxl(out_dir)


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

def pipeline_class(ref: ModelRef):
    """The diffusers pipeline class named by the model's model_index.json (SD 1.x/2.x or SDXL)."""
    import diffusers

    try:
        name = diffusers.DiffusionPipeline.load_config(ref.source).get("_class_name", "")
    except (OSError, ValueError) as exc:
        _raise_unloadable(ref, exc)
    if name not in PIPELINES:
        raise StudioError(f"Model '{ref.name}' is a {name or 'pipeline of unknown type'}, which the studio does not "
                          "train or render; choose a Stable Diffusion 1.x/2.x or SDXL model.")
    return getattr(diffusers, PIPELINES[name])


# diffusers loads models inside accelerate's `init_empty_weights`, which swaps nn.Module.register_parameter
# for the whole process: a parameter another thread creates meanwhile (a LoRA layer of a training run,
# a CLIP being loaded for an evaluation) lands on the meta device and breaks later. Everything that
# loads or builds model layers holds this lock, so a training job, playground renders and evaluations
# can share one process. Only construction is serialized; forward and backward passes run freely.
CONSTRUCTION_LOCK = threading.RLock()


def load_pipeline(ref: ModelRef, device: str = "cpu", dtype=None):
    """A StableDiffusionPipeline or StableDiffusionXLPipeline for the reference (chosen by its
    model_index.json), or one sentence saying why it cannot load."""
    with CONSTRUCTION_LOCK:
        return _load_pipeline(ref, device, dtype)


def _load_pipeline(ref: ModelRef, device: str, dtype):
    import torch

    quiet_libraries()
    dtype = dtype or torch.float32
    if ref.is_file:
        pipe = _load_file(ref, dtype)
    else:
        cls = pipeline_class(ref)
        # SD 1.x ships a safety checker the studio does not run; SDXL has an optional invisible watermark.
        extra = (dict(add_watermarker=False) if cls.__name__ == "StableDiffusionXLPipeline"
                 else dict(safety_checker=None, requires_safety_checker=False))
        if ref.vae:
            from studio import single_file

            sdxl = cls.__name__ == "StableDiffusionXLPipeline"
            extra["vae"] = _guarded_vae(lambda: single_file.load_vae(ref.vae, dtype, "sdxl" if sdxl else "sd1"), ref)
        try:
            pipe = cls.from_pretrained(ref.source, dtype=dtype, use_safetensors=True, **extra)
        except (OSError, ValueError) as exc:
            _raise_unloadable(ref, exc)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_file(ref: ModelRef, dtype):
    from studio import single_file

    try:
        return single_file.load(Path(ref.source), dtype, vae=ref.vae)
    except StudioError:
        raise
    except Exception as exc:  # diffusers' reader refused the file (a layout the configs did not foresee): logged
        log.warning("single-file checkpoint %s did not load", ref.source, exc_info=True)
        raise StudioError(f"Checkpoint '{ref.name}' could not be loaded ({_first_line(exc)}); it may be damaged or "
                          "of an architecture the studio does not know, so download it again or choose another.") from None


def _guarded_vae(load, ref: ModelRef):
    try:
        return load()
    except StudioError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise StudioError(f"VAE '{ref.vae}' could not be loaded ({_first_line(exc)}); give a VAE of the same "
                          "family as the model (SD 1.x/2.x or SDXL).") from None


def _raise_unloadable(ref: ModelRef, exc: BaseException):
    if Path(ref.source).exists():
        raise StudioError(f"Model folder '{ref.name}' could not be loaded ({_first_line(exc)}); "
                          "check that it is a complete diffusers folder with safetensors weights.") from None
    raise StudioError(f"Model '{ref.name}' could not be loaded from the model hub (offline, "
                      "unknown id, or no safetensors weights); check the id, or use 'builtin'.") from None


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


def _version(path: str) -> tuple | None:
    """(size, mtime) of a file, so a checkpoint replaced on disk is loaded afresh; None otherwise."""
    if not path or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


class PipelineCache:
    """Keeps the last `size` inference pipelines asked for loaded (least recently used goes first);
    thread-safe."""

    def __init__(self, size: int = 1):
        self._lock = threading.Lock()
        self._size = max(1, size)
        self._pipes: dict = {}  # key -> pipeline, oldest use first

    def get(self, ref: ModelRef, device: str, dtype):
        key = (ref.source, ref.vae, _version(ref.source), _version(ref.vae), device, str(dtype))
        with self._lock:
            if key in self._pipes:
                self._pipes[key] = self._pipes.pop(key)  # now the most recent
                return self._pipes[key]
            while len(self._pipes) >= self._size:  # free before loading the next
                self._pipes.pop(next(iter(self._pipes)))
            self._pipes[key] = load_pipeline(ref, device, dtype)
            return self._pipes[key]

    def holds(self, pipe) -> bool:
        with self._lock:
            return any(p is pipe for p in self._pipes.values())

    def clear(self) -> None:
        with self._lock:
            self._pipes.clear()
