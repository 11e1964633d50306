"""CLIP image and text embeddings, L2-normalised, from a model chosen by id.

'builtin' is a small CLIP written deterministically on first use (random weights until the pocket
model ships): it lets the whole evaluation run offline, but its numbers say nothing about concepts.
"""

from __future__ import annotations

import json
from pathlib import Path

from studio import models
from studio.errors import StudioError
from studio.paths import staging, swap_into_place

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
BUILTIN = "builtin"
BUILTIN_CLIP_VERSION = 1


def builtin_clip_dir() -> Path:
    return models.builtin_dir().parent / "builtin-clip"


def write_builtin_clip(out_dir: Path) -> Path:
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
    (tmp / models.BUILTIN_MARKER).write_text(json.dumps({"version": BUILTIN_CLIP_VERSION}))
    return swap_into_place(tmp, Path(out_dir))


def resolve_clip(name: str | None) -> tuple[str, str | None]:
    """(source for from_pretrained, notice)."""
    name = (name or "").strip()
    if not name:
        if models.hub_reachable():
            return DEFAULT_CLIP, None
        return resolve_clip(BUILTIN)[0], ("The model hub cannot be reached, so the evaluation uses the built-in "
                                          "CLIP, whose random weights make the numbers meaningless for real concepts.")
    if name == BUILTIN:
        folder = builtin_clip_dir()
        with models.cache_lock(folder):
            if not models.is_current(folder, BUILTIN_CLIP_VERSION):
                write_builtin_clip(folder)
        return str(folder), None
    return name, None


class ClipEmbedder:
    def __init__(self, name: str | None = None, device: str = "cpu"):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        models.quiet_libraries()
        self.source, self.notice = resolve_clip(name)
        try:
            with models.CONSTRUCTION_LOCK:  # see studio.models.CONSTRUCTION_LOCK
                self.model = CLIPModel.from_pretrained(self.source, use_safetensors=True).to(device).eval()
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
        return _normalise(_tensor(out))

    def embed_texts(self, texts: list[str]):
        import torch

        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
        return _normalise(_tensor(out))


def _tensor(out):
    """transformers 5.x returns an output object from get_*_features; 4.x returned the tensor."""
    return out if hasattr(out, "shape") else out.pooler_output


def _normalise(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
