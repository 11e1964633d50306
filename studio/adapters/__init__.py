"""Adapters: one module per parametrisation, all keeping one contract (studio.adapters.base), chosen by name.

Each run's adapter folder holds the weights and `adapter.yaml`, which says what the weights are
(kind, base model, trigger token, class word, whether a scale applies), so the playground and the
evaluation can load any run, the CLI's included, without its config.

A new method is one module and one entry in REGISTRY below; the training loop, the Playground, the
config and the UI find its kinds, capabilities and settings here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from studio.adapters import custom, embedding, full, lora, lycoris, oft, pivotal
from studio.adapters.base import ATTENTION, LOCON_MODULES, Capabilities, Concept, Method, Setup, methods_of
from studio.errors import StudioError
from studio.paths import ADAPTER_META, recover_folder, write_text_atomically

# kind -> Method; a module may serve several kinds (LoRA and DoRA differ only in one flag).
REGISTRY: dict[str, Method] = {kind: method for module in (lora, lycoris, oft, embedding, pivotal, full, custom)
                               for kind, method in methods_of(module).items()}
ADAPTERS = {kind: method.module for kind, method in REGISTRY.items()}  # kind -> module
# Peft layers whose strength peft does not set (its set_scale ignores them): each module's
# `scale_layer(layer, name, scale) -> bool` sets it, and says whether the layer was one of its own.
LAYER_SCALERS = [m.scale_layer for m in dict.fromkeys(ADAPTERS.values()) if hasattr(m, "scale_layer")]

__all__ = ["ATTENTION", "LOCON_MODULES", "Capabilities", "Concept", "Method", "REGISTRY", "Setup", "get",
           "module_for", "setup_for"]


def get(kind: str) -> Method:
    if kind not in REGISTRY:
        raise StudioError(f"Adapter kind '{kind}' is not supported; supported kinds: {', '.join(REGISTRY)}.")
    return REGISTRY[kind]


def setup_for(cfg) -> Setup:
    """What `attach` gets for a training config: the method's settings and the concepts of the run's
    dataset(s), read here once so that no adapter reads dataset files itself."""
    from studio.data.dataset import load_dataset

    specs = [load_dataset(Path(d)) for d in [cfg.dataset, *cfg.extra_datasets]]
    return Setup(kind=cfg.method, settings=cfg.adapter, concepts=tuple(Concept(s.token, s.class_word) for s in specs),
                 model=cfg.model, resolution=cfg.resolution)


def set_scales(pipe, names: list[str], scales: list[float]) -> None:
    """Set the strengths of loaded peft adapters (any kind) in place: no weights are reloaded.

    The first call for a set of active adapters goes through diffusers' `set_adapters`, which walks every
    module of the UNet and text encoders. What it did to each adapter layer (scaling = scale * alpha / r,
    peft's formula, in peft's order) is kept on the pipeline, checked against the values peft set, and
    while the same adapters stay loaded and active a scale change only rewrites those numbers, so a
    slider moves in about a millisecond with several adapters stacked."""
    key = (tuple(names), _loaded_adapters(pipe))
    entries = _fast_entries(pipe, key)
    if entries is None:
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=scales)
        pipe._studio_scale_entries = (key, _scale_entries(pipe, names, scales))
        return
    for scaling, layer, index, numerator, denominator in entries:
        if scaling is None:
            layer.set_scale(names[index], scales[index])
        elif callable(scaling):  # a layer its own adapter module scales (LAYER_SCALERS)
            scaling(layer, names[index], scales[index])
        else:
            scaling[names[index]] = scales[index] * numerator / denominator


def _scale_entries(pipe, names: list[str], scales: list[float]) -> list[tuple]:
    """(scaling dict, layer, adapter index, alpha, r or sqrt(r)) for every adapter in every adapter layer;
    where the kept formula does not reproduce what peft set, (None, layer, index, ...) and the layer's
    own set_scale is used instead; for a layer an adapter module scales itself (LAYER_SCALERS), (its
    scale_layer, layer, index, ...), the scale being set as the layer is found."""
    import math

    from peft.tuners.tuners_utils import BaseTunerLayer

    entries = []
    for part in _adapter_parts(pipe):
        for layer in part.modules():
            if not isinstance(layer, BaseTunerLayer):
                continue
            scaling = getattr(layer, "scaling", None)
            for index, name in enumerate(names):
                own = next((f for f in LAYER_SCALERS if f(layer, name, scales[index])), None)  # set as found
                if own is not None:
                    entries.append((own, layer, index, None, None))
                    continue
                if not isinstance(scaling, dict) or name not in scaling:
                    continue
                if name in getattr(layer, "lora_alpha", {}):  # LoRA, DoRA
                    r = layer.r[name]
                    entry = (scaling, layer, index, layer.lora_alpha[name],
                             math.sqrt(r) if layer.use_rslora.get(name, False) else r)
                elif name in getattr(layer, "alpha", {}):  # LoHa, LoKr
                    entry = (scaling, layer, index, layer.alpha[name], layer.r[name])
                else:
                    entry = (None, layer, index, None, None)
                if entry[0] is not None and scaling[name] != scales[index] * entry[3] / entry[4]:
                    entry = (None, layer, index, None, None)
                entries.append(entry)
    return entries


def _adapter_parts(pipe) -> list:
    return [m for m in (getattr(pipe, n, None) for n in ("unet", "text_encoder", "text_encoder_2")) if m is not None]


def _loaded_adapters(pipe) -> tuple:
    """The names of the adapters loaded into each part (changes whenever one is loaded or deleted)."""
    return tuple(tuple(getattr(part, "peft_config", {}) or {}) for part in _adapter_parts(pipe))


def _fast_entries(pipe, key) -> list | None:
    """The entries kept by the last slow call, if the same adapters are loaded and active and adapters
    were not switched off since."""
    kept = getattr(pipe, "_studio_scale_entries", None)
    if kept is None or kept[0] != key or not kept[1]:
        return None
    layer = kept[1][0][1]
    if layer.disable_adapters or list(layer.active_adapters) != list(key[0]):
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
    base_hash: str = ""  # content hash of a single-file base model (models.base_record), "" otherwise
    vae: str = ""  # the separate VAE the run trained with, "" for the base model's own


def write_meta(adapter_dir: Path, meta: AdapterMeta) -> None:
    write_text_atomically(Path(adapter_dir) / ADAPTER_META, yaml.safe_dump(asdict(meta), sort_keys=False))


_META_CACHE: dict[str, tuple[tuple[int, int], AdapterMeta]] = {}  # path -> ((mtime_ns, size), meta)


def read_meta(adapter_dir: Path) -> AdapterMeta:
    """The adapter's metadata; parsed once per version of the file (the Playground asks on every
    slider move, and parsing YAML took most of a scale change)."""
    path = Path(adapter_dir) / ADAPTER_META
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise StudioError(f"'{adapter_dir}' holds no trained adapter (no {ADAPTER_META}); "
                          "pick a run that has finished or been cancelled.") from None
    version = (stat.st_mtime_ns, stat.st_size)
    known = _META_CACHE.get(str(path))
    if known is not None and known[0] == version:
        return replace(known[1])
    meta = AdapterMeta(**yaml.safe_load(path.read_text(encoding="utf-8")))
    _META_CACHE[str(path)] = (version, meta)
    return replace(meta)


def module_for(kind: str):
    """The module behind a kind (see `get` for its Method: capabilities and settings)."""
    return get(kind).module


def find_adapter_dir(path: Path) -> Path:
    """Accept a run folder, its adapter/ folder or a checkpoint folder."""
    path = Path(path)
    recover_folder(path / "adapter")  # a kill while the final adapter was being replaced
    if (path / ADAPTER_META).exists():
        return path
    if (path / "adapter" / ADAPTER_META).exists():
        return path / "adapter"
    raise StudioError(f"No trained adapter found in '{path}'; give a run folder whose training has finished.")
