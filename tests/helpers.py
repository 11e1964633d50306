"""Small helpers several test files share (fixtures live in conftest.py)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

PROMPT = "a photo of sks stuffed animal"


def plain_pipeline(model_dir: Path):
    """The model loaded by plain diffusers, without the studio: the reference a user would have."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, steps: int, prompt: str = PROMPT) -> np.ndarray:
    image = pipe(prompt, num_inference_steps=steps, height=64, width=64, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(0)).images[0]
    return np.asarray(image, dtype=np.int16)


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean())


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@contextmanager
def loaded_pipeline(components: tuple[str, ...] = ("unet", "vae", "text_encoder")):
    """Record the pipeline a training run loads, and its weights as loaded (before any adapter).

    Yields a dict that holds, once the run has loaded its model, "pipe" (the live pipeline, trained
    in place) and "before" ({component: state dict} for each of `components`).
    """
    from studio import models

    seen, real = {}, models.load_pipeline

    def spy(*args, **kwargs):
        pipe = real(*args, **kwargs)
        seen["pipe"] = pipe
        seen["before"] = {n: snapshot(getattr(pipe, n)) for n in components}
        return pipe

    models.load_pipeline = spy
    try:
        yield seen
    finally:
        models.load_pipeline = real
