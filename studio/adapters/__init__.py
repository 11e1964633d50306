"""Adapters: one module per parametrisation, all with the same interface, chosen by name.

Each run's adapter folder holds the weights and `adapter.yaml`, which says what the weights are
(kind, base model, trigger token, class word, whether a scale applies), so the playground and the
evaluation can load any run, the CLI's included, without its config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from studio.adapters import custom, embedding, full, lora, lycoris, pivotal
from studio.errors import StudioError
from studio.paths import ADAPTER_META, recover_folder, write_text_atomically

# kind -> module; a module may serve several kinds (LoRA and DoRA differ only in one flag).
ADAPTERS = {kind: module for module in (lora, lycoris, embedding, pivotal, full, custom) for kind in module.KINDS}

# LoCon (kohya): beyond attention, the ResNet convolutions, the transformer's in/out projections
# and its feed-forward layers. peft matches these names as suffixes of module paths.
LOCON_MODULES = ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def target_modules(cfg) -> list[str]:
    return list(cfg.target_modules) + (LOCON_MODULES if cfg.locon else [])


def set_scales(pipe, names: list[str], scales: list[float]) -> None:
    """Set the strengths of loaded peft adapters (any kind) in place: no weights are reloaded.

    The first call for a set of active adapters goes through diffusers' `set_adapters`, which walks every
    module of the UNet and text encoders; the adapter layers it finds are kept on the pipeline, and while
    the same adapters stay loaded and active a scale change only rescales those layers (what `set_adapters`
    does to each of them), so a slider moves in a few milliseconds with several adapters stacked."""
    key = (tuple(names), _loaded_adapters(pipe))
    layers = _fast_layers(pipe, key)
    if layers is None:
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=scales)
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for part in _adapter_parts(pipe) for m in part.modules() if isinstance(m, BaseTunerLayer)]
        pipe._studio_scale_layers = (key, layers)
        return
    for layer in layers:
        for name, scale in zip(names, scales):
            layer.set_scale(name, scale)


def _adapter_parts(pipe) -> list:
    return [m for m in (getattr(pipe, n, None) for n in ("unet", "text_encoder", "text_encoder_2")) if m is not None]


def _loaded_adapters(pipe) -> tuple:
    """The names of the adapters loaded into each part (changes whenever one is loaded or deleted)."""
    return tuple(tuple(getattr(part, "peft_config", {}) or {}) for part in _adapter_parts(pipe))


def _fast_layers(pipe, key) -> list | None:
    """The adapter layers kept by the last slow call, if the same adapters are loaded and active and
    adapters were not switched off since."""
    kept = getattr(pipe, "_studio_scale_layers", None)
    if kept is None or kept[0] != key or not kept[1]:
        return None
    first = kept[1][0]
    if first.disable_adapters or list(first.active_adapters) != list(key[0]):
        return None
    return kept[1]


@dataclass
class AdapterMeta:
    kind: str
    base_model: str
    token: str
    class_word: str
    step: int
    has_scale: bool = True
    rank: int | None = None
    alpha: float | None = None


def write_meta(adapter_dir: Path, meta: AdapterMeta) -> None:
    write_text_atomically(Path(adapter_dir) / ADAPTER_META, yaml.safe_dump(asdict(meta), sort_keys=False))


def read_meta(adapter_dir: Path) -> AdapterMeta:
    path = Path(adapter_dir) / ADAPTER_META
    if not path.exists():
        raise StudioError(f"'{adapter_dir}' holds no trained adapter (no {ADAPTER_META}); "
                          "pick a run that has finished or been cancelled.")
    return AdapterMeta(**yaml.safe_load(path.read_text(encoding="utf-8")))


def module_for(kind: str):
    if kind not in ADAPTERS:
        raise StudioError(f"Adapter kind '{kind}' is not supported; supported kinds: {', '.join(ADAPTERS)}.")
    return ADAPTERS[kind]


def find_adapter_dir(path: Path) -> Path:
    """Accept a run folder, its adapter/ folder or a checkpoint folder."""
    path = Path(path)
    recover_folder(path / "adapter")  # a kill while the final adapter was being replaced
    if (path / ADAPTER_META).exists():
        return path
    if (path / "adapter" / ADAPTER_META).exists():
        return path / "adapter"
    raise StudioError(f"No trained adapter found in '{path}'; give a run folder whose training has finished.")
