"""The evaluation: does the model reproduce the concept, and does it still follow prompts?

A sweep over points (the base model; each run, at its final adapter or every checkpoint, at each
scale) renders every prompt of the chosen kinds (see prompts.py) at fixed seeds. Every generated
image is one row of `results.csv` (point, run, checkpoint, scale, prompt, kind, seed, file, and its
metrics); `summary.csv` has one row per point and the baselines; `recommendation.json` names the point
with the best trade-off. Embeddings are stored per encoder in `embeddings/`, so `rescore` recomputes
every metric, summary and plot from the saved images without generating or embedding again.

Metrics per image (see metrics.py for their sources): clip_i and dino (mean cosine to the dataset's
images), clip_t (cosine to the prompt with the trigger replaced by the class word), prompt_similarity
(context prompts: cosine to the same seed's image without the concept, Guralnick et al.) and
preservation (prompts without the trigger: cosine to the base model's image at the same seed).

Per point: fidelity (clip_i, dino) over the images whose prompt holds the trigger (training and
generalization kinds), clip_t over generalization prompts, Guralnick's image_similarity (concept
prompt) and prompt_similarity (context pairs), KID and FID against the dataset and the Vendi score,
on DINO features when a DINO model is used, else CLIP's, and preservation over agnostic prompts.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from dataclasses import replace as replace_fields
from pathlib import Path
from typing import Callable

from studio import events
from studio.adapters import find_adapter_dir, read_meta
from studio.data.dataset import load_dataset
from studio.errors import StudioError
from studio.evaluate import metrics
from studio.evaluate.prompts import Prompt, build_prompts, prompts_for
from studio.evaluate.report import write_report
from studio.evaluate.settings import SETTINGS, EvalConfig, read_settings, write_settings
from studio.generate import AdapterChoice, GenerateRequest, Playground, choose_base
from studio.paths import DatasetPaths, RESULTS_CSV, RunPaths, safe_name

__all__ = ["EvalConfig", "EvalResult", "evaluate", "rescore", "recommend", "prompts_for", "SUMMARY_COLUMNS",
           "COLUMNS"]

SUMMARY_CSV = "summary.csv"
RECOMMENDATION = "recommendation.json"
EMBEDDINGS = "embeddings"
TRIGGER_KINDS = ("training", "generalization")  # prompts that hold the trigger and ask for the concept
COLUMNS = ["point", "run", "method", "checkpoint", "scale", "kind", "prompt", "clip_text", "pair", "seed", "file",
           "clip_i", "dino", "clip_t", "prompt_similarity", "preservation"]
SUMMARY_COLUMNS = ["point", "kind", "run", "method", "checkpoint", "scale", "clip_i", "dino", "clip_t",
                   "image_similarity", "prompt_similarity", "preservation", "kid", "kid_subset", "fid",
                   "vendi", "features", "n_images", "adapter", "warning"]

@dataclass
class EvalResult:
    status: str
    message: str
    table: object  # pandas.DataFrame, one row per point and baseline (summary.csv)
    out_dir: Path
    images: object = None  # pandas.DataFrame, one row per generated image (results.csv)
    recommendation: dict | None = None
    plots: list = field(default_factory=list)  # the report's files (report.write_report), written before Finished


@dataclass(frozen=True)
class Point:
    label: str
    run: str  # run id, or "base model"
    method: str  # adapter kind, or "base"
    step: int
    scale: float
    adapter: str  # adapter folder; '' for the base model

    @property
    def slug(self) -> str:
        return safe_name(self.label.replace("@", "at").replace("×", "x")) or "point"


class _Cancelled(Exception):
    pass


def sweep_points(cfg: EvalConfig) -> tuple[list[Point], list[str]]:
    """The base model, then each run's adapters (final, or every checkpoint) at each scale; and notices."""
    points, notices = [Point("base model", "base model", "base", 0, 0.0, "")], []
    for run in cfg.runs:
        final = find_adapter_dir(Path(run))
        run_id = RunPaths(final.parent).run_id if final.name == "adapter" else Path(run).name
        meta = read_meta(final)
        folders = [(meta.step, final)]
        if cfg.checkpoints == "all":
            saved = RunPaths(final.parent).checkpoints
            for folder in sorted(saved.glob("step-*")) if saved.is_dir() else []:
                try:
                    step = read_meta(folder).step
                except StudioError:  # a full fine-tune's checkpoint holds resume state, not a model
                    notices.append(f"{run_id}: checkpoint {folder.name} holds no usable model and is skipped.")
                    continue
                if step != meta.step:
                    folders.append((step, folder))
        for step, folder in sorted(folders):
            for scale in (cfg.scales if meta.has_scale else [1.0]):
                label = f"{run_id} @{step}" + (f" ×{scale:g}" if meta.has_scale else "")
                points.append(Point(label, run_id, meta.kind, step, scale, str(folder)))
    return points, notices


def evaluate(cfg: EvalConfig, out_dir: Path, on_event: Callable | None = None,
             should_stop: Callable[[], bool] | None = None, playground: Playground | None = None) -> EvalResult:
    import pandas as pd

    from studio.evaluate.embedders import ClipEmbedder

    cfg = absolute_paths(cfg)
    spec = load_dataset(Path(cfg.dataset))
    dataset_files = DatasetPaths(Path(cfg.dataset)).image_files()
    captions = [f.with_suffix(".txt").read_text(encoding="utf-8").strip() if f.with_suffix(".txt").exists() else ""
                for f in dataset_files]
    replace = lambda text: metrics.replace_trigger(text, spec.token, spec.class_word)  # noqa: E731
    prompts = build_prompts(spec.token, spec.class_word, captions, cfg.kinds, cfg.prompts, cfg.contexts,
                            cfg.per_kind, replace)
    if not prompts:
        raise StudioError("The chosen prompt kinds give no prompt (no captions, contexts or prompts); "
                          "choose another kind or add prompts.")
    points, notices = sweep_points(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    emit = events.Emitter(out_dir / "events.jsonl", on_event)
    clip = ClipEmbedder(cfg.clip)
    dino, dino_notice = _dino(cfg.dino)
    for notice in [clip.notice, dino_notice, *notices]:
        if notice:
            emit(events.Progress(0, 0, notice))
    counter = _Counter(len(points) * len(prompts) * cfg.seeds, emit, should_stop or (lambda: False))
    playground = playground or Playground()
    rows = []
    try:
        for point in points:
            rows += _render_point(point, prompts, cfg, playground, counter, out_dir)
    except _Cancelled:
        emit(events.Finished("cancelled", counter.done, "Evaluation cancelled; nothing was saved."))
        return EvalResult("cancelled", "Evaluation cancelled; nothing was saved.", None, out_dir)
    emit(events.Phase("embedding", f"Embedding {counter.done + len(dataset_files)} images with the CLIP"
                      f"{' and the DINO' if dino else ''} model and scoring them…", counter.done))
    table = pd.DataFrame(rows, columns=COLUMNS)
    dataset_rows = pd.DataFrame([dict(point="dataset", run="dataset", method="dataset", checkpoint=0, scale=math.nan,
                                      kind="dataset", prompt=c, clip_text="", pair=-1, seed=-1, file=str(f))
                                 for f, c in zip(dataset_files, captions)], columns=COLUMNS)
    table = pd.concat([dataset_rows, table], ignore_index=True)
    _write_settings(out_dir, cfg, spec, points, clip.source, dino.source if dino else None)
    stores = {"clip": _EmbeddingStore(out_dir / EMBEDDINGS / "clip.safetensors")}
    _embed(stores["clip"], table, out_dir, clip)
    if dino:
        stores["dino"] = _EmbeddingStore(out_dir / EMBEDDINGS / "dino.safetensors")
        _embed(stores["dino"], table, out_dir, dino, texts=False)
    for store in stores.values():
        store.save()
    result = _score_and_save(out_dir, table, stores, points)
    emit(events.Phase("report", "Writing the report (plots, the sweep grid)…", counter.done))

    # The plots and the sweep grid are on disk before the last event: a reader that sees Finished sees them.
    result.plots = write_report(out_dir, result.table, result.images, result.recommendation)
    message = (f"Evaluated {len(points) - 1} point(s) of {len(cfg.runs)} run(s) and the base model on "
               f"{counter.done} generated images.")
    emit(events.Finished("completed", counter.done, message))
    result.message = message
    return result


def absolute_paths(cfg: EvalConfig) -> EvalConfig:
    """The dataset and run folders as absolute paths: a path the user typed is relative to where they typed
    it, never to the evaluation folder that image files are later read from."""
    return replace_fields(cfg, dataset=str(Path(cfg.dataset).expanduser().resolve()),
                          runs=[str(Path(r).expanduser().resolve()) for r in cfg.runs])


def count_images(cfg: EvalConfig) -> tuple[int, int, int]:
    """(images to draw, points, prompts) of an evaluation, known before anything loads: what a reader is
    told before starting; the time per image comes from the evaluation's own probe (its Estimate event)."""
    spec = load_dataset(Path(cfg.dataset))
    files = DatasetPaths(Path(cfg.dataset)).image_files()
    captions = [f.with_suffix(".txt").read_text(encoding="utf-8").strip() if f.with_suffix(".txt").exists() else ""
                for f in files]
    prompts = build_prompts(spec.token, spec.class_word, captions, cfg.kinds, cfg.prompts, cfg.contexts,
                            cfg.per_kind)
    points, _ = sweep_points(cfg)
    return len(points) * len(prompts) * cfg.seeds, len(points), len(prompts)


def rescore(out_dir: Path) -> EvalResult:
    """Every metric, the summary and the recommendation again from an evaluation folder's saved images'
    embeddings: nothing is generated or embedded."""
    import pandas as pd

    out_dir = Path(out_dir)
    if not (out_dir / RESULTS_CSV).exists() or not (out_dir / SETTINGS).exists():
        raise StudioError(f"'{out_dir}' is not a finished evaluation (no {RESULTS_CSV}); run the evaluation first.")
    table = pd.read_csv(out_dir / RESULTS_CSV, keep_default_na=True)
    table["clip_text"] = table["clip_text"].fillna("")
    stores = {name: _EmbeddingStore(out_dir / EMBEDDINGS / f"{name}.safetensors") for name in ("clip", "dino")
              if (out_dir / EMBEDDINGS / f"{name}.safetensors").exists()}
    missing = [f for f in table["file"] if f not in stores["clip"].data]
    if missing:
        raise StudioError(f"The saved embeddings lack {len(missing)} image(s) (first: {missing[0]}); "
                          "run the evaluation again.")
    settings = read_settings(out_dir)
    points = [Point(**p) for p in settings["points"]]
    result = _score_and_save(out_dir, table, stores, points)
    result.message = f"Rescored {len(points)} point(s) from saved embeddings."
    return result


def _dino(name: str):
    from studio.evaluate.dino import DinoEmbedder, resolve_dino

    source, notice = resolve_dino(name)
    return (DinoEmbedder(source) if source else None), notice


def _render_point(point: Point, prompts: list[Prompt], cfg: EvalConfig, playground, counter, out_dir: Path) -> list[dict]:
    choices = [AdapterChoice(point.adapter, point.scale)] if point.adapter else []
    # baselines (no adapter) and every run draw with one base: the one named, or the runs' own
    model, vae = choose_base(cfg.model, cfg.vae, [AdapterChoice(r) for r in cfg.runs])
    folder = out_dir / "images" / point.slug
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, prompt in enumerate(prompts):
        for seed in range(cfg.seeds):
            counter.tick(f"{point.label}: {prompt.text}")
            image = playground.generate(GenerateRequest(prompt.text, model, choices, seed=seed, steps=cfg.steps,
                                                        guidance=cfg.guidance, vae=vae))
            path = folder / f"{index:03d}-{prompt.kind}-seed{seed}.png"
            image.save(path)
            rows.append(dict(point=point.label, run=point.run, method=point.method, checkpoint=point.step,
                             scale=point.scale, kind=prompt.kind, prompt=prompt.text, clip_text=prompt.clip_text,
                             pair=prompt.pair, seed=seed, file=str(path.relative_to(out_dir))))
    return rows


# ----------------------------------------------------------------------------- embeddings, stored

class _EmbeddingStore:
    """Embeddings by key (an image file, relative to the evaluation folder or absolute for the dataset;
    'text:' + a prompt), in one safetensors file per encoder."""

    def __init__(self, path: Path):
        from safetensors.torch import load_file

        self.path = Path(path)
        self.data = {}
        if self.path.exists():
            from safetensors import safe_open

            with safe_open(str(self.path), "pt") as handle:
                keys = json.loads((handle.metadata() or {}).get("keys", "[]"))
            tensors = load_file(str(self.path))
            self.data = {key: tensors[f"e{i}"] for i, key in enumerate(keys)}

    def save(self) -> None:
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.data)
        tmp = self.path.with_name(self.path.name + ".partial")
        save_file({f"e{i}": self.data[k].contiguous() for i, k in enumerate(keys)}, str(tmp),
                  metadata={"keys": json.dumps(keys)})
        tmp.replace(self.path)

    def stack(self, keys: list[str]):
        import torch

        return torch.stack([self.data[k] for k in keys]) if keys else torch.zeros(0, 1)


def _embed(store: _EmbeddingStore, table, out_dir: Path, embedder, texts: bool = True, batch: int = 32) -> None:
    from PIL import Image

    files = [f for f in dict.fromkeys(table["file"]) if f not in store.data]
    for start in range(0, len(files), batch):
        chunk = files[start:start + batch]
        images = []
        for f in chunk:
            path = Path(f) if Path(f).is_absolute() else out_dir / f
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        for key, vector in zip(chunk, embedder.embed_images(images)):
            store.data[key] = vector.detach().cpu().float()
    if texts:
        wanted = [t for t in dict.fromkeys(table["clip_text"]) if t and f"text:{t}" not in store.data]
        for start in range(0, len(wanted), batch):
            chunk = wanted[start:start + batch]
            for text, vector in zip(chunk, embedder.embed_texts(chunk)):
                store.data[f"text:{text}"] = vector.detach().cpu().float()


# ----------------------------------------------------------------------------- scoring

def _score_and_save(out_dir: Path, table, stores: dict, points: list[Point]) -> EvalResult:
    table = score_images(table, stores)
    summary = summarise(table, stores, points)
    rec = recommend(summary)
    _save(out_dir, table, summary, rec, points)
    return EvalResult("completed", "", summary, out_dir, table, rec)


def score_images(table, stores: dict):
    """Fill each image's metric columns from stored embeddings."""
    table = table.copy()
    clip, dino = stores["clip"], stores.get("dino")
    dataset = table["kind"] == "dataset"
    data_files = list(table.loc[dataset, "file"])
    reference = clip.stack(data_files)
    gen = ~dataset
    gen_files = list(table.loc[gen, "file"])
    table.loc[dataset, "clip_i"] = metrics.leave_one_out_similarity(reference)
    table.loc[gen, "clip_i"] = metrics.per_image_similarity(clip.stack(gen_files), reference)
    if dino is not None:
        dino_ref = dino.stack(data_files)
        table.loc[dataset, "dino"] = metrics.leave_one_out_similarity(dino_ref)
        table.loc[gen, "dino"] = metrics.per_image_similarity(dino.stack(gen_files), dino_ref)
    else:
        table["dino"] = math.nan
    texted = gen & (table["clip_text"].astype(str) != "")
    if texted.any():
        table.loc[texted, "clip_t"] = metrics.paired_cosines(
            clip.stack(list(table.loc[texted, "file"])),
            clip.stack([f"text:{t}" for t in table.loc[texted, "clip_text"]]))
    # context pairs: the image with the concept against the same point's image without it, same seed
    without = {(r.point, r.pair, r.seed): r.file for r in table[table["kind"] == "context-without"].itertuples()}
    for i, r in table[table["kind"] == "context"].iterrows():
        other = without.get((r["point"], r["pair"], r["seed"]))
        if other is not None:
            table.loc[i, "prompt_similarity"] = metrics.paired_similarity(clip.stack([r["file"]]), clip.stack([other]))
    # prompts without the trigger: the fine-tuned model's image against the base model's, same seed
    base = {(r.prompt, r.seed): r.file for r in table[(table["kind"] == "agnostic") & (table["method"] == "base")].itertuples()}
    for i, r in table[(table["kind"] == "agnostic") & (table["method"] != "base")].iterrows():
        other = base.get((r["prompt"], r["seed"]))
        if other is not None:
            table.loc[i, "preservation"] = metrics.paired_similarity(clip.stack([r["file"]]), clip.stack([other]))
    return table


def summarise(table, stores: dict, points: list[Point]):
    """One row per point (and the dataset): means of the image metrics, and the set metrics."""
    import pandas as pd

    features_name = "dino" if "dino" in stores else "clip"
    features = stores[features_name]
    data_files = list(table.loc[table["kind"] == "dataset", "file"])
    real = features.stack(data_files)
    rows = [dict(point="dataset", kind="baseline", run="dataset", method="dataset", checkpoint=0, scale=math.nan,
                 clip_i=metrics.self_similarity(stores["clip"].stack(data_files)),
                 dino=metrics.self_similarity(stores["dino"].stack(data_files)) if "dino" in stores else math.nan,
                 clip_t=math.nan, image_similarity=metrics.self_similarity(stores["clip"].stack(data_files)),
                 prompt_similarity=math.nan, preservation=math.nan, kid=math.nan, kid_subset=math.nan, fid=math.nan,
                 vendi=metrics.vendi(real), features=features_name, n_images=len(data_files), adapter="", warning="")]
    for point in points:
        mine = table[table["point"] == point.label]
        trigger = mine[mine["kind"].isin(TRIGGER_KINDS)]
        row = dict(point=point.label, kind="baseline" if point.method == "base" else "run", run=point.run,
                   method=point.method, checkpoint=point.step, scale=point.scale,
                   clip_i=_mean(trigger["clip_i"]), dino=_mean(trigger["dino"]),
                   clip_t=_mean(mine.loc[mine["kind"] == "generalization", "clip_t"]),
                   image_similarity=_mean(mine.loc[mine["kind"] == "concept", "clip_i"]),
                   prompt_similarity=_mean(mine.loc[mine["kind"] == "context", "prompt_similarity"]),
                   preservation=_mean(mine.loc[mine["kind"] == "agnostic", "preservation"]),
                   kid=math.nan, kid_subset=math.nan, fid=math.nan, vendi=math.nan, features=features_name,
                   n_images=len(mine), adapter=point.adapter, warning="")
        generated = features.stack(list(trigger["file"]))
        if len(trigger) >= 2 and len(real) >= 2:
            row["kid"], row["kid_subset"] = metrics.kid(generated, real)
            row["fid"], row["warning"] = metrics.fid(generated, real)
        if len(trigger):
            row["vendi"] = metrics.vendi(generated)
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _mean(values) -> float:
    values = [float(v) for v in values if not math.isnan(float(v))]
    return sum(values) / len(values) if values else math.nan


def recommend(summary) -> dict | None:
    """The run point with the best trade-off between concept fidelity and prompt fidelity.

    Rule: fidelity is DINO (CLIP-I when there is no DINO), prompt fidelity is CLIP-T (Guralnick's
    prompt similarity when there are no generalization prompts). Both are rescaled to 0-1 over the
    run points (min to max), and the point nearest to the ideal corner (1, 1) wins: the knee of the
    trade-off curve. Ties go to the lower scale, then the earlier checkpoint.
    """
    runs = summary[summary["kind"] == "run"]
    if runs.empty:
        return None
    fid_col = "dino" if runs["dino"].notna().any() else "clip_i"
    edit_col = "clip_t" if runs["clip_t"].notna().any() else "prompt_similarity"
    runs = runs[runs[fid_col].notna() & runs[edit_col].notna()]
    if runs.empty:
        return None

    def unit(column):
        lo, hi = runs[column].min(), runs[column].max()
        return (runs[column] - lo) / (hi - lo) if hi > lo else runs[column] * 0 + 1.0

    distance = ((1 - unit(fid_col)) ** 2 + (1 - unit(edit_col)) ** 2) ** 0.5
    order = runs.assign(_d=distance.round(9)).sort_values(["_d", "scale", "checkpoint"])
    best = order.iloc[0]
    names = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "prompt_similarity": "prompt similarity"}
    reason = (f"{best['point']} sits nearest the ideal corner of {names[fid_col]} (concept fidelity, "
              f"{best[fid_col]:.3f}) against {names[edit_col]} (prompt fidelity, {best[edit_col]:.3f}), both "
              f"rescaled to 0-1 over the {len(runs)} points evaluated.")
    return dict(point=str(best["point"]), run=str(best["run"]), checkpoint=int(best["checkpoint"]),
                scale=float(best["scale"]), adapter=str(best["adapter"]), fidelity=fid_col, editability=edit_col,
                reason=reason)


# ----------------------------------------------------------------------------- files

def _write_settings(out_dir: Path, cfg: EvalConfig, spec, points: list[Point], clip_source, dino_source) -> None:
    write_settings(out_dir, dict(config=asdict(cfg), token=spec.token, class_word=spec.class_word, clip=clip_source,
                                 dino=dino_source, points=[asdict(p) for p in points]))


def _save(out_dir: Path, table, summary, rec: dict | None, points: list[Point]) -> None:
    table.to_csv(out_dir / RESULTS_CSV, index=False)
    summary.to_csv(out_dir / SUMMARY_CSV, index=False)
    (out_dir / RECOMMENDATION).write_text(json.dumps(rec, indent=2), encoding="utf-8")
    try:
        table.to_parquet(out_dir / "results.parquet", index=False)
    except ImportError:  # pyarrow is optional; the CSV holds the same table
        pass
    for run_dir in {Path(p.adapter).parent for p in points if p.adapter}:
        if run_dir.name == "checkpoints":
            run_dir = run_dir.parent
        run = RunPaths(run_dir)
        if not run.config.exists():
            continue
        run.eval.mkdir(parents=True, exist_ok=True)  # each run keeps its own rows beside the baselines
        keep = summary["kind"].eq("baseline") | summary["run"].eq(run.run_id)
        summary[keep].to_csv(run.eval / SUMMARY_CSV, index=False)
        rows = table["method"].isin(["base", "dataset"]) | table["run"].eq(run.run_id)
        table[rows].to_csv(run.eval / RESULTS_CSV, index=False)


def read_results(out_dir: Path):
    """(summary, per-image table, recommendation) of a finished evaluation folder."""
    import pandas as pd

    out_dir = Path(out_dir)
    rec_path = out_dir / RECOMMENDATION
    rec = json.loads(rec_path.read_text(encoding="utf-8")) if rec_path.exists() else None
    return pd.read_csv(out_dir / SUMMARY_CSV), pd.read_csv(out_dir / RESULTS_CSV), rec


class _Counter:
    """Counts the images drawn and tells the pace. The first image also loads the model, so it is no
    measure of the rest: the second image is the probe behind the Estimate event, and the ETA of each
    Progress event is the mean time of the images after the first, times the images left."""

    def __init__(self, total: int, emit, should_stop):
        self.total, self.done, self.emit, self.should_stop = total, 0, emit, should_stop
        self.start = time.perf_counter()
        self.first_done: float | None = None  # when the first image (and the model's loading) was done

    def tick(self, message: str) -> None:
        if self.should_stop():
            raise _Cancelled()
        now = time.perf_counter()
        if self.done == 1:
            self.first_done = now
        per_image = self._pace(now)
        if self.done == 2 and self.total > 2:
            left = self.total - 2
            self.emit(events.Estimate(per_image * left, left, "image", per_image,
                                      f"About {events.clock(per_image * left)} for the {left} images still to draw "
                                      f"({per_image:.2f} s an image, timed on the second), then embedding and "
                                      "scoring."))
        eta = per_image * (self.total - self.done) if per_image is not None else None
        self.emit(events.Progress(self.done, self.total, message, now - self.start, eta))
        self.done += 1

    def _pace(self, now: float) -> float | None:
        if self.done >= 2:
            return (now - self.first_done) / (self.done - 1)
        if self.done == 1:  # only the first image so far: its time, loading included, is all there is
            return now - self.start
        return None
