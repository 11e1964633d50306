"""The settings of an evaluation: `EvalConfig`, its values as a person types them (a CLI flag, a form box),
and the file an evaluation folder keeps them in (evaluation.yaml, read back by rescore, the report and the tab).

No heavy imports (no torch): the CLI builds its `evaluate` flags, and the Evaluate tab its controls, from
EvalConfig's fields, at every start.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from studio import fields
from studio.errors import StudioError
from studio.evaluate.prompts import DEFAULT_CONTEXTS, DEFAULT_KINDS, KINDS

SETTINGS = "evaluation.yaml"
WHAT = "Evaluation setting"  # how an error sentence names a field: "Evaluation setting 'seeds' ..."
SCALE_RANGE = (-2.0, 3.0)  # the adapter scales a sweep may hold (lowest, highest)

Kind = Literal["training", "generalization", "agnostic", "context"]  # prompts.KINDS (a test holds them equal)
Checkpoints = Literal["final", "all"]


@dataclass
class EvalConfig:
    dataset: str = fields.setting("The dataset (folder) the runs were trained on: its images are the concept's "
                                  "reference, its captions the training prompts.", label="Dataset")
    runs: list[str] = fields.setting("The runs (run folders) to evaluate; the base model is always drawn beside "
                                     "them as a baseline.", factory=list, label="Runs")
    model: str = fields.setting("Base model: a hub id, a local diffusers folder, a single-file .safetensors "
                                "checkpoint (SD 1.x/2.x/SDXL), or 'builtin'; empty: the base the first run was "
                                "trained on.", "", label="Base model")
    vae: str = fields.setting("A separate VAE (.safetensors file or diffusers folder) for the base model; empty: "
                              "the run's, or the model's own.", "", label="VAE")
    clip: str = fields.setting("CLIP id or folder, or 'builtin'; empty: openai/clip-vit-base-patch32 online, the "
                               "built-in pocket CLIP offline.", "", label="CLIP model")
    dino: str = fields.setting("DINO id or folder (DINOv2 too), or 'none' to skip it; empty: facebook/dino-vits16 "
                               "online, none offline.", "", label="DINO model")
    kinds: list[Kind] = fields.setting(
        "Prompt kinds: training (the dataset's captions), generalization (DreamBench and your own prompts), "
        "agnostic (without the trigger: leaks and drift), context (pairs with and without the concept).",
        factory=lambda: list(DEFAULT_KINDS), label="Prompt kinds")
    prompts: list[str] = fields.setting("Your own generalization prompts, with {token} and {class}.", factory=list,
                                        label="Your prompts (one per line, with {token} and {class})")
    contexts: list[str] = fields.setting("Contexts such as 'in a forest': each drawn with the concept and without "
                                         "it (Guralnick et al.).", factory=lambda: list(DEFAULT_CONTEXTS),
                                         label="Contexts (one per line)")
    per_kind: int = fields.setting("Prompts of each kind; 0 takes them all (the 25 DreamBench prompts, every "
                                   "caption, every context).", 4, label="Prompts per kind (0: all)")
    seeds: int = fields.setting("Images per prompt, drawn at seeds 0 to n-1.", 2, label="Images per prompt")
    steps: int = fields.setting("Denoising steps of every image.", 20, label="Denoising steps")
    guidance: float = fields.setting("Classifier-free guidance scale of every image.", 7.5, label="Guidance")
    scales: list[float] = fields.setting(
        f"Adapter scales to sweep, separated by commas, e.g. 0, 0.5, 1, 1.5 (each between {SCALE_RANGE[0]:g} and "
        f"{SCALE_RANGE[1]:g}); an adapter without a scale is drawn at 1.", factory=lambda: [1.0], label="Scales")
    checkpoints: Checkpoints = fields.setting("'final': each run's final adapter; 'all': every checkpoint the run "
                                              "saved too.", "final", label="Checkpoints")

    def __post_init__(self) -> None:
        # the contents of the two lists first: their sentences say more than check_types' 'must be a list'
        if isinstance(self.kinds, (list, tuple)):
            unknown = [k for k in self.kinds if k not in KINDS]
            if unknown or not self.kinds:
                raise StudioError(f"{WHAT} 'kinds' takes some of {', '.join(KINDS)}; got "
                                  f"{', '.join(map(str, unknown)) or 'none'}.")
        low, high = SCALE_RANGE
        if isinstance(self.scales, (list, tuple)) and (not self.scales or any(
                not fields.type_ok(s, float) or not low <= s <= high for s in self.scales)):
            raise StudioError(f"{WHAT} 'scales' needs numbers between {low:g} and {high:g}, got {self.scales!r}.")
        fields.check_types(self, WHAT)
        for name in ("seeds", "steps"):
            if getattr(self, name) < 1:
                raise StudioError(f"{WHAT} '{name}' must be a whole number of at least 1, got {getattr(self, name)!r}.")
        if self.per_kind < 0:
            raise StudioError(f"{WHAT} 'per_kind' must be 0 (all) or more, got {self.per_kind!r}.")
        if not self.guidance >= 0:  # nan too
            raise StudioError(f"{WHAT} 'guidance' must be 0 or more, got {self.guidance!r}.")
        self.scales = sorted(dict.fromkeys(float(s) for s in self.scales))


def parse_list(name: str, text: str, label: str = "") -> list:
    """The value of EvalConfig's list field `name` typed as text (a CLI flag, a form box): values separated by
    commas or semicolons, or a YAML list; empty text is the field's default. Text that is not a list of the
    field's type is one sentence naming `label` (the flag, or the form's label); by default the setting."""
    tp = fields.types_of(EvalConfig)[name]
    (inner,) = typing.get_args(tp)
    text = str(text if text is not None else "").strip()
    if not text:
        return fields.defaults_of(EvalConfig)[name]
    try:
        return fields.coerce(tp, name, text.replace(";", ","), WHAT)
    except StudioError:
        pass
    what = "numbers" if inner in (int, float) else "values"
    example = "0, 0.5, 1" if inner in (int, float) else ", ".join(map(str, fields.defaults_of(EvalConfig)[name][:2]))
    raise StudioError(f"{label or f'{WHAT} {name!r}'} takes {what} separated by commas, such as {example}; "
                      f"got {text!r}.")


def text_of(value: Any) -> str:
    """A list setting's value as parse_list reads it back: '0.5, 1' (numbers as short as they print)."""
    if isinstance(value, (list, tuple)):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return "" if value is None else str(value)


def write_settings(out_dir: Path, data: dict) -> None:
    """evaluation.yaml: the config (EvalConfig as a dict), the encoders used and the points swept."""
    (Path(out_dir) / SETTINGS).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def read_settings(out_dir: Path) -> dict:
    return yaml.safe_load((Path(out_dir) / SETTINGS).read_text(encoding="utf-8"))
