"""Training options and resume: each changes what it should and nothing else."""

from __future__ import annotations

import shutil

import pytest
import torch

from studio import checkpoints, events, train
from studio.config import build_config
from studio.errors import StudioError
from studio.paths import RunPaths


def config(dataset_dir, **values):
    base = dict(model="tiny", dataset=str(dataset_dir), steps=8, learning_rate=1e-2, sample_every=0,
                sample_prompts=[], checkpoint_every=4)
    return build_config(values={**base, **values})


def losses(run_dir) -> list[tuple[int, float]]:
    return [(e.step, e.loss) for e in events.read_events(RunPaths(run_dir).events) if isinstance(e, events.Step)]


def same_curve(a, b) -> bool:
    return [s for s, _ in a] == [s for s, _ in b] and [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-5)


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def straight_run(dataset_dir, tiny_model, tmp_path_factory):
    result = train.run(config(dataset_dir), tmp_path_factory.mktemp("straight") / "run")
    assert result.status == "completed", result.message
    return result.run_dir


def test_resume_after_cancel_continues_the_exact_steps_and_losses(straight_run, dataset_dir, tmp_path):
    run_dir = tmp_path / "run"
    seen = []
    first = train.run(config(dataset_dir), run_dir, on_event=seen.append, should_stop=lambda: len(
        [e for e in seen if isinstance(e, events.Step)]) >= 6)
    assert first.status == "cancelled" and first.step == 6
    second = train.resume(run_dir)
    assert second.status == "completed" and second.step == 8
    assert [s for s, _ in losses(run_dir)] == list(range(1, 9))  # one continuous curve, no repeats
    assert same_curve(losses(run_dir), losses(straight_run))
    for key, value in weights(straight_run).items():
        torch.testing.assert_close(weights(run_dir)[key], value, rtol=1e-4, atol=1e-6)


def test_resume_after_a_crash_uses_the_last_complete_checkpoint(straight_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    # as if killed during step 8: the final checkpoint is half written (no trainer.yaml)
    (run_dir / "checkpoints" / "step-000008" / checkpoints.TRAINER).unlink()
    assert checkpoints.latest(RunPaths(run_dir)).step == 4
    result = train.resume(run_dir)
    assert result.step == 8
    assert same_curve(losses(run_dir), losses(straight_run))


def test_resume_can_extend_a_finished_run_and_refuses_a_finished_total(straight_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    with pytest.raises(StudioError, match="already reached step 8 of 8"):
        train.resume(run_dir)
    assert train.resume(run_dir, steps=10).step == 10
    assert [s for s, _ in losses(run_dir)] == list(range(1, 11))


def test_gradient_checkpointing_recomputes_the_same_losses(straight_run, dataset_dir, tmp_path):
    result = train.run(config(dataset_dir, steps=4, gradient_checkpointing=True), tmp_path / "run")
    assert same_curve(losses(result.run_dir), losses(straight_run)[:4])


@pytest.mark.parametrize("option", [dict(min_snr_gamma=0.1), dict(noise_offset=0.1), dict(flip_p=1.0),
                                    dict(gradient_accumulation_steps=2)],
                         ids=["min-snr", "noise-offset", "flip", "accumulation"])
def test_each_option_changes_the_losses_and_keeps_the_step_count(straight_run, dataset_dir, tmp_path, option):
    result = train.run(config(dataset_dir, steps=4, **option), tmp_path / "run")
    assert result.status == "completed"
    got = losses(result.run_dir)
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert [v for _, v in got] != pytest.approx([v for _, v in losses(straight_run)[:4]], rel=1e-6)


def test_min_snr_weights_match_the_formula():
    from diffusers import DDPMScheduler

    from studio.objectives import min_snr_weights

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 100, 500, 999])
    a = scheduler.alphas_cumprod[t]
    snr = a / (1 - a)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0), expected.float())
    assert min_snr_weights(scheduler, torch.tensor([999]), 5.0).item() == pytest.approx(1.0)  # noisy: SNR < 5
    v_scheduler = DDPMScheduler(prediction_type="v_prediction")
    v_snr = v_scheduler.alphas_cumprod[t] / (1 - v_scheduler.alphas_cumprod[t])
    torch.testing.assert_close(min_snr_weights(v_scheduler, t, 5.0),
                               (torch.minimum(v_snr, torch.tensor(5.0)) / (v_snr + 1)).float())


def test_batches_cover_every_image_each_epoch_with_repeats():
    cfg = build_config(values=dict(batch_size=2, repeats=3, seed=4))
    seen = [int(i) for step in range(1, 9) for i in train.batch_indices(cfg, 5, step, 0)]  # 16 draws
    assert sorted(seen[:15]) == sorted(i for i in range(5) for _ in range(3))  # one epoch: each image 3 times
    other_seed = build_config(values=dict(batch_size=2, repeats=3, seed=5))
    assert seen != [int(i) for step in range(1, 9) for i in train.batch_indices(other_seed, 5, step, 0)]


def test_flip_caches_the_mirror_image_latents(dataset_dir, tiny_model):
    from studio import models
    from studio.data.dataset import ConceptDataset

    pipe = models.load_pipeline(models.resolve("tiny"))
    data = ConceptDataset(dataset_dir, 64)
    frozen = train._cache_frozen(pipe, data, "cpu", torch.float32, flips=True)
    assert frozen.latent_mean.shape[0] == 2
    mirrored = pipe.vae.encode(data.pixels.flip(-1)).latent_dist.mean
    torch.testing.assert_close(frozen.latent_mean[1], mirrored.detach())


def test_8bit_adam_without_a_gpu_is_one_sentence(dataset_dir, tmp_path):
    """Refused before the model loads, in one sentence."""
    from studio.errors import StudioError

    with pytest.raises(StudioError) as refused:
        train.run(config(dataset_dir, steps=2, optimizer="adamw8bit"), tmp_path / "run")
    assert str(refused.value) == "8-bit Adam needs a CUDA GPU; set optimizer to 'adamw' on this machine."
