"""DataFrames and events -> plotly figures. No gradio here: the CLI and notebooks use them too."""

from __future__ import annotations

import math

from studio import events as ev

MIN_SPAN = 0.05  # smallest axis span of the evaluation scatter, in cosine units


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (the first points are not pulled to 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def loss_figure(run_events: list, title: str = "Training loss"):
    import plotly.graph_objects as go

    steps = [e for e in run_events if isinstance(e, ev.Step)]
    fig = go.Figure()
    x, y = [e.step for e in steps], [e.loss for e in steps]
    fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name="loss", line=dict(color="rgba(99,110,250,0.35)")))
    fig.add_trace(go.Scatter(x=x, y=smooth(y), mode="lines", name="smoothed", line=dict(color="rgb(99,110,250)", width=3)))
    total = steps[-1].total_steps if steps else None
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss", height=320,
                      margin=dict(l=40, r=10, t=40, b=40), legend=dict(orientation="h", y=-0.25))
    if total:
        fig.update_xaxes(range=[0, total])
    return fig


def eval_scatter(table):
    """Image similarity (x: concept fidelity) against prompt similarity (y: editability)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if table is None or len(table) == 0:
        return fig
    runs = table[table["kind"] == "run"]
    base = table[table["subject"] == "base model"]
    dataset = table[table["subject"] == "dataset"]
    fig.add_trace(go.Scatter(x=runs["image_similarity"], y=runs["prompt_similarity"], mode="markers+text",
                             text=runs["subject"], textposition="top center", name="runs", marker=dict(size=12)))
    if len(base):
        fig.add_trace(go.Scatter(x=base["image_similarity"], y=base["prompt_similarity"], mode="markers+text",
                                 text=["base model"], textposition="bottom center", name="base model (no concept)",
                                 marker=dict(size=12, symbol="diamond", color="gray")))
    for value in dataset["image_similarity"]:
        if not math.isnan(value):
            fig.add_vline(x=value, line_dash="dash", line_color="green",
                          annotation_text="dataset vs itself", annotation_position="top left")
    # Cosines differ in the second decimal between real methods; never let the axes blow a 1e-6
    # difference up to full height, which would make noise look like a finding.
    for axis, column in (("xaxis", "image_similarity"), ("yaxis", "prompt_similarity")):
        values = [v for v in table[column] if not math.isnan(v)]
        if values and max(values) - min(values) < MIN_SPAN:
            mid = (max(values) + min(values)) / 2
            fig.update_layout({axis: dict(range=[mid - MIN_SPAN / 2, mid + MIN_SPAN / 2])})
    fig.update_layout(title="Concept fidelity vs prompt fidelity", xaxis_title="image similarity (CLIP)",
                      yaxis_title="prompt similarity (CLIP)", height=420, margin=dict(l=40, r=10, t=50, b=40))
    return fig
