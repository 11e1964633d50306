"""Figures from events and result tables."""

from __future__ import annotations

import math

import pytest

import pandas as pd

from studio import events, plots


def test_smoothing_is_unbiased_at_the_start_and_follows_a_constant():
    assert plots.smooth([2.0, 2.0, 2.0]) == [2.0, 2.0, 2.0]  # no pull towards 0 at the first points
    s = plots.smooth([1.0] * 5 + [0.0] * 50)
    assert s[0] == 1.0 and 0.0 <= s[-1] < 0.01


def test_loss_figure_has_raw_and_smoothed_curves_over_the_whole_run():
    history = [events.Step(i, 10, 1.0 / i, 1e-4, 0.1 * i) for i in range(1, 5)]
    fig = plots.loss_figure(history)
    assert [t.name for t in fig.data] == ["loss", "smoothed"]
    assert list(fig.data[0].y) == [1.0, 0.5, 1 / 3, 0.25]
    assert tuple(fig.layout.xaxis.range) == (0, 10)


def _table(y_values):
    return pd.DataFrame([
        dict(point="dataset", kind="baseline", image_similarity=0.9, prompt_similarity=math.nan),
        dict(point="base model", kind="baseline", image_similarity=0.5, prompt_similarity=y_values[0]),
        dict(point="run-a", kind="run", image_similarity=0.8, prompt_similarity=y_values[1]),
    ])


def test_scatter_never_magnifies_tiny_differences():
    fig = plots.eval_scatter(_table([0.999973, 0.999977]))
    low, high = fig.layout.yaxis.range
    assert high - low >= plots.MIN_SPAN - 1e-9
    assert low < 0.999973 and high > 0.999977


def test_scatter_shows_runs_base_and_dataset_line():
    fig = plots.eval_scatter(_table([0.6, 0.7]))
    assert fig.layout.yaxis.range is None  # a real spread keeps plotly's own range
    names = [t.name for t in fig.data]
    assert "runs" in names and "base model (no concept)" in names
    assert fig.layout.shapes[0].x0 == 0.9  # the dataset-vs-itself line


def test_a_fresh_page_shows_the_newest_evaluation(tmp_path):
    from studio.paths import Workspace
    from studio.ui.context import Studio
    from studio.ui.evaluate_tab import latest_folder

    studio = Studio(Workspace(tmp_path), "tiny")
    assert latest_folder(studio) is None
    for name in ("20260101-000000", "20260102-000000"):
        (tmp_path / "evals" / name).mkdir(parents=True)
        (tmp_path / "evals" / name / "events.jsonl").write_text("")
    assert latest_folder(studio) == str(tmp_path / "evals" / "20260102-000000")


def _summary():
    rows = [dict(point="dataset", kind="baseline", run="dataset", checkpoint=0, scale=math.nan, dino=0.8, clip_i=0.9,
                 clip_t=math.nan, prompt_similarity=math.nan)]
    rows += [dict(point="base model", kind="baseline", run="base model", checkpoint=0, scale=0.0, dino=0.2,
                  clip_i=0.5, clip_t=0.31, prompt_similarity=0.9)]
    rows += [dict(point=f"r @{c} ×{s:g}", kind="run", run="r", checkpoint=c, scale=s, dino=0.3 + 0.1 * s + c / 100,
                  clip_i=0.6, clip_t=0.3 - 0.02 * s, prompt_similarity=0.8) for c in (10, 20) for s in (0.5, 1.0)]
    import pandas as pd

    return pd.DataFrame(rows)


def test_tradeoff_has_a_curve_per_run_the_base_the_ceiling_and_the_recommendation():
    summary = _summary()
    fig = plots.tradeoff(summary, {"point": "r @20 ×1"}, references=[dict(label="paper", dino=0.6, clip_t=0.3)])
    names = [t.name for t in fig.data]
    assert names == ["r", "base model", "recommended", "paper"]
    run = fig.data[0]
    assert list(run.x) == pytest.approx([0.29, 0.28, 0.29, 0.28]) and len(run.y) == 4  # every checkpoint x scale
    assert fig.layout.yaxis.title.text.startswith("DINO") and fig.layout.xaxis.title.text.startswith("CLIP-T")
    assert any(shape.y0 == 0.8 for shape in fig.layout.shapes)  # the dataset's ceiling
    no_dino = plots.tradeoff(summary.assign(dino=math.nan))
    assert no_dino.layout.yaxis.title.text.startswith("CLIP-I")


def test_heatmap_is_prompts_by_points_and_the_grid_has_a_cell_per_point_and_prompt(tmp_path):
    import pandas as pd
    from PIL import Image

    rows = []
    for p, point in enumerate(["base model", "r @10 ×1"]):
        for q, prompt in enumerate(["a sks toy in the snow", "a sks toy on the beach"]):
            for seed in (0, 1):
                file = f"{p}-{q}-{seed}.png"
                Image.new("RGB", (16, 16), (100 * p, 100 * q, 0)).save(tmp_path / file)
                rows.append(dict(point=point, kind="generalization", prompt=prompt, seed=seed, file=file,
                                 clip_t=0.1 * p + 0.01 * q + 0.001 * seed))
    images = pd.DataFrame(rows)
    heat = plots.prompt_heatmap(images).data[0]
    assert list(heat.y) == ["a sks toy in the snow", "a sks toy on the beach"] and list(heat.x) == ["base model", "r @10 ×1"]
    assert heat.z[1][1] == pytest.approx(0.1 + 0.01 + 0.0005)  # mean over seeds
    grid = plots.sweep_grid(images, tmp_path, thumb=16)
    assert grid.size == (150 + 2 * 16, 2 * 16)
    assert grid.getpixel((150 + 16 + 8, 16 + 8)) == (100, 100, 0)  # row: second point, column: second prompt
