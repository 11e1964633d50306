"""Prior preservation (DreamBooth): the loss, the class images and their cache, the preset."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from studio import events, prior, train
from studio.config import build_config
from studio.objectives import prior_preservation_loss


def config(dataset_dir, **values):
    base = dict(model="tiny", dataset=str(dataset_dir), steps=3, learning_rate=1e-2, sample_every=0,
                sample_prompts=[], prior_preservation=True, num_class_images=3, class_image_steps=2)
    return build_config(values={**base, **values})


def test_prior_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    instance = ((pred[:2] - target[:2]) ** 2).mean()
    klass = ((pred[2:] - target[2:]) ** 2).mean()
    got = prior_preservation_loss(pred, target, n_instance=2, prior_weight=0.5)
    torch.testing.assert_close(got, instance + 0.5 * klass)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.0])
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * weights
    torch.testing.assert_close(prior_preservation_loss(pred, target, 2, 0.5, weights),
                               per[:2].mean() + 0.5 * per[2:].mean())


def test_class_images_are_drawn_once_and_reused(dataset_dir, tiny_model, tmp_path, monkeypatch):
    drawn = []
    real_draw = prior._draw
    monkeypatch.setattr(prior, "_draw", lambda *a: (drawn.append(a[2]), real_draw(*a)))
    seen = []
    first = train.run(config(dataset_dir, class_prompt="a photo of a {class} on grass"), tmp_path / "a",
                      on_event=seen.append)
    assert first.status == "completed", first.message
    assert drawn == [0, 1, 2]
    assert sum(isinstance(e, events.Progress) and "class image" in e.message for e in seen) == 3
    folder = prior.cache_dir("tiny", "a photo of a stuffed animal on grass", 64, 2)
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    second = train.run(config(dataset_dir, class_prompt="a photo of a {class} on grass", num_class_images=4),
                       tmp_path / "b")
    assert second.status == "completed"
    assert drawn == [0, 1, 2, 3]  # only the missing one was drawn


def test_prior_changes_the_loss_but_not_what_trains(dataset_dir, tiny_model, tmp_path):
    plain = train.run(config(dataset_dir, prior_preservation=False), tmp_path / "plain")
    with_prior = train.run(config(dataset_dir), tmp_path / "prior")
    def losses(r):
        return [e.loss for e in events.read_events(r.run_dir / "events.jsonl") if isinstance(e, events.Step)]
    assert len(losses(with_prior)) == 3 and losses(with_prior) != pytest.approx(losses(plain), rel=1e-6)
    from safetensors.torch import load_file

    keys = load_file(str(with_prior.run_dir / "adapter" / "pytorch_lora_weights.safetensors")).keys()
    assert keys == load_file(str(plain.run_dir / "adapter" / "pytorch_lora_weights.safetensors")).keys()


def test_user_class_images_are_used_instead_of_drawing(dataset_dir, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(prior, "_draw", lambda *a: pytest.fail("drew a class image although a folder was given"))
    folder = tmp_path / "dogs"
    folder.mkdir()
    for i, colour in enumerate([(200, 10, 10), (10, 200, 10)]):
        Image.new("RGB", (80, 80), colour).save(folder / f"{i}.png")
    result = train.run(config(dataset_dir, class_data_dir=str(folder)), tmp_path / "run")
    assert result.status == "completed", result.message


def test_an_empty_class_folder_is_one_sentence(dataset_dir, tiny_model, tmp_path):
    """Refused before the model loads, in one sentence (the CLI and the Train tab print it as it is)."""
    from studio.errors import StudioError

    (tmp_path / "empty").mkdir()
    with pytest.raises(StudioError, match=r"^Class image folder .* has no images; add some"):
        train.run(config(dataset_dir, class_data_dir=str(tmp_path / "empty")), tmp_path / "run")


def test_dreambooth_lora_preset():
    cfg = build_config("dreambooth-lora")
    assert cfg.method == "lora" and cfg.prior_preservation and cfg.prior_loss_weight == 1.0
