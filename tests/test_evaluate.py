"""Metrics on constructed embeddings, and the evaluation protocol with a fake and a real playground."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
import torch

from studio import events
from studio.evaluate import metrics
from studio.evaluate.protocol import COLUMNS, EvalConfig, evaluate, prompts_for
from studio.generate import GenerateRequest
from studio.paths import RESULTS_CSV, RunPaths


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------- metrics

def test_identical_embeddings_have_similarity_one():
    x = unit(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)))
    assert metrics.paired_similarity(x, x) == pytest.approx(1.0, abs=1e-6)
    assert metrics.self_similarity(x[:1].repeat(3, 1)) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(metrics.cosine_matrix(x, x).diagonal(), torch.ones(4), atol=1e-6)


def test_self_similarity_leaves_out_the_diagonal():
    x = torch.eye(3)  # three orthogonal unit vectors: every distinct pair has cosine 0
    assert metrics.self_similarity(x) == pytest.approx(0.0)
    assert metrics.image_similarity(x, x) == pytest.approx(1 / 3)  # diagonal included there
    pair = unit(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert metrics.self_similarity(pair) == pytest.approx(math.cos(math.pi / 4))
    assert metrics.self_similarity(pair[:1]) == 1.0  # a single image: nothing to compare


def test_paired_similarity_of_orthogonal_rows_is_zero():
    a, b = torch.eye(4)[:2], torch.eye(4)[2:]
    assert metrics.paired_similarity(a, b) == pytest.approx(0.0)
    assert metrics.paired_similarity(a, -a) == pytest.approx(-1.0)
    # Paired, not all-pairs: row i only meets row i.
    assert metrics.paired_similarity(torch.eye(2), torch.eye(2).flip(0)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="shape"):
        metrics.paired_similarity(torch.eye(3), torch.eye(2))


def test_image_similarity_is_the_mean_over_all_pairs():
    gen = unit(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    ref = unit(torch.tensor([[1.0, 0.0]]))
    assert metrics.image_similarity(gen, ref) == pytest.approx(0.5)


def test_metrics_stay_within_minus_one_and_one():
    g = torch.Generator().manual_seed(1)
    a, b = unit(torch.randn(7, 32, generator=g)), unit(torch.randn(7, 32, generator=g))
    values = [metrics.image_similarity(a, b), metrics.self_similarity(a), metrics.paired_similarity(a, b)]
    values += metrics.cosine_matrix(a, b).flatten().tolist()
    assert all(-1 - 1e-6 <= v <= 1 + 1e-6 for v in values)


def test_prompts_pair_each_context_with_and_without_the_concept():
    concept, pairs = prompts_for("sks", "stuffed animal", ["in a forest", "on a beach"])
    assert concept == "a photo of sks stuffed animal"
    assert pairs == [("a photo of sks stuffed animal in a forest", "a photo in a forest"),
                     ("a photo of sks stuffed animal on a beach", "a photo on a beach")]


# ----------------------------------------------------------------------------- protocol, fake playground

class FakePlayground:
    """Returns other concepts' photos: the base model 'draws' duck toys, the run robot toys.

    Measured with the built-in (random) CLIP against the bear dataset: bear self-similarity 0.962,
    duck 0.897, robot 0.926 (backpack_dog, at 0.960, is too close to use).
    """

    def __init__(self, photos: dict[str, list]):
        self.photos = photos
        self.requests: list[GenerateRequest] = []

    def generate(self, req: GenerateRequest):
        self.requests.append(req)
        pool = self.photos["robot_toy" if req.adapters else "duck_toy"]
        return pool[req.seed % len(pool)].copy()


@pytest.fixture
def fake(dreambench_photos) -> FakePlayground:
    return FakePlayground({c: dreambench_photos(c, 64) for c in ("duck_toy", "robot_toy")})


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """The trained run, copied so evaluation results written into it stay in this test."""
    return shutil.copytree(trained_run, tmp_path / "runs" / trained_run.name)


def test_dataset_baseline_is_the_highest_image_similarity(tmp_path, dataset_dir, run_copy, fake):
    cfg = EvalConfig(dataset=str(dataset_dir), runs=[str(run_copy)], model="builtin", clip="builtin",
                     contexts=["in a forest", "on a beach"], seeds=3, steps=2)

    result = evaluate(cfg, tmp_path / "eval", playground=fake)

    assert result.status == "completed", result.message
    table = result.table.set_index("subject")
    assert list(table.index) == ["dataset", "base model", run_copy.name]
    sims = table["image_similarity"]
    assert sims["dataset"] == sims.max()
    assert sims["dataset"] > sims["base model"] + 0.02 and sims["dataset"] > sims[run_copy.name] + 0.02
    assert sims["base model"] < sims[run_copy.name]  # duck is further from the bear than robot
    # Fake images ignore the prompt, so with and without the concept are the same photo.
    assert table.loc["base model", "prompt_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert math.isnan(table.loc["dataset", "prompt_similarity"])
    assert list(table["kind"]) == ["baseline", "baseline", "run"]
    assert list(table["n_images"]) == [5, 3 * (1 + 2 * 2), 3 * (1 + 2 * 2)]
    assert table.loc["base model", "scale"] == 0.0 and table.loc[run_copy.name, "scale"] == 1.0

    # The protocol asked for the right prompts: per subject, concept then each context pair, seeds 0..2.
    asked = [(r.prompt, r.seed, bool(r.adapters)) for r in fake.requests]
    concept, pairs = prompts_for("sks", "stuffed animal", cfg.contexts)
    prompts = [concept] * 3 + [p for w, wo in pairs for p in [w] * 3 + [wo] * 3]
    seeds = [0, 1, 2] * 5
    assert asked == [(p, s, False) for p, s in zip(prompts, seeds)] + [(p, s, True) for p, s in zip(prompts, seeds)]
    assert all(r.model == "builtin" and r.steps == 2 for r in fake.requests)

    csv = pd.read_csv(tmp_path / "eval" / RESULTS_CSV)
    assert list(csv.columns) == COLUMNS
    assert list(csv["subject"]) == ["dataset", "base model", run_copy.name]
    assert csv["image_similarity"].tolist() == pytest.approx(result.table["image_similarity"].tolist())
    assert (RunPaths(run_copy).eval / RESULTS_CSV).is_file()
    assert len(list((tmp_path / "eval" / "images" / "base-model").glob("*.png"))) == 15


def test_cancel_stops_promptly_and_saves_nothing(tmp_path, dataset_dir, fake):
    cfg = EvalConfig(dataset=str(dataset_dir), clip="builtin", contexts=["in a forest"], seeds=2)
    ticks = []

    def on_event(event):
        if isinstance(event, events.Progress):
            ticks.append(event)

    result = evaluate(cfg, tmp_path / "eval", on_event=on_event, should_stop=lambda: len(ticks) >= 3,
                      playground=fake)

    assert result.status == "cancelled" and result.table is None
    assert len(fake.requests) == 3
    assert not (tmp_path / "eval" / RESULTS_CSV).exists()
    last = events.read_events(tmp_path / "eval" / "events.jsonl")[-1]
    assert (last.kind, last.status, last.step) == ("finished", "cancelled", 3)


# ----------------------------------------------------------------------------- protocol, real model

def test_real_evaluation_of_a_trained_run(tmp_path, dataset_dir, run_copy):
    cfg = EvalConfig(dataset=str(dataset_dir), runs=[str(run_copy)], model="builtin", clip="builtin",
                     contexts=["in a forest", "on a beach"], seeds=1, steps=2)
    seen = []

    result = evaluate(cfg, tmp_path / "eval", on_event=seen.append)

    assert result.status == "completed", result.message
    table = result.table
    assert list(table.columns) == COLUMNS
    assert list(zip(table["subject"], table["kind"])) == [
        ("dataset", "baseline"), ("base model", "baseline"), (run_copy.name, "run")]
    cosines = table["image_similarity"].tolist() + table["prompt_similarity"].tolist()[1:]
    assert all(-1.0 - 1e-5 <= v <= 1.0 + 1e-5 for v in cosines), cosines
    assert list(table["n_images"])[1:] == [1 + 2 * 2] * 2
    assert table["path"].iloc[2] == str(run_copy / "adapter")

    progress = [e for e in seen if isinstance(e, events.Progress)]
    assert [e.done for e in progress] == list(range(10)) and all(e.total == 10 for e in progress)
    assert isinstance(seen[-1], events.Finished) and seen[-1].status == "completed"

    in_run = pd.read_csv(RunPaths(run_copy).eval / RESULTS_CSV)
    assert list(in_run.columns) == COLUMNS
    assert list(in_run["subject"]) == ["dataset", "base model", run_copy.name]
    assert in_run["image_similarity"].tolist() == pytest.approx(table["image_similarity"].tolist())
    assert (tmp_path / "eval" / RESULTS_CSV).is_file()
