"""The adapter contract: what a method module provides, and what it declares about itself.

A method is one module under studio/adapters plus one line in the registry (studio.adapters.REGISTRY).
The module provides:

    KINDS: tuple[str, ...]                       the method names it serves ("lora", "dora")
    CAPABILITIES: dict[str, Capabilities]        per kind: how it scales, what it trains and saves
    SETTINGS: dict[str, type]                    per kind: a dataclass of the method's own settings
    attach(pipe, setup: Setup) -> None           freeze the model, add what trains
    trainable_parameters(pipe) -> list           the parameters the optimizer steps
    save(pipe, out_dir) -> Path                  the adapter's own files (its native format)
    load_into(pipe, adapter_dir, name) -> None   load a saved adapter under `name` (the Playground)

and, where the method has them:

    unload(pipe, adapter_dir) -> None            undo load_into beyond peft's delete_adapters
    set_scale(pipe, adapter_dir, scale) -> None  scaling "own": the method sets its strength itself
    scale_layer(layer, name, scale) -> bool      a peft layer whose strength peft does not set (OFT)
    export(adapter_dir, pipe) -> list            community-format files, each with its ExportReport
    client_files(kind, folder, name, token)      which of them ComfyUI / A1111 load, under which name
    diffusers_code(kind, folder, token, base, scale, prompt) -> str   lines that load it in diffusers

The training loop, the Playground and the evaluation ask a `Method` (the module behind one kind, its
capabilities and settings class) and never name a method: a new method needs no edit there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from studio.fields import check, setting
from studio.paths import LORA_WEIGHTS

Scaling = Literal["peft", "own", "none"]


@dataclass(frozen=True)
class Capabilities:
    """What a kind of adapter is, as the loop and the Playground need to know it.

    scaling: "peft" (peft's set_adapters scales its layers), "own" (the module's set_scale does),
        "none" (on or off: at scale 0 it is unloaded).
    zero_is_base: at peft scale 0 it adds exactly nothing (the update is multiplied by the scale);
        False where a learned part does not scale (DoRA's magnitude): it is switched off at 0 instead.
    trains_text: the text encoders' output changes during training whatever the settings (new token
        rows): captions are encoded every step, not cached.
    text_encoder_option: the method has a `train_text_encoder` setting.
    adds_tokens: it adds trigger tokens to the tokenizer(s).
    saves_model: its adapter is a whole model (a checkpoint keeps only what resume needs).
    weights_file: the file in the adapter folder whose change means a new version (the Playground
        watches it).
    weight_decay: AdamW's decay for its parameters (0 where decay would move frozen rows).
    """
    scaling: Scaling
    zero_is_base: bool = True
    trains_text: bool = False
    text_encoder_option: bool = False
    adds_tokens: bool = False
    saves_model: bool = False
    weights_file: str = LORA_WEIGHTS
    weight_decay: float = 1e-2

    @property
    def has_scale(self) -> bool:
        return self.scaling != "none"


@dataclass(frozen=True)
class Concept:
    token: str  # the trigger word
    class_word: str


@dataclass(frozen=True)
class Setup:
    """What `attach` is told: the method, its own settings, the concepts it learns and the run's model
    and resolution. Adapters read nothing else (no dataset files, no other method's settings)."""
    kind: str
    settings: Any  # an instance of the kind's SETTINGS class
    concepts: tuple[Concept, ...]  # the run's dataset first, then each extra dataset
    model: str = ""
    resolution: int = 0


class AdapterModule(Protocol):
    """The module side of the contract (see the module docstring for the optional functions)."""
    KINDS: tuple[str, ...]
    CAPABILITIES: dict[str, Capabilities]
    SETTINGS: dict[str, type]

    def attach(self, pipe, setup: Setup) -> None: ...

    def trainable_parameters(self, pipe) -> list: ...

    def save(self, pipe, out_dir: Path) -> Path: ...

    def load_into(self, pipe, adapter_dir: Path, name: str) -> None: ...


@dataclass(frozen=True)
class NoSettings:
    """A method without settings of its own."""


# The UNet layers a low-rank adapter adapts by default (attention projections), and with LoCon (kohya)
# beyond attention: the ResNet convolutions, the transformer's in/out projections and its feed-forward
# layers. peft matches these names as suffixes of module paths.
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
LOCON_MODULES = ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@dataclass
class LowRank:
    """Settings every low-rank adapter of the UNet shares (LoRA, DoRA, LoHa, LoKr, pivotal tuning's LoRA)."""
    rank: int = setting("Adapter rank r (LoHa: of each Hadamard factor): size and capacity.", 8, label="Rank",
                        bounds=(1, 1024))
    alpha: float = setting("Adapter alpha; the update is scaled by alpha / rank.", 8.0, label="Alpha",
                           bounds=(0, 1e6), above=0)
    target_modules: list[str] = setting("UNet module names that get adapters (attention projections by default).",
                                        factory=lambda: list(ATTENTION), label="Target modules")
    locon: bool = setting("Also adapt the ResNet convolutions and feed-forward layers (LoCon), not only attention.",
                          False, label="LoCon: adapt convolutions too")

    def __post_init__(self) -> None:
        check(self)
        if not self.target_modules:
            from studio.errors import StudioError

            raise StudioError("Setting 'target_modules' must name at least one module, e.g. to_q, to_k, to_v, to_out.0.")

    def modules(self) -> list[str]:
        """The module names peft targets: the chosen ones, and LoCon's with `locon`."""
        return list(self.target_modules) + (LOCON_MODULES if self.locon else [])


@dataclass(frozen=True)
class Method:
    """One registered kind: its module, its capabilities and its settings class. The optional parts of
    the contract are answered here (a method without `export` exports nothing)."""
    kind: str
    module: Any
    caps: Capabilities
    settings: type

    def attach(self, pipe, setup: Setup) -> None:
        self.module.attach(pipe, setup)

    def trainable_parameters(self, pipe) -> list:
        return self.module.trainable_parameters(pipe)

    def save(self, pipe, out_dir: Path) -> Path:
        return self.module.save(pipe, out_dir)

    def load_into(self, pipe, adapter_dir: Path, name: str) -> None:
        self.module.load_into(pipe, adapter_dir, name)

    def unload(self, pipe, adapter_dir: Path) -> None:
        if hasattr(self.module, "unload"):
            self.module.unload(pipe, adapter_dir)

    def set_scale(self, pipe, adapter_dir: Path, scale: float) -> None:
        if self.caps.scaling == "own":
            self.module.set_scale(pipe, adapter_dir, scale)

    def export(self, adapter_dir: Path, pipe) -> list:
        export = getattr(self.module, "export", None)
        return export(adapter_dir, pipe) if export is not None else []

    def client_files(self, folder: Path, name: str, token: str) -> list[tuple]:
        """(file, name to give the copy, role: 'lora' | 'embedding' | 'checkpoint') for ComfyUI and A1111."""
        files = getattr(self.module, "client_files", None)
        return files(self.kind, folder, name, token) if files is not None else []

    def diffusers_code(self, folder: Path, token: str, base: str, scale: float, prompt: str) -> str:
        code = getattr(self.module, "diffusers_code", None)
        if code is None:
            return pipeline_code(base, f"# the run's files are in {folder}", prompt)
        return code(self.kind, folder, token, base, scale, prompt)

    def setting_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.settings)]

    def trains_text_weights(self, settings) -> bool:
        """The text encoders' own weights train (the method's `train_text_encoder` option is on)."""
        return self.caps.text_encoder_option and bool(getattr(settings, "train_text_encoder", False))

    def trains_text(self, settings) -> bool:
        """The captions' encoding changes during training (new token rows, or the encoders' weights)."""
        return self.caps.trains_text or self.trains_text_weights(settings)


def methods_of(module) -> dict[str, Method]:
    """The registry entries of one module: one Method per kind it declares, each checked for the whole
    contract (a module missing a part fails at import, not at a user's first run)."""
    missing = [name for name in ("KINDS", "CAPABILITIES", "SETTINGS", "attach", "trainable_parameters", "save",
                                 "load_into") if not hasattr(module, name)]
    if missing:
        raise TypeError(f"adapter module {module.__name__} lacks {', '.join(missing)}")
    out = {}
    for kind in module.KINDS:
        caps, settings = module.CAPABILITIES[kind], module.SETTINGS.get(kind, NoSettings)
        if caps.scaling == "own" and not hasattr(module, "set_scale"):
            raise TypeError(f"adapter kind {kind!r} scales itself but {module.__name__} has no set_scale")
        if not dataclasses.is_dataclass(settings):
            raise TypeError(f"settings of adapter kind {kind!r} must be a dataclass")
        out[kind] = Method(kind, module, caps, settings)
    return out


# ---------------------------------------------------------------------------- taking a run home

def pipeline_code(base: str, body: str, prompt: str) -> str:
    """diffusers lines around a method's loading lines: the base pipeline, then an image."""
    return f'pipe = AutoPipelineForText2Image.from_pretrained("{base}")\n{body}\nimage = pipe("{prompt}").images[0]'


def existing(files: list[tuple]) -> list[tuple]:
    """The (source, name, role) entries whose source file exists."""
    return [f for f in files if Path(f[0]).is_file()]
