"""Class images for the prior-preservation loss (Ruiz et al. 2023, DreamBooth section 4.1).

Drawn by the base model from the class prompt and cached per (base model, prompt, resolution,
denoising steps), so every run on the same class reuses them; or taken from the user's own folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from studio import events, models
from studio.data.captions import render
from studio.errors import StudioError
from studio.paths import IMAGE_SUFFIXES


def cache_dir(model_name: str, prompt: str, resolution: int, steps: int) -> Path:
    # a single file is keyed by its content too, so a replaced checkpoint draws its own class images
    version = models.builtin_version(model_name) or f"{model_name}|{models.base_record(model_name)['base_hash']}"
    key = hashlib.sha1(f"{version}|{prompt}|{resolution}|{steps}".encode()).hexdigest()[:16]
    return models.cache_root() / "class-images" / key


def check_folder(folder: Path) -> list[Path]:
    """The images of a user's class image folder, or one sentence when it has none."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise StudioError(f"Class image folder '{folder}' has no images; add some or leave it empty "
                          "to let the base model draw them.")
    return files


def class_images(pipe, cfg, class_word: str, emit: Callable, should_stop: Callable[[], bool]) -> list[Path]:
    """The class images to train with: the user's folder, or the cache topped up by the base model."""
    if cfg.class_data_dir:
        return check_folder(Path(cfg.class_data_dir))[: cfg.num_class_images]
    prompt = render(cfg.class_prompt, "", class_word)
    folder = cache_dir(cfg.model, prompt, cfg.resolution, cfg.class_image_steps)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(cfg.num_class_images):
        target = folder / f"{index:05d}.png"
        if target.exists():
            continue
        if should_stop():
            break
        emit(events.Progress(index, cfg.num_class_images, f"Drawing class image {index + 1} of "
                                                          f"{cfg.num_class_images}: '{prompt}'"))
        _draw(pipe, prompt, index, cfg, target)
    return sorted(folder.glob("*.png"))[: cfg.num_class_images]


def _draw(pipe, prompt: str, index: int, cfg, target: Path) -> None:
    import torch

    generator = torch.Generator().manual_seed(index)  # image i is the same in every run: a true cache
    with torch.no_grad():
        image = pipe(prompt, num_inference_steps=cfg.class_image_steps, generator=generator,
                     height=cfg.resolution, width=cfg.resolution).images[0]
    tmp = target.with_name(f"{target.stem}.tmp-{os.getpid()}.png")
    image.save(tmp)
    os.replace(tmp, target)  # a half-written image is never taken as cached
