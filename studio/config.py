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

Optimizer = Literal["adamw", "adamw8bit"]
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
LRSchedule = Literal["constant", "cosine"]


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    return fields.setting(text, default, factory)


def _methods() -> dict:
    from studio.adapters import REGISTRY

    return REGISTRY


METHOD_HELP = ("What trains: 'lora' (Hu et al. 2021), 'dora' (weight-decomposed LoRA, Liu et al. 2024), 'loha' / "
               "'lokr' (Hadamard / Kronecker products, LyCORIS, Yeh et al. 2024), 'embedding' (textual inversion: "
               "one new token's embedding, Gal et al. 2022), 'pivotal' (a new token's embedding and a LoRA "
               "together), 'full' (the whole UNet, as DreamBooth does; add prior_preservation for the paper's "
               "objective), 'custom' (Custom Diffusion, Kumari et al. 2023: the UNet's cross-attention K/V weights "
               "and a new token per concept; add prior_preservation and extra_datasets for the paper's "
               "multi-concept training), or any other registered method (studio.adapters.REGISTRY).")


@dataclass
class ObjectiveSettings:
    """What the model is trained against, beside the instance loss."""
    prior_preservation: bool = _help("Class-specific prior-preservation loss (Ruiz et al. 2023): also train on "
                                     "images of the class, so 'a dog' still draws any dog.", False)
    prior_loss_weight: float = _help("Weight of the prior-preservation loss (1.0 in the DreamBooth paper).", 1.0)
    class_prompt: str = _help("Prompt of the class images; {class} is filled in.", "a photo of {class}")
    num_class_images: int = _help("Class images to use (the paper: 200-300 at 1000 steps; 100 is common).", 100)
    class_data_dir: str = _help("A folder of your own class images; empty: the base model draws them (cached).", "")
    class_image_steps: int = _help("Denoising steps per generated class image.", 25)
    min_snr_gamma: float = _help("Min-SNR loss weighting (Hang et al. 2023; 5 is their choice); 0 turns it off.", 0.0)
    noise_offset: float = _help("Offset noise (Guttenberg 2023) for darker darks and brighter brights; ~0.05, 0 is off.", 0.0)


@dataclass
class LoopSettings:
    """How the one training loop runs: data, optimizer, schedule, precision, samples and checkpoints."""
    resolution: int = _help("Training resolution in pixels; 0 takes the dataset's.", 0)
    flip_p: float = _help("Probability of a horizontal flip per image per step (0 for asymmetric subjects, e.g. text).", 0.0)
    repeats: int = _help("How many times each image counts per epoch (weights images when mixing datasets).", 1)
    learning_rate: float = _help("AdamW learning rate.", 1e-4)
    lr_schedule: LRSchedule = _help("Learning-rate schedule after warm-up.", "constant")
    lr_warmup_steps: int = _help("Linear warm-up from 0 over this many steps.", 0)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables).", 1.0)
    steps: int = _help("Number of optimizer steps.", 200)
    batch_size: int = _help("Images per step.", 1)
    gradient_accumulation_steps: int = _help("Average gradients over this many batches per optimizer step.", 1)
    gradient_checkpointing: bool = _help("Recompute UNet activations in the backward pass: less memory, ~30% slower.", False)
    fit_memory: bool = _help("On a GPU, first probe two steps and a sample; if they do not fit, switch on "
                             "gradient checkpointing, 8-bit Adam, then smaller batches with accumulation.", True)
    optimizer: Optimizer = _help("'adamw8bit' (bitsandbytes, GPU only) stores optimizer state in 8 bits.", "adamw")
    seed: int = _help("Seed for weights init, data order and noise.", 0)
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


SECTIONS = {"objective": ObjectiveSettings, "loop": LoopSettings}


@dataclass(init=False)
class TrainConfig:
    """A training run's settings: what it starts from, then three sections. `adapter` holds the chosen
    method's own settings (its module's SETTINGS class), `objective` what it is trained against, `loop`
    how the loop runs.

    Every setting also has one flat name, unique across the sections: presets, `--set key=value`, the Train
    tab and `cfg.steps` all use it. TrainConfig(**values) takes flat names or whole sections; a setting of
    another method than the chosen one is an error naming it.
    """
    model: str = _help("Base model: a hub id, a local diffusers folder, a single-file .safetensors checkpoint "
                       "(SD 1.x, SD 2.x or SDXL, original layout), or 'builtin'. Empty: the default.", "")
    vae: str = _help("A separate VAE (.safetensors file or diffusers folder) instead of the base model's own; "
                     "empty keeps the model's.", "")
    dataset: str = _help("Dataset folder written by the Dataset tab or `studio prep`.", "")
    method: str = _help(METHOD_HELP, "lora")
    extra_datasets: list[str] = _help("More dataset folders trained jointly with 'dataset', each with its own "
                                      "trigger word and class word (one run, several concepts).", factory=list)
    adapter: Any = _help("The method's own settings.", None)
    objective: ObjectiveSettings = _help("What it is trained against.", factory=ObjectiveSettings)
    loop: LoopSettings = _help("How the loop runs.", factory=LoopSettings)

    def __init__(self, **values: Any) -> None:
        top = {f.name for f in dataclasses.fields(self) if f.name not in ("adapter", *SECTIONS)}
        method = values.get("method", "lora")
        if method not in _methods():
            raise StudioError(f"Setting 'method' must be one of {', '.join(repr(m) for m in _methods())}, got {method!r}.")
        adapter_cls = _methods()[method].settings
        parts: dict[str, dict] = {"adapter": {}, **{name: {} for name in SECTIONS}}
        for key in ("adapter", *SECTIONS):  # whole sections first (a saved config, dataclasses.replace)
            section = values.get(key)
            if section is not None:
                parts[key].update(section if isinstance(section, dict) else dataclasses.asdict(section))
        own = {"adapter": set(fields.types_of(adapter_cls)), **{k: set(fields.types_of(c)) for k, c in SECTIONS.items()}}
        for key, value in values.items():  # then flat names, which win
            if key in top or key in parts:
                continue
            section = next((name for name, names in own.items() if key in names), None)
            if section is None:
                raise StudioError(_not_here(key, method))
            parts[section][key] = value
        for key, value in parts["adapter"].items():
            if key not in own["adapter"]:
                raise StudioError(_not_here(key, method))
        for key in top:
            default = dataclasses.fields(self)[[f.name for f in dataclasses.fields(self)].index(key)]
            object.__setattr__(self, key, values[key] if key in values else
                               (default.default_factory() if default.default is dataclasses.MISSING else default.default))
        object.__setattr__(self, "adapter", adapter_cls(**parts["adapter"]))
        for name, cls in SECTIONS.items():
            object.__setattr__(self, name, cls(**parts[name]))
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        """The flat name of a setting in a section (called only when no attribute has the name)."""
        if name.startswith("__") or name in ("adapter", *SECTIONS):
            raise AttributeError(name)
        for section in ("adapter", *SECTIONS):
            part = self.__dict__.get(section)
            if part is not None and name in {f.name for f in dataclasses.fields(part)}:
                return getattr(part, name)
        raise AttributeError(f"TrainConfig has no setting {name!r} for method {self.__dict__.get('method')!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        for section in ("adapter", *SECTIONS):
            part = self.__dict__.get(section)
            if part is not None and name in {f.name for f in dataclasses.fields(part)}:
                setattr(part, name, value)
                return
        object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        for name, tp in fields.types_of(TrainConfig).items():
            if name not in ("adapter", *SECTIONS) and not fields.type_ok(getattr(self, name), tp):
                raise StudioError(f"Setting '{name}' must be {fields.describe(tp)}, got {getattr(self, name)!r}.")
        for section in SECTIONS:
            fields.check_types(getattr(self, section))
        positive = ("learning_rate", "steps", "batch_size", "sample_steps", "gradient_accumulation_steps", "repeats",
                    "num_class_images", "class_image_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise StudioError(f"Setting '{name}' must be greater than 0, got {getattr(self, name)!r}.")
        for name in ("lr_warmup_steps", "sample_every", "checkpoint_every", "max_grad_norm", "seed",
                     "min_snr_gamma", "noise_offset", "prior_loss_weight", "sample_guidance"):
            if getattr(self, name) < 0:
                raise StudioError(f"Setting '{name}' must be 0 or more, got {getattr(self, name)!r}.")
        if not 0.0 <= self.flip_p <= 1.0:
            raise StudioError(f"Setting 'flip_p' is a probability between 0 and 1, got {self.flip_p!r}.")
        if self.resolution and (self.resolution < 32 or self.resolution % 8):
            raise StudioError(
                f"Setting 'resolution' must be 0 or a multiple of 8 of at least 32, got {self.resolution}.")
        limits.check_train_settings(self)  # upper bounds, finiteness (nan, inf), the seed's 64 bits

    def to_dict(self) -> dict[str, Any]:
        """Every setting under its flat name: the top, then the method's, the objective's and the loop's."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("adapter", *SECTIONS)}
        for section in ("adapter", *SECTIONS):
            out.update(dataclasses.asdict(getattr(self, section)))
        return out

    def to_sections(self) -> dict[str, Any]:
        """The layout config.yaml is written in: the top-level settings, then one mapping per section."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("adapter", *SECTIONS)}
        for section in ("adapter", *SECTIONS):
            out[section] = dataclasses.asdict(getattr(self, section))
        return out


def _not_here(key: str, method: str) -> str:
    owners = [kind for kind, m in _methods().items() if key in m.setting_names()]
    if not owners:
        known = ", ".join(sorted(all_setting_names()))
        return f"Unknown setting '{key}'; known settings are: {known}."
    listed = ", ".join(owners[:-1]) + (" and " if len(owners) > 1 else "") + owners[-1]
    return (f"Setting '{key}' works with the {listed} method{'s' if len(owners) > 1 else ''}, not '{method}'; "
            f"remove it or choose {'one of those' if len(owners) > 1 else 'that method'}.")


def _setting_classes() -> list[type]:
    """Where settings are declared: the top of TrainConfig, its sections, every method's settings."""
    seen, out = set(), []
    for cls in [*SECTIONS.values(), *(m.settings for m in _methods().values())]:
        if cls not in seen:
            seen.add(cls)
            out.append(cls)
    return out


def all_setting_names() -> list[str]:
    """Every flat setting name any method takes (the union over methods), in declaration order."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("adapter", *SECTIONS)]
    for cls in _setting_classes():
        names += [f.name for f in dataclasses.fields(cls) if f.name not in names]
    return names


def _field(name: str):
    for f in dataclasses.fields(TrainConfig):
        if f.name == name and f.name not in ("adapter", *SECTIONS):
            return TrainConfig, f
    for cls in _setting_classes():
        for f in dataclasses.fields(cls):
            if f.name == name:
                return cls, f
    raise KeyError(name)


def applies(name: str, method: str) -> bool:
    """Whether setting `name` is one the method takes (top-level, objective and loop settings always are)."""
    cls, _ = _field(name)
    return cls is TrainConfig or cls in SECTIONS.values() or name in _methods()[method].setting_names()


def method_setting_names() -> list[str]:
    """The settings some method declares for itself (not the top-level, objective and loop ones)."""
    common = {f.name for f in dataclasses.fields(TrainConfig)} | {n for c in SECTIONS.values() for n in fields.types_of(c)}
    return [name for name in all_setting_names() if name not in common]


def method_defaults() -> dict[str, Any]:
    """Each method setting's default, from the first method that declares it."""
    out: dict[str, Any] = {}
    for method in _methods().values():
        for name, value in fields.defaults_of(method.settings).items():
            out.setdefault(name, value)
    return out


def label(name: str) -> str:
    cls, f = _field(name)
    return f.metadata.get("label") or name.replace("_", " ").capitalize()


def field_help(method: str | None = None) -> dict[str, str]:
    """Help text of every setting of `method` (default: the default config's); `all_field_help` for every method."""
    names = TrainConfig(method=method or "lora").to_dict()
    return {name: help_text for name, help_text in all_field_help().items() if name in names}


def all_field_help() -> dict[str, str]:
    return {name: _field(name)[1].metadata.get("help", "") for name in all_setting_names()}


def _field_types() -> dict[str, Any]:
    out = {}
    for name in all_setting_names():
        cls, _ = _field(name)
        out[name] = fields.types_of(cls)[name]
    out["method"] = Literal[tuple(_methods())]  # the registered methods are its choices
    return out


def field_kind(name: str) -> tuple[type, tuple]:
    """(int | float | bool | str | list, the allowed values for a Literal field): what a form control needs."""
    return fields.kind(_field_types()[name])


def coerce(name: str, text: str) -> Any:
    """Turn the text of `--set name=text` into the field's type, or explain why not."""
    types_ = _field_types()
    if name not in types_:
        raise StudioError(f"Unknown setting '{name}'; known settings are: {', '.join(sorted(types_))}.")
    return fields.coerce(types_[name], name, text)


def merge(base: dict[str, Any], updates: dict[str, Any], source: str) -> dict[str, Any]:
    known = set(_field_types())
    unknown = sorted(set(updates) - known - {"adapter", *SECTIONS})  # whole sections are taken too
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
    """config.yaml in sections (a dict is written as it is)."""
    data = cfg.to_sections() if isinstance(cfg, TrainConfig) else cfg
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, yaml.safe_dump(data, sort_keys=False))  # resume rewrites it: never half a file


def load_run_config(path: Path) -> dict[str, Any]:
    """A run's config.yaml as flat settings: the sectioned layout, or the flat one runs were saved in before
    the config had sections (either loads: resume and the Playground read runs of both)."""
    return flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


def flatten(data: dict[str, Any]) -> dict[str, Any]:
    """Sections merged into one flat mapping of settings (a flat mapping is returned as it is)."""
    out = {k: v for k, v in data.items() if k not in ("adapter", *SECTIONS)}
    for section in ("adapter", *SECTIONS):
        if isinstance(data.get(section), dict):
            out.update(data[section])
    return out


def from_saved(data: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a saved config (either layout). A flat config of an older run holds every setting of
    every method (its defaults); those of other methods than its own are dropped, as they never applied."""
    flat = flatten(data)
    method = flat.get("method", "lora")
    if method in _methods():
        flat = {k: v for k, v in flat.items() if k not in all_setting_names() or applies(k, method)}
    return TrainConfig(**flat)
