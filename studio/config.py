"""Typed training configuration: defaults here, presets (YAML) merged over them, then overrides.

Unknown keys are errors (a misspelt key that is silently ignored is a feature never applied), and
every error names the field and the bad value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from studio import fields, limits
from studio.errors import StudioError
from studio.paths import write_text_atomically

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

Method = Literal["lora", "dora", "loha", "lokr", "embedding", "pivotal", "full", "custom"]
Optimizer = Literal["adamw", "adamw8bit"]
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
LRSchedule = Literal["constant", "cosine"]


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    return fields.setting(text, default, factory)


@dataclass
class TrainConfig:
    model: str = _help("Base model: a hub id, a local diffusers folder, a single-file .safetensors checkpoint "
                       "(SD 1.x, SD 2.x or SDXL, original layout), or 'builtin'. Empty: the default.", "")
    vae: str = _help("A separate VAE (.safetensors file or diffusers folder) instead of the base model's own; "
                     "empty keeps the model's.", "")
    dataset: str = _help("Dataset folder written by the Dataset tab or `studio prep`.", "")
    method: Method = _help("What trains: 'lora' (Hu et al. 2021), 'dora' (weight-decomposed LoRA, Liu et al. "
                           "2024), 'loha' / 'lokr' (Hadamard / Kronecker products, LyCORIS, Yeh et al. 2024), "
                           "'embedding' (textual inversion: one new token's embedding, Gal et al. 2022), "
                           "'pivotal' (a new token's embedding and a LoRA together), 'full' (the whole UNet, "
                           "as DreamBooth does; add prior_preservation for the paper's objective), 'custom' (Custom "
                           "Diffusion, Kumari et al. 2023: the UNet's cross-attention K/V weights and a new "
                           "token per concept; add prior_preservation and extra_datasets for the paper's "
                           "multi-concept training).", "lora")
    extra_datasets: list[str] = _help("More dataset folders trained jointly with 'dataset', each with its own "
                                      "trigger word and class word (one run, several concepts).", factory=list)
    initializer_token: str = _help("Textual inversion: the word the new token's embedding starts from; "
                                   "empty takes the class word's last word.", "")
    rank: int = _help("Adapter rank r (LoHa: of each Hadamard factor): size and capacity.", 8)
    alpha: float = _help("Adapter alpha; the update is scaled by alpha / rank.", 8.0)
    target_modules: list[str] = _help("UNet module names that get adapters (attention projections by default).",
                                      factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_text_encoder: bool = _help("LoRA/DoRA: also adapt the text encoder's attention (q, k, v, out); full "
                                     "(DreamBooth): fine-tune the whole text encoder too. Learns how the trigger "
                                     "word is read, at more memory per step.", False)
    extract_rank: int = _help("Full fine-tunes (DreamBooth): also write a kohya LoRA of this rank extracted from "
                              "the difference to the base model (truncated SVD, as kohya's "
                              "extract_lora_from_models.py does), a small file to share, with how much its output "
                              "differs from the fine-tune in the export report; 0 writes none. 32-128 is common.", 0)
    locon: bool = _help("Also adapt the ResNet convolutions and feed-forward layers (LoCon), not only attention.", False)
    lokr_factor: int = _help("LoKr: factor of the Kronecker decomposition; -1 picks the most square split.", -1)
    min_snr_gamma: float = _help("Min-SNR loss weighting (Hang et al. 2023; 5 is their choice); 0 turns it off.", 0.0)
    noise_offset: float = _help("Offset noise (Guttenberg 2023) for darker darks and brighter brights; ~0.05, 0 is off.", 0.0)
    gradient_accumulation_steps: int = _help("Average gradients over this many batches per optimizer step.", 1)
    gradient_checkpointing: bool = _help("Recompute UNet activations in the backward pass: less memory, ~30% slower.", False)
    fit_memory: bool = _help("On a GPU, first probe two steps and a sample; if they do not fit, switch on "
                             "gradient checkpointing, 8-bit Adam, then smaller batches with accumulation.", True)
    flip_p: float = _help("Probability of a horizontal flip per image per step (0 for asymmetric subjects, e.g. text).", 0.0)
    repeats: int = _help("How many times each image counts per epoch (weights images when mixing datasets).", 1)
    optimizer: Optimizer = _help("'adamw8bit' (bitsandbytes, GPU only) stores optimizer state in 8 bits.", "adamw")
    prior_preservation: bool = _help("Class-specific prior-preservation loss (Ruiz et al. 2023): also train on "
                                     "images of the class, so 'a dog' still draws any dog.", False)
    prior_loss_weight: float = _help("Weight of the prior-preservation loss (1.0 in the DreamBooth paper).", 1.0)
    class_prompt: str = _help("Prompt of the class images; {class} is filled in.", "a photo of {class}")
    num_class_images: int = _help("Class images to use (the paper: 200-300 at 1000 steps; 100 is common).", 100)
    class_data_dir: str = _help("A folder of your own class images; empty: the base model draws them (cached).", "")
    class_image_steps: int = _help("Denoising steps per generated class image.", 25)
    learning_rate: float = _help("AdamW learning rate.", 1e-4)
    lr_schedule: LRSchedule = _help("Learning-rate schedule after warm-up.", "constant")
    lr_warmup_steps: int = _help("Linear warm-up from 0 over this many steps.", 0)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables).", 1.0)
    steps: int = _help("Number of optimizer steps.", 200)
    batch_size: int = _help("Images per step.", 1)
    seed: int = _help("Seed for weights init, data order and noise.", 0)
    resolution: int = _help("Training resolution in pixels; 0 takes the dataset's.", 0)
    mixed_precision: MixedPrecision = _help(
        "'auto': bf16 on GPUs that support it, else fp16 on GPU, full precision on CPU.", "auto")
    sample_every: int = _help("Render sample images every N steps (0: only at the end).", 50)
    sample_prompts: list[str] = _help("Prompts for samples; {token} and {class} are filled in.",
                                      factory=lambda: ["a photo of {token} {class}"])
    sample_steps: int = _help("Denoising steps per sample image.", 20)
    sample_guidance: float = _help("Classifier-free guidance of the sample images (7.5 is SD's usual; small "
                                   "models such as the built-in one draw better at about 5).", 7.5)
    checkpoint_every: int = _help("Save a checkpoint every N steps (0: only by time, and the final adapter).", 0)
    checkpoint_minutes: float = _help("Also save a checkpoint once this many minutes have passed since the last "
                                      "one, so a run killed mid-way resumes from at most this far back (0: off).", 5.0)

    def __post_init__(self) -> None:
        _check_types(self)
        positive = ("rank", "alpha", "learning_rate", "steps", "batch_size", "sample_steps",
                    "gradient_accumulation_steps", "repeats", "num_class_images", "class_image_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise StudioError(f"Setting '{name}' must be greater than 0, got {getattr(self, name)!r}.")
        for name in ("lr_warmup_steps", "sample_every", "checkpoint_every", "max_grad_norm", "seed",
                     "min_snr_gamma", "noise_offset", "prior_loss_weight", "sample_guidance"):
            if getattr(self, name) < 0:
                raise StudioError(f"Setting '{name}' must be 0 or more, got {getattr(self, name)!r}.")
        if not 0.0 <= self.flip_p <= 1.0:
            raise StudioError(f"Setting 'flip_p' is a probability between 0 and 1, got {self.flip_p!r}.")
        if not self.target_modules:
            raise StudioError("Setting 'target_modules' must name at least one module, e.g. to_q, to_k, to_v, to_out.0.")
        if self.resolution and (self.resolution < 32 or self.resolution % 8):
            raise StudioError(
                f"Setting 'resolution' must be 0 or a multiple of 8 of at least 32, got {self.resolution}.")
        limits.check_train_settings(self)  # upper bounds, finiteness (nan, inf), the seed's 64 bits
        if self.extract_rank and self.method != "full":
            raise StudioError(f"Setting 'extract_rank' extracts a LoRA from a full fine-tune, not from method "
                              f"'{self.method}'; set method to 'full' or extract_rank to 0.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_help() -> dict[str, str]:
    return fields.help_of(TrainConfig)


def _field_types() -> dict[str, Any]:
    return fields.types_of(TrainConfig)


def field_kind(name: str) -> tuple[type, tuple]:
    """(int | float | bool | str | list, the allowed values for a Literal field): what a form control needs."""
    return fields.kind(_field_types()[name])


def _check_types(cfg: TrainConfig) -> None:
    fields.check_types(cfg)


def coerce(name: str, text: str) -> Any:
    """Turn the text of `--set name=text` into the field's type, or explain why not."""
    types_ = _field_types()
    if name not in types_:
        raise StudioError(f"Unknown setting '{name}'; known settings are: {', '.join(sorted(types_))}.")
    return fields.coerce(types_[name], name, text)


def merge(base: dict[str, Any], updates: dict[str, Any], source: str) -> dict[str, Any]:
    known = set(_field_types())
    unknown = sorted(set(updates) - known)
    if unknown:
        raise StudioError(f"Unknown setting '{unknown[0]}' in {source}; known settings are: {', '.join(sorted(known))}.")
    return {**base, **updates}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise StudioError(f"Preset '{name_or_path}' was not found; available presets: {', '.join(list_presets())}.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise StudioError(f"Preset file {path} is not valid YAML ({exc.__class__.__name__}); fix its syntax.") from None
    if not isinstance(data, dict):
        raise StudioError(f"Preset file {path} must hold 'key: value' lines.")
    return data


def build_config(preset: str | None = None, values: dict[str, Any] | None = None,
                 overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the preset, then explicit values, then `key=value` overrides, checked at each layer."""
    merged: dict[str, Any] = {}
    if preset:
        merged = merge(merged, load_preset(preset), f"preset '{preset}'")
    merged = merge(merged, values or {}, "the given settings")
    for item in overrides or []:
        if "=" not in item:
            raise StudioError(f"Override '{item}' must look like key=value.")
        key, text = item.split("=", 1)
        merged = merge(merged, {key.strip(): coerce(key.strip(), text.strip())}, "--set")
    return TrainConfig(**merged)


def save_config(cfg: TrainConfig | dict[str, Any], path: Path) -> None:
    data = cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, yaml.safe_dump(data, sort_keys=False))  # resume rewrites it: never half a file


def load_run_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
