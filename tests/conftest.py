"""Shared test setup: an offline, throw-away environment and a few session fixtures.

Environment (set at import, before any studio, diffusers or huggingface_hub import, because
huggingface_hub reads HF_HUB_OFFLINE once when it is imported):

- HF_HUB_OFFLINE=1: nothing may reach a model hub; an unknown id must fail fast and clearly.
- STUDIO_CACHE: a session temp folder, so the tiny model and the tiny CLIP are written fresh for
  the session (about a second each) and never touch the user's cache.
- STUDIO_WORKSPACE: a session temp folder; `dataset_dir` and `trained_run` live inside it, so UI
  and CLI tests see them in the workspace's dataset and run lists.
- OMP_NUM_THREADS=1 unless set: the models are tiny, and two OpenMP threads on two cores shared
  with an app server and a browser (the browser tests) spin-wait on each other: measured 144 s
  for this suite with 2 threads under such load, 27 s with 1.

Session fixtures other test files reuse:

- `dreambench`:        Path of shared/data/dreambench (beside the repo checkout).
- `dreambench_photos`: factory (concept, size=256) -> list of RGB PIL images, downscaled.
- `photos_dir`:        folder of the 5 bear_plushie photos as 256-px JPEGs (00.jpg .. 04.jpg).
- `workspace`:         studio.paths.Workspace at STUDIO_WORKSPACE.
- `tiny_model`:        Path of the tiny random-weight diffusers model ('tiny', written on first use):
                       for tests of code paths; it renders 64 px in ~0.2 s and draws noise.
- `builtin_model`:     Path of the shipped pocket model ('builtin', assets/pocket-sd): for tests of
                       what a model that draws does (tests/test_pocket.py).
- `dataset_dir`:       dataset prepared from `photos_dir` at 64 px, token 'sks', class 'stuffed animal'.
- `trained_run`:       run folder of a completed 30-step LoRA run on 'tiny' over `dataset_dir`
                       (learning rate 1e-2, checkpoint at step 15, one final 2-step sample).
                       Treat it as read-only; copy it (shutil.copytree) to change it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="studio-tests-"))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by torch when it starts; inherited by subprocesses
if "torch" in sys.modules:  # a plugin imported it first: tell it directly
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["STUDIO_CACHE"] = str(_SESSION_TMP / "cache")
os.environ["STUDIO_WORKSPACE"] = str(_SESSION_TMP / "workspace")

if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo on sys.path
    sys.path.insert(0, str(REPO))

PROMPT = "a photo of sks stuffed animal"
TRAIN_STEPS = 30


def pytest_unconfigure(config):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def dreambench() -> Path:
    if not (DREAMBENCH / "bear_plushie").is_dir():
        pytest.fail(f"Test photos are missing: expected {DREAMBENCH}/<concept>/*.jpg beside the repo checkout.")
    return DREAMBENCH


def _downscaled(path: Path, size: int):
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG DCT scaling: decodes a 2048-px photo ~8x faster
        im = ImageOps.exif_transpose(im).convert("RGB")
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    return im


@pytest.fixture(scope="session")
def dreambench_photos(dreambench):
    """Factory: dreambench_photos('duck_toy', size=256) -> that concept's photos, longest side `size`."""
    cache: dict[tuple[str, int], list] = {}

    def load(concept: str, size: int = 256) -> list:
        key = (concept, size)
        if key not in cache:
            files = sorted((dreambench / concept).glob("*.jpg"))
            assert files, f"no photos for concept '{concept}' in {dreambench}"
            cache[key] = [_downscaled(p, size) for p in files]
        return [im.copy() for im in cache[key]]

    return load


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory, dreambench) -> Path:
    out = tmp_path_factory.mktemp("bear_photos")
    files = sorted((dreambench / "bear_plushie").glob("*.jpg"))[:5]
    assert len(files) == 5
    for path in files:
        _downscaled(path, 256).save(out / path.name, quality=92)
    return out


@pytest.fixture(scope="session")
def workspace():
    from studio.paths import Workspace

    return Workspace.default()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from studio import models

    return models.ensure_tiny(models.tiny_dir())


@pytest.fixture(scope="session")
def builtin_model() -> Path:
    from studio import models

    return models.builtin_dir()


@pytest.fixture(scope="session")
def dataset_dir(photos_dir, workspace) -> Path:
    from studio.data.dataset import prep_folder

    out = workspace.dataset("bear_plushie").root
    spec, problems = prep_folder(photos_dir, out, "sks", "stuffed animal", 64)
    assert problems == [] and len(spec.items) == 5
    return out


@pytest.fixture(scope="session")
def trained_run(dataset_dir, tiny_model, workspace) -> Path:
    from studio import train
    from studio.config import build_config

    cfg = build_config(values=dict(
        model="tiny", dataset=str(dataset_dir), steps=TRAIN_STEPS,
        # 100x the default rate, so 30 steps move the adapter far enough to change images clearly.
        learning_rate=1e-2, sample_every=0, sample_steps=2, checkpoint_every=15))
    result = train.run(cfg, workspace.run("bear-lora").root)
    assert result.status == "completed", result.message
    return result.run_dir
