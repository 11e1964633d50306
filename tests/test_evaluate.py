"""Metrics on constructed embeddings (each property the issue names), prompt sets, the recommendation
rule on a constructed table, and the evaluation protocol with a fake and a real playground."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
import torch

from studio import events
from studio.evaluate import metrics
from studio.evaluate.prompts import build_prompts, subject_kind
from studio.evaluate.protocol import (COLUMNS, SUMMARY_COLUMNS, SUMMARY_CSV, EvalConfig, evaluate, prompts_for,
                                      recommend, rescore)
from studio.errors import StudioError
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


# ----------------------------------------------------------------------------- metrics the issue names

def test_kid_of_a_set_against_itself_is_near_zero_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    x = unit(torch.randn(40, 64, generator=g) + 1.0)  # normalised, like the CLIP and DINO features it gets
    same, m = metrics.kid(x, x.clone())
    # The unbiased estimator leaves out self-pairs within a set but not across them: against itself it
    # gives -2 (mean k(a, a) - mean k(a, b)) / m, which is O(1/m).
    assert m == 40 and abs(same) < 2e-3
    near, _ = metrics.kid(x, unit(torch.randn(40, 64, generator=g) + 1.0))  # same distribution, new sample
    values = []
    for size in (0.5, 1.0, 2.0):
        shift = torch.zeros(64)
        shift[:8] = size
        values.append(metrics.kid(x, unit(torch.randn(40, 64, generator=g) + 1.0 + shift))[0])
    assert abs(near) < 2e-4 and values == sorted(values) and values[1] > 10 * abs(near)


def test_kid_adapts_its_subset_size_to_small_sets():
    g = torch.Generator().manual_seed(1)
    value, m = metrics.kid(torch.randn(5, 4, generator=g), torch.randn(12, 4, generator=g))
    assert m == 5 and math.isfinite(value)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.kid(torch.randn(1, 4), torch.randn(5, 4))


def test_fid_is_zero_for_the_same_set_grows_with_a_shift_and_warns_when_singular():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 4, generator=g)
    assert metrics.fid(x, x)[0] == pytest.approx(0.0, abs=1e-6)
    shifted, warning = metrics.fid(x, x + torch.tensor([3.0, 0, 0, 0]))
    assert shifted == pytest.approx(9.0, rel=1e-6) and warning == ""  # same covariance: |mean shift|^2
    _, warning = metrics.fid(torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g))
    assert "5 images in 16 feature dimensions" in warning


def test_vendi_of_identical_images_is_one_and_of_orthogonal_ones_is_n():
    x = unit(torch.randn(1, 10, generator=torch.Generator().manual_seed(3)))
    assert metrics.vendi(x.repeat(6, 1)) == pytest.approx(1.0, abs=1e-6)
    assert metrics.vendi(torch.eye(7)) == pytest.approx(7.0, abs=1e-6)
    two_groups = torch.cat([torch.eye(4)[0:1].repeat(3, 1), torch.eye(4)[1:2].repeat(3, 1)])
    assert metrics.vendi(two_groups) == pytest.approx(2.0, abs=1e-6)


def test_dataset_against_itself_is_the_maximum_image_similarity():
    g = torch.Generator().manual_seed(4)
    data = unit(torch.randn(1, 16, generator=g) + 0.3 * torch.randn(6, 16, generator=g))
    others = [unit(torch.randn(6, 16, generator=g)), unit(data + 0.8 * torch.randn(6, 16, generator=g))]
    ceiling = metrics.self_similarity(data)
    assert all(metrics.image_similarity(o, data) < ceiling for o in others)
    assert metrics.leave_one_out_similarity(data) == pytest.approx(
        [float((data[i] @ torch.cat([data[:i], data[i + 1:]]).T).mean()) for i in range(6)], abs=1e-6)


@pytest.mark.parametrize("prompt, expected", [
    ("a sks dog in the snow", "a dog in the snow"),
    ("a photo of sks stuffed animal", "a photo of stuffed animal"),
    ("sks, on a beach", "stuffed animal, on a beach"),
    ("a sksy thing", "a sksy thing"),  # only the whole word
])
def test_trigger_is_replaced_by_the_class_word(prompt, expected):
    class_word = "dog" if "dog" in prompt else "stuffed animal"
    assert metrics.replace_trigger(prompt, "sks", class_word) == expected


def test_prompt_kinds_follow_the_lycoris_taxonomy_and_dreambench():
    prompts = build_prompts("sks", "dog", ["a photo of sks dog", "a photo of sks dog"], ["training", "generalization",
                            "agnostic", "context"], own=["a {token} {class} on the moon"], contexts=["in a forest"],
                            per_kind=0, replace=lambda t: metrics.replace_trigger(t, "sks", "dog"))
    kinds = [p.kind for p in prompts]
    assert kinds.count("training") == 1  # captions are de-duplicated
    generalization = [p for p in prompts if p.kind == "generalization"]
    assert len(generalization) == 25 + 1 and generalization[-1].text == "a sks dog on the moon"
    assert "a sks dog wearing a santa hat" in [p.text for p in generalization]  # live-subject list for dogs
    assert all("sks" not in p.clip_text for p in prompts)
    assert all("sks" not in p.text for p in prompts if p.kind in ("agnostic", "context-without"))
    assert [p.kind for p in prompts if p.kind.startswith(("concept", "context"))] == ["concept", "context", "context-without"]
    assert subject_kind("stuffed animal") == "object" and subject_kind("dog") == "live"
    few = build_prompts("sks", "toy", [], ["generalization"], per_kind=4)
    assert len(few) == 4 and few[0].text == "a sks toy in the jungle"


# ----------------------------------------------------------------------------- recommendation

def test_recommendation_picks_the_known_best_point_of_a_constructed_table():
    rows = [  # (point, checkpoint, scale, dino, clip_t): the knee is (b, 0.8, 0.28)
        ("a", 10, 1.0, 0.40, 0.30), ("b", 20, 0.8, 0.62, 0.28), ("c", 20, 1.2, 0.66, 0.20), ("d", 30, 1.0, 0.45, 0.29)]
    summary = pd.DataFrame([dict(point="dataset", kind="baseline", dino=0.8, clip_t=math.nan, checkpoint=0, scale=math.nan)]
                           + [dict(point=p, kind="run", run="r", checkpoint=c, scale=s, dino=d, clip_i=math.nan,
                                   clip_t=t, prompt_similarity=math.nan, adapter=f"/runs/r/{p}") for p, c, s, d, t in rows])
    rec = recommend(summary)
    assert (rec["point"], rec["checkpoint"], rec["scale"], rec["fidelity"], rec["editability"]) == ("b", 20, 0.8, "dino", "clip_t")
    assert "b sits nearest the ideal corner" in rec["reason"]
    without_dino = summary.assign(dino=math.nan, clip_i=summary["dino"])
    assert recommend(without_dino)["fidelity"] == "clip_i"
    assert recommend(summary[summary["kind"] == "baseline"]) is None


# ----------------------------------------------------------------------------- protocol, fake playground

class FakePlayground:
    """Returns other concepts' photos: the base model 'draws' duck toys, the run robot toys.

    Measured with the tiny (random) CLIP against the bear dataset: bear self-similarity 0.962,
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


def test_sweep_rows_baselines_and_recommendation(tmp_path, dataset_dir, run_copy, fake):
    cfg = EvalConfig(dataset=str(dataset_dir), runs=[str(run_copy)], model="tiny", clip="tiny", dino="tiny",
                     contexts=["in a forest", "on a beach"], per_kind=2, seeds=2, steps=2, scales=[0.5, 1.0],
                     checkpoints="all")

    result = evaluate(cfg, tmp_path / "eval", playground=fake)

    assert result.status == "completed", result.message
    summary = result.table.set_index("point")
    run = run_copy.name
    points = [f"{run} @15 ×0.5", f"{run} @15 ×1", f"{run} @30 ×0.5", f"{run} @30 ×1"]
    assert list(summary.index) == ["dataset", "base model"] + points  # every checkpoint at every scale
    assert list(summary.columns) == SUMMARY_COLUMNS[1:]
    assert summary.loc["dataset", "clip_i"] == summary["clip_i"].max()
    assert summary.loc["dataset", "dino"] == summary["dino"].max()
    assert summary.loc["base model", "clip_i"] < summary.loc[points[0], "clip_i"]  # duck further from bear than robot
    # fake images ignore the prompt: with and without the concept, and base and tuned for the same seed and
    # pool, are the same photo
    assert summary.loc["base model", "prompt_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert math.isnan(summary.loc["base model", "preservation"])
    images = result.images
    assert set(images["kind"]) == {"dataset", "training", "generalization", "agnostic", "concept", "context",
                                   "context-without"}
    per_point = images[images["point"] == points[0]]
    # per kind: 1 caption (all five are the same), 2 DreamBench, 2 agnostic, the concept, 2 contexts with and
    # without it; each at 2 seeds
    counts = per_point["kind"].value_counts().to_dict()
    assert counts == {"training": 2, "generalization": 4, "agnostic": 4, "concept": 2, "context": 4,
                      "context-without": 4}
    assert list(images.columns) == COLUMNS
    assert images.loc[images["kind"] == "generalization", "clip_t"].notna().all()
    assert images.loc[images["kind"] == "agnostic", "clip_text"].str.contains("sks").sum() == 0
    assert (images.loc[(images["kind"] == "agnostic") & (images["method"] != "base"), "preservation"].notna()).all()
    assert summary.loc[points[0], "kid_subset"] >= 2 and summary.loc[points[0], "features"] == "dino"
    assert "feature dimensions" in summary.loc[points[0], "warning"]  # a few images in 32 dimensions
    assert summary.loc["dataset", "vendi"] >= 1
    # the recommendation is one of the run's points, with its adapter folder (the checkpoint at step 15)
    assert result.recommendation["point"] in points
    rec_row = summary.loc[result.recommendation["point"]]
    assert result.recommendation["adapter"] == rec_row["adapter"]
    assert (tmp_path / "eval" / SUMMARY_CSV).is_file() and (RunPaths(run_copy).eval / SUMMARY_CSV).is_file()
    # the model was asked for each point with its adapter folder and scale
    asked = {(r.adapters[0].path, r.adapters[0].scale) for r in fake.requests if r.adapters}
    assert asked == {(str(run_copy / "checkpoints" / "step-000015"), 0.5), (str(run_copy / "checkpoints" / "step-000015"), 1.0),
                     (str(run_copy / "adapter"), 0.5), (str(run_copy / "adapter"), 1.0)}


def test_rescore_neither_generates_nor_embeds_and_gives_the_same_numbers(tmp_path, dataset_dir, run_copy, fake,
                                                                        monkeypatch):
    cfg = EvalConfig(dataset=str(dataset_dir), runs=[str(run_copy)], model="tiny", clip="tiny", dino="tiny",
                     contexts=["in a forest"], per_kind=1, seeds=2, steps=2)
    first = evaluate(cfg, tmp_path / "eval", playground=fake)
    from studio.evaluate import dino, embedders

    def refuse(*args, **kwargs):
        raise AssertionError("rescore must not load a model")

    monkeypatch.setattr(embedders, "ClipEmbedder", refuse)
    monkeypatch.setattr(dino, "DinoEmbedder", refuse)
    monkeypatch.setattr(fake, "generate", refuse)
    again = rescore(tmp_path / "eval")
    numeric = ["clip_i", "dino", "clip_t", "prompt_similarity", "preservation", "kid", "vendi"]
    pd.testing.assert_frame_equal(again.table[numeric], first.table[numeric])
    assert again.recommendation == first.recommendation
    with pytest.raises(StudioError, match="not a finished evaluation"):
        rescore(tmp_path)


def test_cancel_stops_promptly_and_saves_nothing(tmp_path, dataset_dir, fake):
    cfg = EvalConfig(dataset=str(dataset_dir), clip="tiny", dino="none", contexts=["in a forest"], seeds=2)
    ticks = []

    def on_event(event):
        if isinstance(event, events.Progress) and event.total:
            ticks.append(event)

    result = evaluate(cfg, tmp_path / "eval", on_event=on_event, should_stop=lambda: len(ticks) >= 3,
                      playground=fake)

    assert result.status == "cancelled" and result.table is None
    assert len(fake.requests) == 3
    assert not (tmp_path / "eval" / RESULTS_CSV).exists()
    last = events.read_events(tmp_path / "eval" / "events.jsonl")[-1]
    assert (last.kind, last.status, last.step) == ("finished", "cancelled", 3)


@pytest.mark.parametrize("values, field", [
    (dict(seeds=0), "seeds"), (dict(kinds=["vibes"]), "kinds"), (dict(checkpoints="some"), "checkpoints"),
    (dict(scales=[5.0]), "scales"), (dict(per_kind=-1), "per_kind"), (dict(guidance=-1.0), "guidance")])
def test_bad_settings_are_one_sentence_naming_the_field(values, field):
    with pytest.raises(StudioError, match=f"'{field}'") as info:
        EvalConfig(dataset="x", **values)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- protocol, real model

def test_real_evaluation_of_a_trained_run(tmp_path, dataset_dir, run_copy):
    cfg = EvalConfig(dataset=str(dataset_dir), runs=[str(run_copy)], model="tiny", clip="tiny", dino="none",
                     kinds=["context", "agnostic"], contexts=["in a forest", "on a beach"], per_kind=2, seeds=1, steps=2)
    seen = []

    result = evaluate(cfg, tmp_path / "eval", on_event=seen.append)

    assert result.status == "completed", result.message
    table = result.table
    assert list(zip(table["point"], table["kind"])) == [
        ("dataset", "baseline"), ("base model", "baseline"), (f"{run_copy.name} @30 ×1", "run")]
    cosines = table["image_similarity"].tolist() + table["prompt_similarity"].tolist()[1:]
    assert all(-1.0 - 1e-5 <= v <= 1.0 + 1e-5 for v in cosines), cosines
    assert table["dino"].isna().all()  # no DINO model: the column stays empty
    assert list(table["n_images"])[1:] == [1 + 2 * 2 + 2] * 2
    assert table["adapter"].iloc[2] == str(run_copy / "adapter")
    assert table["preservation"].iloc[2] < 1.0  # the adapter changed the images of prompts without the trigger

    progress = [e for e in seen if isinstance(e, events.Progress) and e.total]
    assert [e.done for e in progress][:14] == list(range(14)) and all(e.total == 14 for e in progress)
    assert isinstance(seen[-1], events.Finished) and seen[-1].status == "completed"
    in_run = pd.read_csv(RunPaths(run_copy).eval / SUMMARY_CSV)
    assert list(in_run["point"]) == ["dataset", "base model", f"{run_copy.name} @30 ×1"]


def test_the_page_draws_an_evaluation_only_once_its_report_is_written(tmp_path, dataset_dir, run_copy, fake):
    """The report (plots, sweep grid) is on disk before the last event: a timer tick that sees Finished
    draws the results with their grid (a page that drew them without it never drew the grid again)."""
    from studio.evaluate.report import GRID_PNG
    from studio.paths import Workspace
    from studio.ui import evaluate_tab
    from studio.ui.context import Studio

    studio = Studio(Workspace(tmp_path / "ws"), "tiny")
    cfg = EvalConfig(dataset=str(dataset_dir), runs=[str(run_copy)], model="tiny", clip="tiny", dino="tiny",
                     contexts=["in a forest"], per_kind=1, seeds=1, steps=2, scales=[1.0])
    out = tmp_path / "eval"
    at_finish = []  # what a tick drew the moment Finished reached the log (listeners run after the write)

    def tick(event):
        if isinstance(event, events.Finished):
            at_finish.append(((out / GRID_PNG).is_file(), evaluate_tab._view(studio, str(out), None)))

    result = evaluate(cfg, out, on_event=tick, playground=fake)
    assert result.status == "completed" and [p.name for p in result.plots if p.suffix == ".png"] == [GRID_PNG]
    (grid_on_disk, (status, scatter, heatmap, grid, *_, drawn)), = at_finish
    assert grid_on_disk
    assert grid == str(out / GRID_PNG) and (out / GRID_PNG).is_file()
    assert status.startswith(events.read_events(out / "events.jsonl")[-1].message)
    assert drawn is not None
    assert evaluate_tab._view(studio, str(out), drawn)[-1] == drawn  # later ticks redraw nothing
