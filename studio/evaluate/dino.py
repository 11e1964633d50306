"""DINO image embeddings (the DreamBooth paper's subject-fidelity metric): the CLS token of a
self-supervised ViT, L2-normalised.

Default `facebook/dino-vits16` (DINO ViT-S/16, as in Ruiz et al. 2023); DINOv2 (`facebook/dinov2-small`
and larger) is selectable by id. Both load through transformers' AutoModel, never with remote code.
'tiny' is a small ViT with random weights written on first use, for tests only. There is no
built-in DINO: offline, with no DINO model given, the DINO column stays empty and the evaluation
says why.
"""

from __future__ import annotations

import json
from pathlib import Path

from studio import models
from studio.errors import StudioError
from studio.data.clip import normalise
from studio.paths import staging, swap_into_place

DEFAULT_DINO = "facebook/dino-vits16"
TINY = "tiny"
NONE = "none"
TINY_DINO_VERSION = 1


def tiny_dino_dir() -> Path:
    return models.cache_root() / "tiny-dino"


def write_tiny_dino(out_dir: Path) -> Path:
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(5)
    model = ViTModel(ViTConfig(image_size=64, patch_size=8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4), add_pooling_layer=False)
    tmp = staging(Path(out_dir))
    model.save_pretrained(tmp, safe_serialization=True)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp)
    (tmp / models.BUILTIN_MARKER).write_text(json.dumps({"version": TINY_DINO_VERSION}))
    return swap_into_place(tmp, Path(out_dir))


def resolve_dino(name: str | None) -> tuple[str | None, str | None]:
    """(source for from_pretrained or None for no DINO, notice)."""
    name = (name or "").strip()
    if name.lower() == NONE:
        return None, None
    if not name:
        if models.hub_reachable():
            return DEFAULT_DINO, None
        return None, (f"The model hub cannot be reached and no DINO model was given, so the DINO column is empty; "
                      f"give a local copy of {DEFAULT_DINO} to fill it.")
    if name == TINY:
        folder = tiny_dino_dir()
        with models.cache_lock(folder):
            if not models.is_current(folder, TINY_DINO_VERSION):
                write_tiny_dino(folder)
        return str(folder), None
    return name, None


class DinoEmbedder:
    def __init__(self, source: str, device: str = "cpu"):
        import torch
        from transformers import AutoImageProcessor, AutoModel

        models.quiet_libraries()
        try:
            with models.CONSTRUCTION_LOCK:
                self.model = AutoModel.from_pretrained(source, use_safetensors=True, dtype=torch.float32).to(device).eval()
            self.processor = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError):
            raise StudioError(f"DINO model '{source}' could not be loaded (offline, unknown id, or no safetensors "
                              "weights); check the id, or set DINO to 'none'.") from None
        self.source, self.device = source, device

    def embed_images(self, images):
        import torch

        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        with torch.no_grad():
            cls = self.model(pixel_values=pixels.to(self.device)).last_hidden_state[:, 0]
        return normalise(cls)
