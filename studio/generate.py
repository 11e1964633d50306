"""Playground inference: a cached base pipeline, trained adapters stacked on it at chosen scales.

Adapters are loaded once per file and kept; changing a scale only calls `set_adapters`, so a
slider responds in milliseconds and never reloads weights. A fully fine-tuned model (DreamBooth)
chosen among the adapters is a model, not an addition: the adapted image is drawn by it (with any
other adapters on top), the base image by the base model; both pipelines stay loaded.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from studio import adapters, limits, models, preflight
from studio.adapters import community
from studio.errors import StudioError


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
    vae: str = ""  # a separate VAE for the base model ("" keeps the model's own)


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


def is_file_choice(choice: AdapterChoice) -> bool:
    """A LoRA or embedding file from another tool (rather than a run or adapter folder)."""
    return Path(choice.path).is_file() or Path(choice.path).suffix.lower() in (".safetensors", *community.PICKLE_SUFFIXES)


def suggested_prompt(path: str) -> str | None:
    """The prompt a chosen adapter suggests: a run's trigger and class words ("a photo of sks shape"), an
    embedding file's word ("a photo of NAME"); None for a LoRA file or anything unreadable."""
    if is_file_choice(AdapterChoice(path)):
        word = community.embedding_word(Path(path))
        return f"a photo of {word}" if word else None
    try:
        meta = adapters.read_meta(adapters.find_adapter_dir(Path(path)))
    except StudioError:
        return None
    return " ".join(w for w in ("a photo of", meta.token, meta.class_word) if w)


def _file_key(path: Path) -> str:
    return f"file:{path}"


@dataclass(frozen=True)
class _Loaded:
    version: str  # modification time and size of the weights file
    name: str  # adapter name inside the pipeline
    module: object  # the adapters.Method that loaded it (for a file: community.LoadedLora / LoadedEmbedding);
    # either has `caps` (adapters.base.Capabilities), `unload` and `set_scale`
    folder: Path  # the adapter folder, or the file
    kind: str = ""

    @property
    def exact_at_zero(self) -> bool:
        """At peft scale 0 its layers add exactly nothing (the update is multiplied by the scale); a kind
        whose learned part does not scale (capability zero_is_base off) is switched off instead."""
        return _peft_scaled(self.module) and self.module.caps.zero_is_base


def _peft_scaled(module) -> bool:
    """Scaled through peft's set_adapters (rather than by the module's own set_scale)."""
    return module.caps.scaling == "peft"


NOTICE = "studio_notice"  # key in a generated image's `info` for a sentence the user should see


def truncation_notice(tokenizer, text: str, what: str = "The prompt") -> str | None:
    """A sentence when `text` is longer than the text encoder reads (CLIP: 77 tokens), else None."""
    limit = tokenizer.model_max_length
    n = len(tokenizer(text, truncation=False).input_ids)
    if n <= limit:
        return None
    kept = tokenizer.decode(tokenizer(text, truncation=True, max_length=limit).input_ids, skip_special_tokens=True)
    return (f"{what} is {n} tokens long and the text encoder reads {limit}, so it was cut after "
            f"\"…{kept[-40:].strip()}\"; shorten it to keep the rest.")


def _model_folder(choice: AdapterChoice) -> str | None:
    """The model folder of a fully fine-tuned run, or None for an adapter (a file is always an adapter)."""
    if is_file_choice(choice):
        return None
    folder = adapters.find_adapter_dir(Path(choice.path))
    return str(folder) if adapters.get(adapters.read_meta(folder).kind).caps.saves_model else None


def split_choices(model: str, choices: list[AdapterChoice]) -> tuple[str, list[AdapterChoice]]:
    """The model that draws, and the adapters it carries: a full fine-tune among the choices (at any
    scale but 0, like other kinds without a scale) replaces `model`."""
    models_chosen = [(c, f) for c, f in ((c, _model_folder(c)) for c in choices) if f]
    on = [f for c, f in models_chosen if c.scale != 0]
    if len(on) > 1:
        raise StudioError("Two fully fine-tuned models are chosen, and an image is drawn by one model; "
                          "keep one of them (adapters can be stacked on it).")
    rest = [c for c in choices if c not in {c for c, _ in models_chosen}]
    return (on[0] if on else model), rest


def _run_metas(choices: list[AdapterChoice]) -> list:
    """adapter.yaml of each chosen run or adapter folder (files from other tools have none)."""
    metas = []
    for choice in choices:
        if is_file_choice(choice):
            continue
        try:
            metas.append(adapters.read_meta(adapters.find_adapter_dir(Path(choice.path))))
        except StudioError:
            continue  # loading the adapter says what is wrong with it
    return metas


def choose_base(model: str, vae: str, choices: list[AdapterChoice]) -> tuple[str, str]:
    """(base model, VAE) to draw with: as named, or when `model` is empty the base and VAE the first
    chosen run was trained on (its adapter.yaml), so a run reopens on the model it learned from. A
    model named that is the run's own base also gets the run's VAE when none is named."""
    metas = _run_metas(choices)
    if not (model or "").strip():
        return (metas[0].base_model, vae or metas[0].vae) if metas else (model, vae)
    for meta in metas:
        if not vae and meta.vae and _same_model(model, meta.base_model):
            return model, meta.vae
    return model, vae


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    return Path(a).expanduser().exists() and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def recorded_base(paths: list[str]) -> tuple[str, str] | None:
    """(base model, VAE) of the first of these runs trained on a single-file checkpoint, or None: what a
    tab shows as the base model when such a run is picked."""
    for meta in _run_metas([AdapterChoice(p) for p in paths if p]):
        if meta.base_hash:
            return meta.base_model, meta.vae
    return None


def check_recorded_bases(model: str, choices: list[AdapterChoice]) -> None:
    """One sentence if a chosen run was trained on the checkpoint file `model` names and that file is gone
    or has changed since (checked before anything loads)."""
    if not (model or "").strip() or Path(model).suffix.lower() != ".safetensors":
        return
    for choice in choices:
        if is_file_choice(choice):
            continue
        try:
            meta = adapters.read_meta(adapters.find_adapter_dir(Path(choice.path)))
        except StudioError:
            continue
        if meta.base_hash and Path(meta.base_model) == Path(model).expanduser().resolve():
            models.check_recorded(meta.base_model, meta.base_hash, f"run '{Path(choice.path).name}'")


class Playground:
    def __init__(self, cache: models.PipelineCache | None = None):
        self.cache = cache or models.PipelineCache(size=2)  # the base model and one fine-tuned model
        self._lock = threading.RLock()
        self._pipe = None  # the pipeline last used
        self._loaded: dict[str, _Loaded] = {}  # weights file -> what is loaded from it, in self._pipe
        self._states: dict[int, tuple[object, dict[str, _Loaded]]] = {}  # id(pipe) -> (pipe, its _loaded)

    def pipeline(self, model: str, vae: str = ""):
        ref = models.resolve(model, vae)
        device = models.pick_device()
        dtype, _ = models.resolve_precision("auto", device)
        pipe = self.cache.get(ref, device, dtype)
        if pipe is not self._pipe:
            kept = self._states.get(id(pipe))
            loaded = kept[1] if kept is not None and kept[0] is pipe else {}  # a new pipeline: nothing in it yet
            self._states = {k: v for k, v in self._states.items() if self.cache.holds(v[0])}
            self._states[id(pipe)] = (pipe, loaded)
            self._pipe, self._loaded = pipe, loaded
        return pipe, ref

    def _load(self, pipe, choice: AdapterChoice) -> _Loaded:
        """The adapter of a choice, loaded into the pipeline once per version of its file."""
        if is_file_choice(choice):
            return self._load_file(pipe, Path(choice.path))
        folder = adapters.find_adapter_dir(Path(choice.path))
        meta = adapters.read_meta(folder)
        module = adapters.get(meta.kind)
        weights = (folder / module.caps.weights_file).resolve()  # the file whose change is a new version
        preflight.check_safetensors(weights, "Adapter file")  # a pickle under that name never reaches a loader
        stat = weights.stat()
        version = f"{stat.st_mtime_ns}:{stat.st_size}"
        known = self._loaded.get(str(weights))
        if known is not None and known.version == version:
            return known
        if known is not None:  # the run saved a newer adapter: drop the old copy, load the new one
            self._unload(pipe, str(weights))
        name = "a" + hashlib.sha1(f"{weights}:{version}".encode()).hexdigest()[:12]
        try:
            with models.CONSTRUCTION_LOCK:
                module.load_into(pipe, folder, name)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise StudioError(f"The adapter in '{choice.path}' does not fit this base model (it was trained on "
                              f"'{meta.base_model}'); choose that model. ({exc.__class__.__name__})") from None
        self._loaded[str(weights)] = _Loaded(version, name, module, folder, meta.kind)
        return self._loaded[str(weights)]

    def _load_file(self, pipe, path: Path) -> _Loaded:
        """A LoRA, LyCORIS or embedding file from another tool (see studio.adapters.community)."""
        path = path.resolve()
        try:
            stat = path.stat()
        except OSError:
            raise StudioError(f"The adapter file '{path}' does not exist (any more); add it again.") from None
        version = f"{stat.st_mtime_ns}:{stat.st_size}"
        key = _file_key(path)  # not the weights path: a run's own file added as a file is a second adapter
        known = self._loaded.get(key)
        if known is not None and known.version == version:
            return known
        if known is not None:
            self._unload(pipe, key)
        name = "f" + hashlib.sha1(f"{path}:{version}".encode()).hexdigest()[:12]
        with models.CONSTRUCTION_LOCK:
            module = community.load(pipe, path, name)
        self._loaded[key] = _Loaded(version, name, module, path, module.report.kind)
        return self._loaded[key]

    def native_size(self) -> int:
        """Pixels of the last pipeline used (its native size); 0 before any."""
        pipe = self._pipe
        return int(pipe.unet.config.sample_size * pipe.vae_scale_factor) if pipe is not None else 0

    def scheduler_name(self) -> str:
        """The diffusers scheduler class of the last pipeline used ("" before any)."""
        return type(self._pipe.scheduler).__name__ if self._pipe is not None else ""

    def file_report(self, model: str, path: str) -> community.FileReport:
        """Load a LoRA/embedding file onto `model` (once per version of the file) and say what reached it."""
        with self._lock:
            pipe, _ = self.pipeline(split_choices(model, [])[0])
            return self._load_file(pipe, Path(path)).module.report

    def _unload(self, pipe, key: str) -> None:
        loaded = self._loaded.pop(key)
        if _peft_scaled(loaded.module):
            pipe.delete_adapters(loaded.name)
        loaded.module.unload(pipe, loaded.folder)

    def set_scales(self, model: str, choices: list[AdapterChoice], vae: str = "") -> float:
        """Apply scales in place (loading any adapter not yet loaded); returns the seconds it took.

        - peft kinds (LoRA, DoRA, LoHa, LoKr): set_adapters, then in place while the same adapters stay
          active (see adapters.set_scales). At 0, LoRA, LoHa and LoKr stay active at scale 0 (exactly
          nothing added, and a slider through 0 stays fast) unless every peft adapter is at 0, when
          they are all switched off; DoRA at 0 is switched off (its learned magnitude does not scale).
        - kinds with their own `set_scale` (Custom Diffusion): interpolated in place at any scale.
        - kinds without a scale (an embedding): on at any scale but 0, unloaded at 0.
        Adapters loaded earlier but not asked for now are switched off or unloaded.
        A fully fine-tuned model among `choices` is the model they apply to (see `split_choices`); an
        empty `model` is the base the first chosen run was trained on (see `choose_base`).
        """
        with self._lock:
            model, vae = choose_base(model, vae, choices)
            model, choices = split_choices(model, choices)
            check_recorded_bases(model, choices)
            pipe, _ = self.pipeline(model, vae)
            wanted = [(c, self._load(pipe, c)) for c in choices]
            start = time.perf_counter()
            scaled = [(l.name, float(c.scale)) for c, l in wanted
                      if _peft_scaled(l.module) and (c.scale != 0 or l.exact_at_zero)]
            if not any(scale for _, scale in scaled):
                scaled = []  # every peft adapter at 0: the base model's own path, with no adapter layers run
            keep = {str(l.folder) for c, l in wanted if l.module.caps.has_scale or c.scale != 0}
            for key, loaded in list(self._loaded.items()):
                if not _peft_scaled(loaded.module) and str(loaded.folder) not in keep:
                    self._unload(pipe, key)
            for choice, loaded in wanted:
                loaded.module.set_scale(pipe, loaded.folder, float(choice.scale))  # scaling "own" only
            if scaled:
                adapters.set_scales(pipe, [n for n, _ in scaled], [s for _, s in scaled])
            elif any(_peft_scaled(l.module) for l in self._loaded.values()):
                pipe.disable_lora()
            return time.perf_counter() - start

    def generate(self, req: GenerateRequest):
        import torch

        if not req.prompt.strip():
            raise StudioError("The prompt is empty; describe the image you want.")
        limits.check_render(req.steps, req.seed, req.guidance, req.size)  # before any model loads
        with self._lock:
            self.set_scales(req.model, req.adapters, req.vae)
            model, vae = choose_base(req.model, req.vae, req.adapters)
            pipe, _ = self.pipeline(split_choices(model, req.adapters)[0], vae)
            size = req.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
            generator = torch.Generator().manual_seed(int(req.seed))
            with torch.no_grad():
                image = pipe(req.prompt, negative_prompt=req.negative_prompt or None, height=size, width=size,
                             num_inference_steps=int(req.steps), guidance_scale=float(req.guidance),
                             generator=generator).images[0]
            notices = [truncation_notice(pipe.tokenizer, req.prompt)] + self._file_notices(req.adapters)
            if any(notices):
                image.info[NOTICE] = " ".join(n for n in notices if n)
            return image

    def _file_notices(self, choices: list[AdapterChoice]) -> list[str]:
        """For each chosen file, the keys of it that did not reach the model (counted, with examples)."""
        out = []
        for choice in choices:
            loaded = self._loaded.get(_file_key(Path(choice.path).resolve())) if is_file_choice(choice) else None
            if loaded is not None and loaded.module.report.problems():
                out.append(f"{loaded.module.report.file}: " + " ".join(loaded.module.report.problems()))
        return out

    def generate_pair(self, req: GenerateRequest):
        """(base, adapted) for the same seed: the base is the base model with no adapter of any kind."""
        base = GenerateRequest(**{**req.__dict__, "adapters": []})
        return self.generate(base), self.generate(req)
