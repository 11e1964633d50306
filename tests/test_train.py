"""The training loop on the built-in model, on CPU: what changes, what is written, cancel, refusals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from studio import adapters, events, train
from studio.adapters import lora
from studio.config import TrainConfig, build_config, load_run_config
from studio.errors import StudioError
from studio.generate import AdapterChoice, GenerateRequest, Playground
from studio.paths import LORA_WEIGHTS, RunPaths
from tests.helpers import loaded_pipeline, plain_pipeline, snapshot

GEN_STEPS = 3
PROMPT = "a photo of sks stuffed animal"
TRAIN_STEPS = 30  # what the trained_run fixture (conftest.py) trains for


def small_config(dataset_dir: Path, **values) -> TrainConfig:
    base = dict(model="tiny", dataset=str(dataset_dir), steps=4, learning_rate=1e-2,
                sample_every=0, sample_steps=2, sample_prompts=[])
    return build_config(values={**base, **values})


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- what trains

@pytest.mark.parametrize("method, extra", [("lora", {}), ("dora", {}), ("lora", {"locon": True})],
                         ids=["lora", "dora", "lora-locon"])
def test_only_lora_weights_change(tmp_path, dataset_dir, tiny_model, monkeypatch, method, extra):
    real_attach = lora.attach
    with loaded_pipeline() as seen:
        def attach_spy(pipe, cfg):
            real_attach(pipe, cfg)
            seen["lora_init"] = {k: v for k, v in snapshot(pipe.unet).items() if "lora_" in k}

        monkeypatch.setattr(lora, "attach", attach_spy)
        result = train.run(small_config(dataset_dir, steps=5, method=method, **extra), tmp_path / "run")

    assert result.status == "completed", result.message
    pipe, before = seen["pipe"], seen["before"]
    adapted = {n.rsplit(".", 1)[-1] for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")}
    if extra.get("locon"):
        assert {"conv1", "conv2", "proj_in", "proj_out"} <= adapted  # convolutions adapted too
    else:
        assert "conv1" not in adapted
    magnitudes = [k for k in seen["lora_init"] if "lora_magnitude_vector" in k]
    assert bool(magnitudes) == (method == "dora")
    for name in ("vae", "text_encoder"):
        after = snapshot(getattr(pipe, name))
        assert after.keys() == before[name].keys()
        changed = [k for k in after if not torch.equal(after[k], before[name][k])]
        assert changed == [], f"{name} weights changed: {changed[:3]}"

    unet_after = snapshot(pipe.unet)
    lora_after = {k: v for k, v in unet_after.items() if "lora_" in k}
    base_after = {k.replace(".base_layer", ""): v for k, v in unet_after.items() if "lora_" not in k}
    assert base_after.keys() == before["unet"].keys()
    changed = [k for k in base_after if not torch.equal(base_after[k], before["unet"][k])]
    assert changed == [], f"frozen UNet weights changed: {changed[:3]}"

    trainable = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora_b = [k for k in lora_after if "lora_B" in k]
    assert len(lora_b) > 0
    assert lora_after.keys() == seen["lora_init"].keys()
    assert all(torch.count_nonzero(seen["lora_init"][k]) == 0 for k in lora_b)  # B = 0: a no-op start
    unchanged = [k for k in lora_b if torch.equal(lora_after[k], seen["lora_init"][k])]
    assert unchanged == [], f"LoRA B matrices that did not train: {unchanged[:3]}"


def test_same_seed_same_losses(tmp_path, dataset_dir, tiny_model):
    def losses(seed: int, folder: str) -> list[float]:
        train.run(small_config(dataset_dir, steps=3, seed=seed), tmp_path / folder)
        return [e.loss for e in events.read_events(tmp_path / folder / "events.jsonl")
                if isinstance(e, events.Step)]

    first = losses(0, "a")
    assert len(first) == 3 and all(np.isfinite(first))
    assert losses(0, "b") == first
    assert losses(1, "c") != first


# ----------------------------------------------------------------------------- what is written

def test_adapter_loads_in_plain_diffusers_and_matches_playground(trained_run, tiny_model):
    weights = trained_run / "adapter" / LORA_WEIGHTS
    assert weights.is_file()

    pipe = plain_pipeline(tiny_model)
    base = pixels(pipe(PROMPT, num_inference_steps=GEN_STEPS, height=64, width=64, guidance_scale=7.5,
                       generator=torch.Generator().manual_seed(0)).images[0])
    pipe.load_lora_weights(str(trained_run / "adapter"))
    assert sum(len(v) for v in pipe.get_list_adapters().values()) == 1
    plain = pixels(pipe(PROMPT, num_inference_steps=GEN_STEPS, height=64, width=64, guidance_scale=7.5,
                        generator=torch.Generator().manual_seed(0)).images[0])

    studio_image = pixels(Playground().generate(GenerateRequest(
        PROMPT, "tiny", [AdapterChoice(str(trained_run), 1.0)], seed=0, steps=GEN_STEPS, guidance=7.5)))

    assert np.abs(plain - studio_image).max() <= 1  # same weights, same seed: at most rounding
    assert np.abs(plain - base).mean() > 2.0  # ... and the adapter really is in both


def test_events_cover_every_step_then_finish(trained_run):
    log = events.read_events(RunPaths(trained_run).events)
    assert isinstance(log[0], events.Started) and log[0].total_steps == TRAIN_STEPS
    steps = [e for e in log if isinstance(e, events.Step)]
    assert [e.step for e in steps] == list(range(1, TRAIN_STEPS + 1))
    assert all(np.isfinite(e.loss) and e.loss > 0 and e.lr == pytest.approx(1e-2) for e in steps)
    assert all(a.elapsed_s <= b.elapsed_s for a, b in zip(steps, steps[1:]))

    # every 15 steps, and at the end (what a resume or a longer run continues from)
    assert [(e.step, e.path) for e in log if isinstance(e, events.Checkpoint)] == [
        (15, "checkpoints/step-000015"), (30, "checkpoints/step-000030")]
    assert adapters.read_meta(trained_run / "checkpoints" / "step-000015").step == 15
    samples = [e for e in log if isinstance(e, events.Sample)]
    assert [s.step for s in samples] == [TRAIN_STEPS]  # sample_every=0: one set, at the end
    assert all((trained_run / p).is_file() for p in samples[0].images)

    finished = log[-1]
    assert isinstance(finished, events.Finished)
    assert (finished.status, finished.step, finished.adapter_dir) == ("completed", TRAIN_STEPS, "adapter")
    meta = adapters.read_meta(trained_run / "adapter")
    assert (meta.kind, meta.base_model, meta.token, meta.class_word, meta.step) == (
        "lora", "tiny", "sks", "stuffed animal", TRAIN_STEPS)


def test_config_yaml_round_trips(trained_run, dataset_dir):
    saved = load_run_config(RunPaths(trained_run).config)
    cfg = build_config(values=saved)
    assert cfg.to_dict() == saved
    assert cfg.model == "tiny" and cfg.steps == TRAIN_STEPS and cfg.learning_rate == pytest.approx(1e-2)
    assert cfg.resolution == 64  # 0 was resolved to the dataset's resolution
    assert Path(cfg.dataset) == dataset_dir.resolve() and Path(cfg.dataset).is_absolute()


# ----------------------------------------------------------------------------- cancel and refusals

def test_cancel_after_k_steps_saves_a_loadable_adapter(tmp_path, dataset_dir, tiny_model):
    k, done = 3, []

    def on_event(event):
        if isinstance(event, events.Step):
            done.append(event.step)

    result = train.run(small_config(dataset_dir, steps=TRAIN_STEPS), tmp_path / "run",
                       on_event=on_event, should_stop=lambda: len(done) >= k)

    assert (result.status, result.step) == ("cancelled", k)
    assert done == [1, 2, 3]
    finished = events.read_events(tmp_path / "run" / "events.jsonl")[-1]
    assert (finished.kind, finished.status, finished.step) == ("finished", "cancelled", k)
    assert result.adapter_dir == tmp_path / "run" / "adapter"
    assert adapters.read_meta(result.adapter_dir).step == k

    pipe = plain_pipeline(tiny_model)
    pipe.load_lora_weights(str(result.adapter_dir))
    assert sum(len(v) for v in pipe.get_list_adapters().values()) == 1


def test_stop_before_the_first_step(tmp_path, dataset_dir, tiny_model):
    result = train.run(small_config(dataset_dir), tmp_path / "run", should_stop=lambda: True)
    assert (result.status, result.step) == ("cancelled", 0)
    assert not any(isinstance(e, events.Step) for e in events.read_events(tmp_path / "run" / "events.jsonl"))


@pytest.mark.parametrize("dataset", ["", "no-such-dataset"])
def test_missing_dataset_is_refused_before_anything_is_written(tmp_path, dataset):
    run_dir = tmp_path / "run"
    cfg = build_config(values=dict(model="tiny", dataset=str(tmp_path / dataset) if dataset else ""))
    with pytest.raises(StudioError, match="dataset|Dataset"):
        train.run(cfg, run_dir)
    assert not run_dir.exists()


def test_unknown_model_is_refused_before_anything_is_written(tmp_path, dataset_dir):
    run_dir = tmp_path / "run"
    with pytest.raises(StudioError, match="'not-a-model'"):
        train.run(small_config(dataset_dir, model="not-a-model"), run_dir)
    assert not run_dir.exists()


def test_reusing_a_run_folder_is_refused_and_keeps_the_run(trained_run, dataset_dir):
    before = {p: file_hash(p) for p in trained_run.rglob("*") if p.is_file()}
    with pytest.raises(StudioError, match="already holds a run"):
        train.run(small_config(dataset_dir), trained_run)
    after = {p: file_hash(p) for p in trained_run.rglob("*") if p.is_file()}
    assert after == before


def test_nan_loss_fails_the_run_with_one_sentence(tmp_path, dataset_dir, tiny_model, monkeypatch):
    monkeypatch.setattr(train, "instance_loss", lambda pred, target, weights=None: (pred.float() * float("nan")).mean())
    result = train.run(small_config(dataset_dir), tmp_path / "run")
    assert (result.status, result.step, result.adapter_dir) == ("failed", 0, None)
    assert "loss became nan" in result.message and "\n" not in result.message
    finished = events.read_events(tmp_path / "run" / "events.jsonl")[-1]
    assert (finished.status, finished.message) == ("failed", result.message)
