"""The concept-insertion protocol of Guralnick, Deng & Weerasinghe ("Evaluating the Efficacy of
Fine-Tuning Methods for Concept Insertion"):

- image similarity: mean pairwise CLIP cosine between images generated from
  "a photo of <token> <class>" and the dataset's images (does it reproduce the concept?);
- prompt similarity: mean CLIP cosine between images for a context prompt with the concept
  ("a photo of <token> <class> in a forest") and the same prompt without it ("a photo in a forest"),
  paired by seed (does the context survive the concept?).

Baselines: the dataset against itself (image similarity only: the ceiling) and the base model
without any adapter, given the same prompts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from studio import events
from studio.adapters import find_adapter_dir
from studio.data.dataset import load_dataset
from studio.errors import StudioError
from studio.evaluate import metrics
from studio.evaluate.embedders import ClipEmbedder
from studio.evaluate.prompts import DEFAULT_CONTEXTS, prompts_for
from studio.generate import AdapterChoice, GenerateRequest, Playground
from studio.paths import DatasetPaths, RESULTS_CSV, RunPaths, safe_name

COLUMNS = ["subject", "kind", "image_similarity", "prompt_similarity", "n_images", "scale", "path"]


@dataclass
class EvalConfig:
    dataset: str
    runs: list[str] = field(default_factory=list)
    model: str = ""
    clip: str = ""
    contexts: list[str] = field(default_factory=lambda: list(DEFAULT_CONTEXTS))
    seeds: int = 2  # images per prompt, seeds 0..n-1
    steps: int = 20
    guidance: float = 7.5
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("seeds", "steps"):
            if int(getattr(self, name)) < 1:
                raise StudioError(f"Evaluation setting '{name}' must be at least 1, got {getattr(self, name)!r}.")
        if self.guidance < 0:
            raise StudioError(f"Evaluation setting 'guidance' must be 0 or more, got {self.guidance!r}.")


@dataclass
class EvalResult:
    status: str
    message: str
    table: object  # pandas.DataFrame
    out_dir: Path


class _Cancelled(Exception):
    pass


def evaluate(cfg: EvalConfig, out_dir: Path, on_event: Callable | None = None,
             should_stop: Callable[[], bool] | None = None, playground: Playground | None = None) -> EvalResult:
    import pandas as pd

    spec = load_dataset(Path(cfg.dataset))
    subjects = [("base model", None)] + [(RunPaths(Path(r)).run_id, find_adapter_dir(Path(r))) for r in cfg.runs]
    out_dir = Path(out_dir)
    emit = events.Emitter(out_dir / "events.jsonl", on_event)
    embedder = ClipEmbedder(cfg.clip)
    if embedder.notice:
        emit(events.Progress(0, 0, embedder.notice))
    dataset_images = [_open(p) for p in DatasetPaths(Path(cfg.dataset)).image_files()]
    reference = embedder.embed_images(dataset_images)
    rows = [dict(subject="dataset", kind="baseline", image_similarity=metrics.self_similarity(reference),
                 prompt_similarity=math.nan, n_images=len(dataset_images), scale=math.nan, path=str(cfg.dataset))]
    concept, pairs = prompts_for(spec.token, spec.class_word, cfg.contexts)
    total = len(subjects) * cfg.seeds * (1 + 2 * len(pairs))
    counter = _Counter(total, emit, should_stop or (lambda: False))
    playground = playground or Playground()
    try:
        for name, adapter in subjects:
            rows.append(_score_subject(name, adapter, cfg, concept, pairs, reference, embedder,
                                       playground, counter, out_dir))
    except _Cancelled:
        emit(events.Finished("cancelled", counter.done, "Evaluation cancelled; nothing was saved."))
        return EvalResult("cancelled", "Evaluation cancelled; nothing was saved.", None, out_dir)
    table = pd.DataFrame(rows, columns=COLUMNS)
    _save(table, out_dir, subjects)
    message = f"Evaluated {len(subjects) - 1} run(s) on {counter.done} generated images."
    emit(events.Finished("completed", counter.done, message))
    return EvalResult("completed", message, table, out_dir)


def _score_subject(name, adapter, cfg, concept, pairs, reference, embedder, playground, counter, out_dir) -> dict:
    choices = [AdapterChoice(str(adapter), cfg.scale)] if adapter else []
    folder = out_dir / "images" / safe_name(name)
    folder.mkdir(parents=True, exist_ok=True)

    def render(prompt: str, seed: int, tag: str):
        counter.tick(f"{name}: {prompt}")
        image = playground.generate(GenerateRequest(prompt, cfg.model, choices, seed=seed, steps=cfg.steps,
                                                    guidance=cfg.guidance))
        image.save(folder / f"{tag}-seed{seed}.png")
        return image

    seeds = range(cfg.seeds)
    concept_images = [render(concept, s, "concept") for s in seeds]
    with_images, without_images = [], []
    for i, (with_prompt, without_prompt) in enumerate(pairs):
        with_images += [render(with_prompt, s, f"context{i}-with") for s in seeds]
        without_images += [render(without_prompt, s, f"context{i}-without") for s in seeds]
    image_sim = metrics.image_similarity(embedder.embed_images(concept_images), reference)
    prompt_sim = (metrics.paired_similarity(embedder.embed_images(with_images), embedder.embed_images(without_images))
                  if pairs else math.nan)
    return dict(subject=name, kind="run" if adapter else "baseline", image_similarity=image_sim,
                prompt_similarity=prompt_sim, n_images=len(concept_images) + len(with_images) + len(without_images),
                scale=cfg.scale if adapter else 0.0, path=str(adapter or ""))


def _save(table, out_dir: Path, subjects) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / RESULTS_CSV, index=False)
    for _, adapter in subjects:  # each run keeps the rows that concern it, beside the baselines
        if adapter is None:
            continue
        run = RunPaths(Path(adapter).parent)
        if run.config.exists():
            run.eval.mkdir(parents=True, exist_ok=True)
            keep = (table["kind"] == "baseline") | (table["path"] == str(adapter))
            table[keep].to_csv(run.eval / RESULTS_CSV, index=False)


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


class _Counter:
    def __init__(self, total: int, emit, should_stop):
        self.total, self.done, self.emit, self.should_stop = total, 0, emit, should_stop
        self.start = time.perf_counter()

    def tick(self, message: str) -> None:
        if self.should_stop():
            raise _Cancelled()
        self.emit(events.Progress(self.done, self.total, message))
        self.done += 1
