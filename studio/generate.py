"""Playground inference: one cached base pipeline, trained adapters stacked on it at chosen scales.

Adapters are loaded once per file and kept; changing a scale only calls `set_adapters`, so a
slider responds in milliseconds and never reloads weights.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from studio import adapters, models
from studio.errors import StudioError
from studio.paths import LORA_WEIGHTS


@dataclass(frozen=True)
class AdapterChoice:
    path: str  # a run folder or an adapter folder
    scale: float = 1.0


@dataclass
class GenerateRequest:
    prompt: str
    model: str = ""
    adapters: list[AdapterChoice] = field(default_factory=list)
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    size: int = 0  # pixels; 0 takes the model's native size


def parse_adapter_arg(text: str) -> AdapterChoice:
    """`RUN_DIR[:SCALE]` from the command line."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return AdapterChoice(path, float(scale))
        except ValueError:
            pass
    if Path(text).exists() or not sep:  # a folder whose name has a colon, or no scale given
        return AdapterChoice(text, 1.0)
    raise StudioError(f"Adapter '{text}' must look like RUN_DIR or RUN_DIR:SCALE with a number as scale.")


@dataclass(frozen=True)
class _Loaded:
    version: str  # modification time and size of the weights file
    name: str  # adapter name inside the pipeline
    module: object  # the adapter module that loaded it
    folder: Path


def _peft_scaled(module) -> bool:
    """Scaled through peft's set_adapters (rather than by the module's own set_scale)."""
    return module.HAS_SCALE and not hasattr(module, "set_scale")


class Playground:
    def __init__(self, cache: models.PipelineCache | None = None):
        self.cache = cache or models.PipelineCache()
        self._lock = threading.RLock()
        self._loaded: dict[str, _Loaded] = {}  # weights file -> what is loaded from it
        self._pipe = None  # the pipeline the adapters in _loaded live in

    def pipeline(self, model: str):
        ref = models.resolve(model)
        device = models.pick_device()
        dtype, _ = models.resolve_precision("auto", device)
        pipe = self.cache.get(ref, device, dtype)
        if pipe is not self._pipe:  # a new base model: nothing is loaded into it yet
            self._pipe, self._loaded = pipe, {}
        return pipe, ref

    def _load(self, pipe, choice: AdapterChoice) -> _Loaded:
        """The adapter of a choice, loaded into the pipeline once per version of its file."""
        folder = adapters.find_adapter_dir(Path(choice.path))
        meta = adapters.read_meta(folder)
        module = adapters.module_for(meta.kind)
        weights = (folder / getattr(module, "WEIGHTS", LORA_WEIGHTS)).resolve()  # LoHa/LoKr: peft's file
        stat = weights.stat()
        version = f"{stat.st_mtime_ns}:{stat.st_size}"
        known = self._loaded.get(str(weights))
        if known is not None and known.version == version:
            return known
        if known is not None:  # the run saved a newer adapter: drop the old copy, load the new one
            self._unload(pipe, str(weights))
        name = "a" + hashlib.sha1(f"{weights}:{version}".encode()).hexdigest()[:12]
        try:
            module.load_into(pipe, folder, name)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise StudioError(f"The adapter in '{choice.path}' does not fit this base model (it was trained on "
                              f"'{meta.base_model}'); choose that model. ({exc.__class__.__name__})") from None
        self._loaded[str(weights)] = _Loaded(version, name, module, folder)
        return self._loaded[str(weights)]

    def _unload(self, pipe, key: str) -> None:
        loaded = self._loaded.pop(key)
        if _peft_scaled(loaded.module):
            pipe.delete_adapters(loaded.name)
        if hasattr(loaded.module, "unload"):
            loaded.module.unload(pipe, loaded.folder)

    def set_scales(self, model: str, choices: list[AdapterChoice]) -> float:
        """Apply scales in place (loading any adapter not yet loaded); returns the seconds it took.

        - peft kinds (LoRA, DoRA, LoHa, LoKr): set_adapters; at 0 switched off rather than scaled
          (DoRA's learned magnitude does not scale with peft's adapter weight).
        - kinds with their own `set_scale` (Custom Diffusion): interpolated in place at any scale.
        - kinds without a scale (an embedding): on at any scale but 0, unloaded at 0.
        Adapters loaded earlier but not asked for now are switched off or unloaded.
        """
        with self._lock:
            pipe, _ = self.pipeline(model)
            wanted = [(c, self._load(pipe, c)) for c in choices]
            start = time.perf_counter()
            scaled = [(l.name, float(c.scale)) for c, l in wanted if _peft_scaled(l.module) and c.scale != 0]
            keep = {str(l.folder) for c, l in wanted if l.module.HAS_SCALE or c.scale != 0}
            for key, loaded in list(self._loaded.items()):
                if not _peft_scaled(loaded.module) and str(loaded.folder) not in keep:
                    self._unload(pipe, key)
            for choice, loaded in wanted:
                if hasattr(loaded.module, "set_scale"):
                    loaded.module.set_scale(pipe, loaded.folder, float(choice.scale))
            if scaled:
                adapters.set_scales(pipe, [n for n, _ in scaled], [s for _, s in scaled])
            elif any(_peft_scaled(l.module) for l in self._loaded.values()):
                pipe.disable_lora()
            return time.perf_counter() - start

    def generate(self, req: GenerateRequest):
        import torch

        if not req.prompt.strip():
            raise StudioError("The prompt is empty; describe the image you want.")
        with self._lock:
            pipe, _ = self.pipeline(req.model)
            self.set_scales(req.model, req.adapters)
            size = req.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
            generator = torch.Generator().manual_seed(int(req.seed))
            with torch.no_grad():
                return pipe(req.prompt, negative_prompt=req.negative_prompt or None, height=size, width=size,
                            num_inference_steps=int(req.steps), guidance_scale=float(req.guidance),
                            generator=generator).images[0]

    def generate_pair(self, req: GenerateRequest):
        """(base, adapted) for the same seed: the base is the model with no adapter of any kind."""
        base = GenerateRequest(**{**req.__dict__, "adapters": []})
        return self.generate(base), self.generate(req)
