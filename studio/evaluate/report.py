"""An evaluation's plots as files beside its tables: the trade-off and per-prompt heat map as HTML
(plotly, loading plotly.js from its CDN), the sweep's image grid as PNG. Also the sentence that
tells the user what the recommendation means, and whether the paper's reference numbers apply."""

from __future__ import annotations

import math
from pathlib import Path

from studio import plots
from studio.evaluate.settings import SETTINGS, read_settings

TRADEOFF_HTML = "tradeoff.html"
HEATMAP_HTML = "prompts.html"
GRID_PNG = "grid.png"
# DreamBooth paper (Ruiz et al. 2023), Table 1, on DreamBench: shown beside results of real encoders.
PAPER_REFERENCE = [
    dict(label="real images (paper)", dino=0.774, clip_i=0.885, clip_t=math.nan),
    dict(label="DreamBooth, SD (paper)", dino=0.668, clip_i=0.803, clip_t=0.305),
    dict(label="Textual Inversion, SD (paper)", dino=0.569, clip_i=0.780, clip_t=0.255),
]


def references_for(settings_clip: str | None, settings_dino: str | None) -> list[dict]:
    """The DreamBooth paper's numbers, when the encoders are the real ones it used (not the pocket or
    tiny models, whose cosines live on another scale)."""
    real = lambda source: bool(source) and "/" in source and not Path(source).exists()  # noqa: E731
    return list(PAPER_REFERENCE) if real(settings_clip) and real(settings_dino) else []


def write_report(out_dir: Path, summary, images, recommendation: dict | None) -> list[Path]:
    out_dir = Path(out_dir)
    settings = read_settings(out_dir) if (out_dir / SETTINGS).exists() else {}
    refs = references_for(settings.get("clip"), settings.get("dino"))
    written = []
    plots.tradeoff(summary, recommendation, refs).write_html(out_dir / TRADEOFF_HTML, include_plotlyjs="cdn")
    written.append(out_dir / TRADEOFF_HTML)
    plots.prompt_heatmap(images).write_html(out_dir / HEATMAP_HTML, include_plotlyjs="cdn")
    written.append(out_dir / HEATMAP_HTML)
    grid = plots.sweep_grid(images, out_dir)
    if grid is not None:
        grid.save(out_dir / GRID_PNG)
        written.append(out_dir / GRID_PNG)
    return written
