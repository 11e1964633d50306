"""The evaluation's encoders and its UI hand-off: DINO (ViT and DINOv2) from config, loaded by folder
like a hub id; the recommendation's way into the Playground."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from studio.errors import StudioError
from studio.evaluate import metrics
from studio.evaluate.dino import DinoEmbedder, resolve_dino


def _dinov2_folder(path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4)).save_pretrained(path, safe_serialization=True)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.mark.parametrize("which", ["vit", "dinov2"])
def test_dino_cls_embeddings_are_unit_vectors_and_identical_images_give_one(which, tmp_path):
    source = resolve_dino("tiny")[0] if which == "vit" else str(_dinov2_folder(tmp_path / "dinov2"))
    embedder = DinoEmbedder(source)
    a = Image.new("RGB", (48, 48), (200, 30, 30))
    b = Image.new("RGB", (48, 48), (20, 30, 200))
    b.paste((250, 250, 0), (10, 10, 30, 30))
    e = embedder.embed_images([a, a.copy(), b])
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert metrics.paired_similarity(e[:1], e[1:2]) == pytest.approx(1.0, abs=1e-5)
    assert metrics.paired_similarity(e[:1], e[2:]) < 1 - 1e-4


def test_dino_choices(monkeypatch):
    from studio import models

    assert resolve_dino("none") == (None, None)
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False)
    source, notice = resolve_dino("")
    assert source is None and "DINO column is empty" in notice
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: True)
    assert resolve_dino("") == ("facebook/dino-vits16", None)
    with pytest.raises(StudioError, match="could not be loaded"):
        DinoEmbedder("nobody/no-such-dino")


def test_the_recommendation_opens_its_run_or_checkpoint(tmp_path):
    from studio.paths import Workspace
    from studio.ui.context import Studio
    from studio.ui.evaluate_tab import playground_value
    from studio.ui.playground_tab import choice_path

    studio = Studio(Workspace(tmp_path), "tiny")
    run = studio.workspace.run("r1").root
    (run / "checkpoints" / "step-000015").mkdir(parents=True)
    final = dict(run="r1", adapter=str(run / "adapter"))
    checkpoint = dict(run="r1", adapter=str(run / "checkpoints" / "step-000015"))
    assert playground_value(final) == "r1" and choice_path(studio, "r1") == run
    assert playground_value(checkpoint) == "r1@step-000015"
    assert choice_path(studio, "r1@step-000015") == run / "checkpoints" / "step-000015"
    for bad in ("r1@step-000099", "r1@../../etc"):
        with pytest.raises(StudioError, match="has no checkpoint"):
            choice_path(studio, bad)
