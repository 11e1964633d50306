"""What the studio accepts: the range of every number a user sets, and the size of what they upload.

Each bound is wide enough for any real use and narrow enough that no value can take the machine down
(a Python list of 10**12 repeat slots, a loop over 10**9 batch indices, 10**6 denoising steps). Every
refusal is one sentence naming the setting, the allowed range and the value given.
"""

from __future__ import annotations

import math

from studio.errors import StudioError

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed; 2**64 overflows
MAX_STEPS = 100_000  # optimizer steps: DreamBooth uses ~1,000, a long LoRA run 10,000
MAX_DENOISE_STEPS = 1000  # SD's schedulers have 1,000 training timesteps: more steps than that is an error

# TrainConfig field -> (lowest, highest). Fields not listed here have no numeric range (text, choices); a
# method's own settings declare theirs where they are defined (studio.fields.setting's bounds).
TRAIN_RANGES: dict[str, tuple[float, float]] = {
    "steps": (1, MAX_STEPS),
    "batch_size": (1, 256),  # images per step; SD 1.5 at 512 px fits ~64 on an 80 GB GPU
    "gradient_accumulation_steps": (1, 1024),
    "repeats": (1, 1000),
    "learning_rate": (0, 1.0),  # and greater than 0: AdamW diverges well below 1; 0, nan and inf never train
    "lr_warmup_steps": (0, MAX_STEPS),
    "max_grad_norm": (0, 1e6),
    "min_snr_gamma": (0, 1000),
    "noise_offset": (0, 1),
    "prior_loss_weight": (0, 1000),
    "num_class_images": (1, 10_000),
    "class_image_steps": (1, MAX_DENOISE_STEPS),
    "sample_steps": (1, MAX_DENOISE_STEPS),
    "sample_every": (0, MAX_STEPS),
    "checkpoint_every": (0, MAX_STEPS),
    "checkpoint_minutes": (0, 24 * 60),
    "seed": (0, SEED_MAX),
    "flip_p": (0, 1),
}
MAX_RESOLUTION = 2048  # pixels: SDXL trains at 1024

# Uploads (the Dataset tab and the file route of a running studio)
MAX_UPLOAD_MB = 100  # per file: a 48-Mpx phone photo as PNG is ~60 MB
MAX_IMPORT_IMAGES = 200  # photos per import: a concept needs 3-20, a style a few hundred
MAX_CAPTION_BYTES = 16 * 1024  # CLIP reads 77 tokens (~300 characters); 16 KB is far beyond any caption
REPEATS_PER_IMAGE_MAX = 1000  # dataset.yaml's per-image repeats
UPLOAD_KEEP_S = 6 * 3600  # Gradio's copies of uploads and shown files are deleted when older than this
CLEAN_EVERY_S = 600  # and looked for this often


def _number(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def check_range(name: str, value, low: float, high: float, label: str | None = None) -> None:
    """One sentence if `value` is not a finite number in [low, high]."""
    what = f"Setting '{name}'" if label is None else label
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StudioError(f"{what} must be a number from {_number(low)} to {_number(high)}, got {value!r}.")
    if not math.isfinite(value):
        raise StudioError(f"{what} must be a finite number from {_number(low)} to {_number(high)}, got {value!r}.")
    if value < low or value > high:
        raise StudioError(f"{what} must be from {_number(low)} to {_number(high)}, got {value!r}.")


def check_train_settings(cfg) -> None:
    """Every numeric TrainConfig field inside its range (called from TrainConfig.__post_init__)."""
    for name, (low, high) in TRAIN_RANGES.items():
        if hasattr(cfg, name):
            check_range(name, getattr(cfg, name), low, high)
    if cfg.learning_rate <= 0:
        raise StudioError(f"Setting 'learning_rate' must be greater than 0, got {cfg.learning_rate!r}.")
    if cfg.resolution and (cfg.resolution < 32 or cfg.resolution % 8 or cfg.resolution > MAX_RESOLUTION):
        raise StudioError(f"Setting 'resolution' must be 0 or a multiple of 8 from 32 to {MAX_RESOLUTION}, "
                          f"got {cfg.resolution}.")


def check_render(steps, seed, guidance, size: int = 0) -> None:
    """The settings of one image: one sentence per bad value, before any model is loaded."""
    check_range("steps", steps, 1, MAX_DENOISE_STEPS, "Denoising steps")
    if isinstance(steps, float) and not steps.is_integer():
        raise StudioError(f"Denoising steps must be a whole number, got {steps!r}.")
    check_range("seed", seed, 0, SEED_MAX, "The seed")
    check_range("guidance", guidance, 0, 100, "Guidance")
    if size and (size < 32 or size % 8 or size > MAX_RESOLUTION):
        raise StudioError(f"The image size must be 0 (the model's own) or a multiple of 8 from 32 to "
                          f"{MAX_RESOLUTION}, got {size}.")


def check_import_count(n_images: int) -> None:
    if n_images > MAX_IMPORT_IMAGES:
        raise StudioError(f"{n_images} photos were given and one import takes at most {MAX_IMPORT_IMAGES}; "
                          "import them in smaller groups.")


def read_caption(path, name: str | None = None) -> str:
    """A caption file's text, or one sentence when it is larger than any caption."""
    from pathlib import Path

    path = Path(path)
    size = path.stat().st_size
    if size > MAX_CAPTION_BYTES:
        raise StudioError(f"Caption file '{name or path.name}' is {size / 1024:,.0f} KB and a caption may be at most "
                          f"{MAX_CAPTION_BYTES // 1024} KB (the text encoder reads ~300 characters); shorten it.")
    return path.read_text(encoding="utf-8", errors="replace")
