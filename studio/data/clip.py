"""CLIP image and text embeddings, L2-normalised, from a model chosen by id.

Two stages use it: the dataset audit (`studio.data.audit`, photos far from the others are outliers)
and the evaluation (CLIP-I, CLIP-T; `studio.evaluate.embedders` names it for the evaluation). It lives
here, in the earlier stage, because evaluate imports data and data must not import evaluate.

'builtin' is the pocket CLIP shipped in assets/pocket-clip: trained contrastively on the pocket world
(studio/pocket), it tells shapes, colours, sizes, textures, positions and backgrounds apart, so the
evaluation of the built-in model means something offline. On photos it knows nothing; use a real CLIP.

'tiny' is a tiny CLIP with random weights, written deterministically on first use: it lets tests run
the whole evaluation in seconds, but its numbers say nothing about concepts.
"""

from __future__ import annotations

import json
from pathlib import Path

from studio import models
from studio.errors import StudioError
from studio.paths import staging, swap_into_place

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
BUILTIN = "builtin"
TINY = "tiny"
POCKET_CLIP_DIR = models.ASSETS / "pocket-clip"
TINY_CLIP_VERSION = 1


def builtin_clip_dir() -> Path:
    """The shipped pocket CLIP's folder; one sentence if a checkout lacks it."""
    if not (POCKET_CLIP_DIR / "config.json").exists():
        raise StudioError(f"The built-in CLIP is missing from {POCKET_CLIP_DIR}; restore it with `git checkout -- assets`, "
                          "or retrain it with `python scripts/train_pocket.py`.")
    return POCKET_CLIP_DIR


def tiny_clip_dir() -> Path:
    return models.cache_root() / "tiny-clip"


def write_tiny_clip(out_dir: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407)
    vision = dict(image_size=64, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(3)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    tmp = staging(Path(out_dir))
    model.save_pretrained(tmp, safe_serialization=True)
    CLIPTokenizer.from_pretrained(models.TOKENIZER_DIR).save_pretrained(tmp)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(tmp)
    (tmp / models.BUILTIN_MARKER).write_text(json.dumps({"version": TINY_CLIP_VERSION}))
    return swap_into_place(tmp, Path(out_dir))


def resolve_clip(name: str | None) -> tuple[str, str | None]:
    """(source for from_pretrained, notice)."""
    name = (name or "").strip()
    if not name:
        if models.hub_reachable():
            return DEFAULT_CLIP, None
        return str(builtin_clip_dir()), ("The model hub cannot be reached, so the evaluation uses the built-in pocket "
                                         "CLIP, which knows the pocket world's shapes and colours but not photos.")
    if name == BUILTIN:
        return str(builtin_clip_dir()), None
    if name == TINY:
        folder = tiny_clip_dir()
        with models.cache_lock(folder):
            if not models.is_current(folder, TINY_CLIP_VERSION):
                write_tiny_clip(folder)
        return str(folder), None
    return name, None


class ClipEmbedder:
    def __init__(self, name: str | None = None, device: str = "cpu"):
        import torch
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        models.quiet_libraries()
        self.source, self.notice = resolve_clip(name)
        try:
            # float32 whatever the file holds (the pocket CLIP ships in float16, which CPUs run slowly)
            with models.CONSTRUCTION_LOCK:  # see studio.models.CONSTRUCTION_LOCK
                self.model = CLIPModel.from_pretrained(self.source, use_safetensors=True,
                                                       dtype=torch.float32).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(self.source)
            self.processor = CLIPImageProcessor.from_pretrained(self.source)
        except (OSError, ValueError):
            raise StudioError(f"CLIP model '{name or self.source}' could not be loaded (offline, unknown id, or no "
                              "safetensors weights); check the id, or use 'builtin'.") from None
        self.device = device

    def embed_images(self, images):
        import torch

        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        with torch.no_grad():
            out = self.model.get_image_features(pixel_values=pixels.to(self.device))
        return normalise(_tensor(out))

    def embed_texts(self, texts: list[str]):
        import torch

        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
        return normalise(_tensor(out))


def _tensor(out):
    """transformers 5.x returns an output object from get_*_features; 4.x returned the tensor."""
    return out if hasattr(out, "shape") else out.pooler_output


def normalise(x):
    """Rows scaled to unit L2 length (a zero row stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
