"""Figures from events and result tables."""

from __future__ import annotations

import math

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
        dict(subject="dataset", kind="baseline", image_similarity=0.9, prompt_similarity=math.nan),
        dict(subject="base model", kind="baseline", image_similarity=0.5, prompt_similarity=y_values[0]),
        dict(subject="run-a", kind="run", image_similarity=0.8, prompt_similarity=y_values[1]),
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

    studio = Studio(Workspace(tmp_path), "builtin")
    assert latest_folder(studio) is None
    for name in ("20260101-000000", "20260102-000000"):
        (tmp_path / "evals" / name).mkdir(parents=True)
        (tmp_path / "evals" / name / "events.jsonl").write_text("")
    assert latest_folder(studio) == str(tmp_path / "evals" / "20260102-000000")
