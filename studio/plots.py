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
    """Guralnick et al.'s view: image similarity (x: concept fidelity) against prompt similarity (y)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if table is None or len(table) == 0:
        return fig
    runs = table[table["kind"] == "run"]
    base = table[table["point"] == "base model"]
    dataset = table[table["point"] == "dataset"]
    fig.add_trace(go.Scatter(x=runs["image_similarity"], y=runs["prompt_similarity"], mode="markers+text",
                             text=runs["point"], textposition="top center", name="runs", marker=dict(size=12)))
    if len(base):
        fig.add_trace(go.Scatter(x=base["image_similarity"], y=base["prompt_similarity"], mode="markers+text",
                                 text=["base model"], textposition="bottom center", name="base model (no concept)",
                                 marker=dict(size=12, symbol="diamond", color="gray")))
    for value in dataset["image_similarity"]:
        if not math.isnan(value):
            fig.add_vline(x=value, line_dash="dash", line_color="green",
                          annotation_text="dataset vs itself", annotation_position="top left")
    _min_span(fig, table, "image_similarity", "prompt_similarity")
    fig.update_layout(title="Concept fidelity vs prompt fidelity", xaxis_title="image similarity (CLIP)",
                      yaxis_title="prompt similarity (CLIP)", height=420, margin=dict(l=40, r=10, t=50, b=40))
    return fig


def _min_span(fig, table, x: str, y: str) -> None:
    """Cosines differ in the second decimal between real methods; never let the axes blow a 1e-6
    difference up to full height, which would make noise look like a finding."""
    for axis, column in (("xaxis", x), ("yaxis", y)):
        values = [v for v in table[column] if not math.isnan(v)]
        if values and max(values) - min(values) < MIN_SPAN:
            mid = (max(values) + min(values)) / 2
            fig.update_layout({axis: dict(range=[mid - MIN_SPAN / 2, mid + MIN_SPAN / 2])})


LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "prompt_similarity": "prompt similarity"}


def tradeoff(summary, recommendation: dict | None = None, references: list[dict] | None = None):
    """Concept fidelity (y: DINO, or CLIP-I) against prompt fidelity (x: CLIP-T, or prompt similarity):
    one line per run through its checkpoints and scales, the base model, the dataset's ceiling, the
    recommended point, and the paper's reference numbers when they were measured the same way."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if summary is None or len(summary) == 0:
        return fig
    runs = summary[summary["kind"] == "run"]
    y = "dino" if summary["dino"].notna().any() else "clip_i"
    x = "clip_t" if summary["clip_t"].notna().any() else "prompt_similarity"
    for run, part in runs.groupby("run", sort=False):
        part = part.sort_values(["checkpoint", "scale"])
        labels = [f"@{c} ×{s:g}" for c, s in zip(part["checkpoint"], part["scale"])]
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="lines+markers+text", text=labels,
                                 textposition="top center", name=str(run), marker=dict(size=10)))
    base = summary[summary["point"] == "base model"]
    if len(base):
        fig.add_trace(go.Scatter(x=base[x], y=base[y], mode="markers", name="base model",
                                 marker=dict(size=13, symbol="diamond", color="gray")))
    for value in summary.loc[summary["point"] == "dataset", y]:
        if not math.isnan(value):
            fig.add_hline(y=value, line_dash="dash", line_color="green",
                          annotation_text="your photos vs each other", annotation_position="bottom right")
    if recommendation and recommendation.get("point") in set(runs["point"]):
        best = runs[runs["point"] == recommendation["point"]].iloc[0]
        fig.add_trace(go.Scatter(x=[best[x]], y=[best[y]], mode="markers", name="recommended",
                                 marker=dict(size=22, symbol="star", color="gold", line=dict(color="black", width=1))))
    for ref in references or []:
        if not math.isnan(ref.get(y, math.nan)) and not math.isnan(ref.get(x, math.nan)):
            fig.add_trace(go.Scatter(x=[ref[x]], y=[ref[y]], mode="markers+text", text=[ref["label"]],
                                     textposition="bottom center", name=ref["label"],
                                     marker=dict(size=10, symbol="circle-open", color="black")))
    _min_span(fig, summary, x, y)
    fig.update_layout(title="Concept fidelity against prompt fidelity (upper right is best)",
                      xaxis_title=f"{LABELS[x]}: does it follow the prompt?",
                      yaxis_title=f"{LABELS[y]}: is it your concept?", height=440,
                      margin=dict(l=40, r=10, t=50, b=40))
    return fig


def prompt_heatmap(images, metric: str = "clip_t"):
    """Per prompt (rows) and point (columns): the mean of `metric` over seeds."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if images is None or len(images) == 0 or metric not in images:
        return fig
    part = images[images[metric].notna() & (images["kind"] != "dataset")]
    if part.empty:
        return fig
    grid = part.pivot_table(index="prompt", columns="point", values=metric, aggfunc="mean", sort=False)
    fig.add_trace(go.Heatmap(z=grid.values, x=[str(c) for c in grid.columns], y=[str(i) for i in grid.index],
                             colorscale="Viridis", colorbar=dict(title=LABELS.get(metric, metric))))
    fig.update_layout(title=f"{LABELS.get(metric, metric)} per prompt", height=max(300, 22 * len(grid) + 120),
                      margin=dict(l=10, r=10, t=50, b=40), yaxis=dict(automargin=True))
    return fig


def sweep_grid(images, root, thumb: int = 96, kinds=("generalization", "training", "concept"), max_prompts: int = 6):
    """A PIL image: one row per point, one column per prompt (first seed), each cell a thumbnail."""
    from pathlib import Path

    from PIL import Image, ImageDraw

    part = images[images["kind"].isin(kinds)]
    part = part[part["seed"] == part["seed"].min()]
    if part.empty:
        return None
    prompts = list(dict.fromkeys(part["prompt"]))[:max_prompts]
    points = list(dict.fromkeys(part["point"]))
    label_w = 150
    sheet = Image.new("RGB", (label_w + thumb * len(prompts), thumb * len(points)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, point in enumerate(points):
        draw.text((4, r * thumb + thumb // 2 - 6), str(point)[:24], fill="black")
        for c, prompt in enumerate(prompts):
            hit = part[(part["point"] == point) & (part["prompt"] == prompt)]
            if hit.empty:
                continue
            with Image.open(Path(root) / hit.iloc[0]["file"]) as im:
                sheet.paste(im.convert("RGB").resize((thumb, thumb)), (label_w + c * thumb, r * thumb))
    return sheet
