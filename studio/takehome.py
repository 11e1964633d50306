"""Taking a run home: which file to copy where for ComfyUI, AUTOMATIC1111/Forge and diffusers, the
prompt syntax each uses, and a ComfyUI workflow that draws with the Playground's settings.

Client rules this encodes (read in each client's code):
- ComfyUI `nodes.py`: `CheckpointLoaderSimple` (ckpt_name) -> MODEL 0, CLIP 1, VAE 2; `LoraLoader` (model,
  clip, lora_name, strength_model, strength_clip) -> MODEL 0, CLIP 1; `CLIPTextEncode` (text, clip);
  `EmptyLatentImage` (width, height, batch_size); `KSampler` (model, seed, steps, cfg, sampler_name,
  scheduler, positive, negative, latent_image, denoise); `VAEDecode` (samples, vae); `SaveImage` (images,
  filename_prefix). The API format is {node id: {"class_type", "inputs"}}, a link being [node id, output].
  Files: models/checkpoints, models/loras (LoRA, LyCORIS and `.diff` files alike), models/embeddings;
  an embedding is written `embedding:NAME` in a prompt.
- AUTOMATIC1111/Forge: models/Stable-diffusion, models/Lora (its built-in Lora extension reads LoRA and
  LyCORIS files), embeddings/; `<lora:NAME:STRENGTH>` in the prompt, NAME being the file name without
  `.safetensors`; an embedding is used by writing its file name.
The workflow reproduces the settings, not the pixels: ComfyUI draws its own starting noise from the seed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from studio import adapters
from studio.errors import StudioError
from studio.paths import safe_name

# diffusers scheduler class -> ComfyUI (sampler_name, scheduler) that walks the same way.
SAMPLERS = {"DDIMScheduler": ("ddim", "ddim_uniform"), "EulerDiscreteScheduler": ("euler", "normal"),
            "EulerAncestralDiscreteScheduler": ("euler_ancestral", "normal"),
            "DPMSolverMultistepScheduler": ("dpmpp_2m", "normal"), "PNDMScheduler": ("euler", "normal"),
            "LMSDiscreteScheduler": ("lms", "normal"), "UniPCMultistepScheduler": ("uni_pc", "normal")}
# Hub ids of common bases -> the file name their single-file checkpoint is published under.
CHECKPOINT_FILES = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "v1-5-pruned-emaonly.safetensors",
                    "runwayml/stable-diffusion-v1-5": "v1-5-pruned-emaonly.safetensors",
                    "stabilityai/stable-diffusion-2-1": "v2-1_768-ema-pruned.safetensors",
                    "stabilityai/stable-diffusion-2-1-base": "v2-1_512-ema-pruned.safetensors",
                    "stabilityai/stable-diffusion-xl-base-1.0": "sd_xl_base_1.0.safetensors"}
STUDIO_ONLY = ("builtin", "tiny", "builtin-sdxl")  # models that exist only inside the studio

COMFY = {"lora": "ComfyUI/models/loras", "embedding": "ComfyUI/models/embeddings",
         "checkpoint": "ComfyUI/models/checkpoints"}
A1111 = {"lora": "stable-diffusion-webui/models/Lora", "embedding": "stable-diffusion-webui/embeddings",
         "checkpoint": "stable-diffusion-webui/models/Stable-diffusion"}


@dataclass
class ClientFile:
    source: Path  # the file in the run's adapter folder
    name: str  # the name to give the copy (the name clients show and prompts use)
    role: str  # "lora", "embedding" or "checkpoint"

    @property
    def comfyui(self) -> str:
        return f"{COMFY[self.role]}/{self.name}"

    @property
    def a1111(self) -> str:
        return f"{A1111[self.role]}/{self.name}"


@dataclass
class Settings:
    """What the Playground draws with."""

    prompt: str
    negative: str = ""
    scale: float = 1.0
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    size: int = 0  # pixels; 0: the base model's native size
    base_model: str = ""  # "": the model the run was trained on
    scheduler: str = ""  # diffusers scheduler class the Playground uses, if known


@dataclass
class TakeHome:
    run: str
    kind: str
    settings: Settings
    files: list[ClientFile]
    a1111_prompt: str
    comfyui_prompt: str
    workflow: dict
    diffusers_code: str
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"**Take {self.run} home** ({self.kind}, scale {self.settings.scale:g})", ""]
        for f in self.files:
            lines.append(f"- `{f.source.name}` → save as **`{f.name}`** in `{f.comfyui}` (ComfyUI) or "
                         f"`{f.a1111}` (AUTOMATIC1111/Forge)")
        lines += ["", f"AUTOMATIC1111/Forge prompt: `{self.a1111_prompt}`"]
        if self.settings.negative:
            lines.append(f"Negative prompt: `{self.settings.negative}`")
        s = self.settings
        lines += [f"Seed {s.seed}, {s.steps} steps, CFG {s.guidance:g}, {self.workflow['5']['inputs']['width']} px.",
                  "", "diffusers:", "```python", self.diffusers_code, "```"]
        lines += [f"_{n}_" for n in self.notes]
        return "\n".join(lines)

    def write(self, out_dir: Path) -> list[Path]:
        """Copies of the files under the names the clients use, and `<run>-comfyui-workflow.json`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in self.files:
            shutil.copyfile(f.source, out_dir / f.name)
            written.append(out_dir / f.name)
        workflow = out_dir / f"{safe_name(self.run, 'concept')}-comfyui-workflow.json"
        workflow.write_text(json.dumps(self.workflow, indent=2), encoding="utf-8")
        return written + [workflow]


def client_files(adapter_dir: Path, kind: str, name: str, token: str) -> list[ClientFile]:
    """The files of one adapter folder that ComfyUI and AUTOMATIC1111 load, with the names to give them
    (each method's own answer: studio.adapters, `client_files`)."""
    return [ClientFile(Path(source), copy_name, role)
            for source, copy_name, role in adapters.get(kind).client_files(Path(adapter_dir), name, token)]


def checkpoint_name(base_model: str) -> str:
    """The checkpoint file ComfyUI's loader is pointed at for a base model reference."""
    if base_model in CHECKPOINT_FILES:
        return CHECKPOINT_FILES[base_model]
    path = Path(base_model)
    if path.suffix == ".safetensors":
        return path.name
    return safe_name(path.name or base_model, "checkpoint") + ".safetensors"


def comfyui_workflow(ckpt_name: str, loras: list[tuple[str, float]], prompt: str, negative: str, seed: int,
                     steps: int, cfg: float, size: int, sampler: tuple[str, str], prefix: str) -> dict:
    """A ComfyUI API-format graph: checkpoint -> LoRA loaders (chained) -> prompts -> KSampler -> decode -> save.

    Node ids 1-8 are fixed (1 checkpoint, 2 positive, 3 negative, 4 sampler, 5 latent, 6 decode, 7 save);
    LoRA loaders take ids 10, 11, ... in order, each fed by the one before it.
    """
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}}
    model, clip = ["1", 0], ["1", 1]
    for i, (lora_name, strength) in enumerate(loras):
        node = str(10 + i)
        graph[node] = {"class_type": "LoraLoader",
                       "inputs": {"model": model, "clip": clip, "lora_name": lora_name,
                                  "strength_model": float(strength), "strength_clip": float(strength)}}
        model, clip = [node, 0], [node, 1]
    graph["2"] = {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": clip}}
    graph["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": clip}}
    graph["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": int(size), "height": int(size), "batch_size": 1}}
    graph["4"] = {"class_type": "KSampler",
                  "inputs": {"model": model, "seed": int(seed), "steps": int(steps), "cfg": float(cfg),
                             "sampler_name": sampler[0], "scheduler": sampler[1], "positive": ["2", 0],
                             "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    graph["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}}
    graph["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}}
    return graph


def plan(adapter_dir: Path, run: str, settings: Settings) -> TakeHome:
    """What to copy where and how to prompt, for one run (or checkpoint) at the Playground's settings."""
    folder = adapters.find_adapter_dir(Path(adapter_dir))
    meta = adapters.read_meta(folder)
    name = safe_name(run, "concept")
    files = client_files(folder, meta.kind, name, meta.token)
    if not files:
        raise StudioError(f"Run '{run}' has no file for ComfyUI or AUTOMATIC1111 yet (its export was not written); "
                          "finish or resume its training, which writes them.")
    base = settings.base_model or meta.base_model
    scale = float(settings.scale)
    lora_files = [f for f in files if f.role == "lora"]
    embeds = [f for f in files if f.role == "embedding"]
    ckpt = next((f.name for f in files if f.role == "checkpoint"), checkpoint_name(base))
    a1111_prompt = settings.prompt + "".join(f" <lora:{f.name.removesuffix('.safetensors')}:{scale:g}>"
                                             for f in lora_files)
    comfy_prompt = settings.prompt
    for f in embeds:  # ComfyUI reads an embedding where the prompt says embedding:NAME
        word = f.name.removesuffix(".safetensors")
        comfy_prompt = " ".join(f"embedding:{word}" if t == word else t for t in comfy_prompt.split(" "))
    size = settings.size or (1024 if _is_sdxl_base(base) else 512)  # the families' native sizes
    sampler = SAMPLERS.get(settings.scheduler, ("euler", "normal"))
    workflow = comfyui_workflow(ckpt, [(f.name, scale) for f in lora_files], comfy_prompt, settings.negative,
                                settings.seed, settings.steps, settings.guidance, size, sampler, name)
    notes = ["ComfyUI draws its own starting noise from the seed, so its image follows these settings "
             "but is not the Playground's pixel for pixel."]
    if base in STUDIO_ONLY:
        notes.append(f"The base model '{base}' exists only inside the studio; in ComfyUI and AUTOMATIC1111 use "
                     "the checkpoint of the model family the run was trained on.")
    if scale != 1 and embeds and not lora_files:
        notes.append("An embedding has no strength: the scale does not apply to it.")
    return TakeHome(run, meta.kind, settings, files, a1111_prompt, comfy_prompt, workflow,
                    diffusers_code(folder, meta.kind, meta.token, base, scale, settings.prompt), notes)


def _is_sdxl_base(base: str) -> bool:
    return "xl" in base.lower()


def diffusers_code(folder: Path, kind: str, token: str, base: str, scale: float, prompt: str) -> str:
    """A few lines that load the run's native files in diffusers (each method's own: studio.adapters)."""
    return adapters.get(kind).diffusers_code(Path(folder), token, base, scale, prompt)
