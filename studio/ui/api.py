"""Named API endpoints over the same core, for scripts driving a running studio with gradio_client
(`Client(url).predict(..., api_name="/train")`). Each call sees its own session's workspace and
jobs, like a browser tab: a shared studio keeps clients apart.

    /workspace_lists ()                                    -> {"datasets": [...], "runs": [...]}
    /train           (dataset, method, steps, model)       -> run id (the job runs or waits its turn)
    /job_status      ()                                    -> {"kind", "label", "status", "position", "message"}
    /cancel_job      ()                                    -> whether a job was cancelled
    /render          (prompt, run, scale, seed, steps)     -> a PNG file of the adapted image (downloaded)
    /evaluate_runs   (dataset, runs, seeds, steps)         -> the evaluation folder's name
"""

from __future__ import annotations

import time

import gradio as gr
from gradio.data_classes import FileData

from studio.ui.context import Studio, friendly


def register(studio: Studio) -> None:
    @friendly
    def workspace_lists() -> dict:
        return {"datasets": studio.workspace.list_datasets(), "runs": studio.workspace.list_runs()}

    @friendly
    def train(dataset: str, method: str = "lora", steps: int = 20, model: str = "") -> str:
        from studio import launch
        from studio.config import build_config

        values = studio.confine(dict(model=model or studio.default_model, method=method, steps=steps,
                                     dataset=str(studio.workspace.dataset(dataset).root), sample_every=0))
        cfg = build_config(values=values)  # checkpoints by time (checkpoint_minutes) as every run has them
        paths = studio.workspace.run(studio.workspace.new_run_id(method))
        launch.check(cfg, paths.root)
        # the Train tab's own start: the memory pre-flight, and GPU-call chunks on ZeroGPU
        studio.jobs.start("train", paths.run_id, paths.root,
                          lambda should_stop: launch.start(cfg, paths.root, should_stop=should_stop))
        return paths.run_id

    @friendly
    def job_status() -> dict:
        job = studio.jobs.current()
        if job is None:
            return {"kind": None, "label": None, "status": "none", "position": -1, "message": ""}
        return {"kind": job.kind, "label": job.label, "status": job.status, "position": studio.jobs.position(job),
                "message": job.message}

    @friendly
    def cancel_job() -> bool:
        return studio.jobs.cancel()

    @friendly
    def render(prompt: str, run: str = "", scale: float = 1.0, seed: int = 0, steps: int = 20) -> FileData:
        """The PNG as a file the client downloads (served from Gradio's cache under a hash of its content:
        the link names no workspace, session or token)."""
        from studio import limits
        from studio.generate import AdapterChoice, GenerateRequest

        limits.check_render(steps, seed, 7.5)
        limits.check_range("scale", scale, -10, 10, "The scale")
        choices = [AdapterChoice(str(studio.workspace.run(run).root), float(scale))] if run else []
        image = studio.playground.generate(GenerateRequest(prompt, studio.default_model, choices, seed=int(seed),
                                                           steps=int(steps)))
        out = studio.workspace.root / "renders" / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.perf_counter_ns()}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
        return FileData(path=studio.servable(out), orig_name=out.name)

    @friendly
    def evaluate_runs(dataset: str, runs: list[str], seeds: int = 1, steps: int = 2) -> str:
        from studio.evaluate.protocol import EvalConfig, evaluate

        from studio import limits
        from studio.data.dataset import load_dataset

        limits.check_range("steps", steps, 1, limits.MAX_DENOISE_STEPS, "Denoising steps")
        limits.check_range("seeds", seeds, 1, 64, "Images per prompt")
        load_dataset(studio.workspace.dataset(dataset).root)  # a missing dataset: one sentence now, not a failed job
        out = studio.workspace.evals / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.perf_counter_ns() % 10**6}"
        cfg = EvalConfig(dataset=str(studio.workspace.dataset(dataset).root),
                         runs=[str(studio.workspace.run(r).root) for r in runs], model=studio.default_model,
                         clip=studio.default_model if studio.default_model in ("builtin", "tiny") else "",
                         dino="none", kinds=["context"], contexts=["in a forest"], seeds=int(seeds), steps=int(steps))
        studio.jobs.start("evaluate", out.name, out,
                          lambda should_stop: evaluate(cfg, out, should_stop=should_stop, playground=studio.playground))
        return out.name

    for fn in (workspace_lists, train, job_status, cancel_job, evaluate_runs):
        gr.api(fn, api_name=fn.__name__)
    gr.api(render, api_name="render", concurrency_id="gpu")
