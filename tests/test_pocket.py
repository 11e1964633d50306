"""The built-in pocket model draws what it is asked for, the pocket CLIP can tell, and a short LoRA run
teaches it the demo concept. Everything is loaded through the studio's normal loaders.

The full measurements (all held-out combinations, the 3-minute LoRA) are in bench/bench_pocket.py;
these check the same things on a few prompts, in seconds.
"""

from __future__ import annotations

import random

import pytest

from pocket import quality, world

# Held-out combinations: neither model saw these captions in training (asserted below).
PROMPTS = ["a big red circle on a black background, on the left",
           "a big blue square on a white background, in the middle",
           "a big yellow star on a grey background, in the middle",
           "a big green cross on a white background, in the middle"]


@pytest.fixture(scope="module")
def clip():
    from studio.evaluate.embedders import ClipEmbedder

    return ClipEmbedder("builtin")


@pytest.fixture(scope="module")
def pocket():
    from studio import models

    return models.load_pipeline(models.resolve("builtin"))


def test_builtin_is_the_shipped_pocket_model(pocket, builtin_model):
    from diffusers import StableDiffusionPipeline

    from studio import models

    assert models.resolve("builtin").source == str(builtin_model) == str(models.POCKET_DIR)
    assert isinstance(pocket, StableDiffusionPipeline)
    # The real CLIP vocabulary, and the text encoder is the pocket CLIP's text tower.
    assert pocket.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert pocket.text_encoder.config.hidden_size == pocket.unet.config.cross_attention_dim


def test_the_world_is_regenerable_and_the_split_is_disjoint():
    train, held = world.split()
    assert not set(train) & set(held) and len(held) == round(world.HELD_OUT_FRACTION * (len(train) + len(held)))
    assert world.split() == (train, held)
    scene = held[0]
    a, b = world.render(scene, random.Random(5)), world.render(scene, random.Random(5))
    assert a.tobytes() == b.tobytes()
    assert world.render(scene, random.Random(6)).tobytes() != a.tobytes()  # the jitter is seeded, not fixed


def test_hard_negatives_are_wrong_in_exactly_one_attribute():
    from dataclasses import fields

    rng = random.Random(0)
    _, held = world.split()
    for scene in held[:30]:
        for field in (None, "shape"):
            negative = world.hard_negative(scene, rng, field)
            changed = [f.name for f in fields(scene) if getattr(scene, f.name) != getattr(negative, f.name)]
            assert len(changed) == 1 and (field is None or changed == [field]), (scene, negative)


def test_the_decoder_stage_trains_the_decoder_alone(tmp_path):
    """vae_decoder keeps the encoder (and so the latents a UNet trained on) exactly as they were."""
    import torch

    from pocket import fit, nets

    torch.manual_seed(0)
    vae = nets.new_vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    stage = fit.Stage(steps=3, batch=2, lr=1e-3, warmup=1, checkpoint_every=3)
    trained, _ = fit.train_vae_decoder(tmp_path, stage, 0, fit.Log(tmp_path / "log.txt"), start=vae)
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("decoder.") for k in changed) and "post_quant_conv.weight" in changed
    assert all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)
    assert (tmp_path / "vae_decoder-checkpoint" / "state.json").exists()


def test_the_judges_image_degradations_are_seeded_and_mild():
    import torch

    from pocket import fit

    rng = random.Random(0)
    train, _ = world.split()
    pixels = fit.to_pixels([world.render(world.sample_scene(rng, train), rng) for _ in range(4)])
    assert torch.equal(fit.degrade_images(pixels, torch.Generator().manual_seed(1), 0.0), pixels)
    a = fit.degrade_images(pixels, torch.Generator().manual_seed(1), 1.0)
    assert torch.equal(a, fit.degrade_images(pixels, torch.Generator().manual_seed(1), 1.0))
    assert a.shape == pixels.shape and a.min() >= -1 and a.max() <= 1
    assert all(not torch.equal(a[i], pixels[i]) for i in range(4))
    # mild: every image stays far closer to its own rendering than to another scene's
    own = (a - pixels).abs().mean(dim=(1, 2, 3))
    other = (a - pixels.roll(1, dims=0)).abs().mean(dim=(1, 2, 3))
    assert (own < other).all(), (own, other)


def test_pocket_clip_retrieves_held_out_captions(clip):
    result = quality.caption_retrieval(clip, quality.held_out_scenes(40, seed=3), seed=3)
    # 40-way exact caption; the bench measures all held-out scenes (model card: >= 90%).
    assert result.top1 >= 0.85, result.line()
    assert result.shape >= 0.9 and result.colour >= 0.95, result.line()


def test_generated_images_show_the_prompted_shape_and_colour(pocket, clip):
    """For each prompt the pocket CLIP picks the prompt's own caption among the captions that differ from it
    only in shape and colour (30-36 of them), as the bench does for every held-out caption."""
    _, held = world.split()
    scenes = [s for s in held if s.caption() in PROMPTS]
    assert len(scenes) == len(PROMPTS)  # all held out: neither model saw these captions
    images = quality.generate(pocket, [s.caption() for s in scenes], seed=0, steps=20, guidance=5.0)
    named = quality.name_shape_colour(clip, images, scenes)
    assert named == [(s.shape, s.colour) for s in scenes], named


def test_the_pocket_vae_gives_back_what_it_is_given(pocket):
    """quality.reconstruct (the bench's bound on generation): 64-px RGB out, within a few percent of each
    rendering (measured 0.8-2.5% mean absolute error; other scenes differ by 30-80%)."""
    import numpy as np

    rng = random.Random(2)
    rendered = [world.render(s, rng) for s in quality.held_out_scenes(8, seed=2)]
    back = quality.reconstruct(pocket, rendered)
    assert [(im.size, im.mode) for im in back] == [((64, 64), "RGB")] * 8
    error = [np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() / 255 for a, b in zip(rendered, back)]
    assert max(error) < 0.05, error


def test_a_short_lora_run_teaches_the_demo_concept(tmp_path, clip):
    """The demo recipe (the README's walkthrough, presets/demo.yaml: 8 images a step, lr 3e-3, Min-SNR 5) for
    half its 200 steps, which bench/bench_pocket.py runs in full. The pocket CLIP's image similarity to the
    concept rises for the prompt alone and for a new size."""
    from studio import train
    from studio.config import build_config
    from studio.evaluate import metrics
    from studio.generate import AdapterChoice, GenerateRequest, Playground

    data = tmp_path / "demo"
    quality.demo_dataset(data)
    cfg = build_config(values=dict(model="builtin", dataset=str(data), method="lora", **dict(quality.DEMO_RECIPE, steps=100),
                                   sample_every=0, checkpoint_every=0, sample_prompts=[]))
    result = train.run(cfg, tmp_path / "run")
    assert result.status == "completed", result.message

    reference = clip.embed_images([im for im in world.demo_images()])
    playground = Playground()
    prompts = [f"a photo of {quality.DEMO_TOKEN} {quality.DEMO_CLASS}", f"a big {quality.DEMO_TOKEN} {quality.DEMO_CLASS}"]

    def similarity(adapters) -> float:
        images = [playground.generate(GenerateRequest(p, "builtin", adapters, seed=s, steps=15, guidance=5.0))
                  for p in prompts for s in range(3)]
        return metrics.image_similarity(clip.embed_images(images), reference)

    base = similarity([])
    adapted = similarity([AdapterChoice(str(result.run_dir), 1.0)])
    assert adapted > base + 0.08, (base, adapted)


def test_missing_pocket_model_is_one_sentence(monkeypatch, tmp_path):
    from studio import models
    from studio.errors import StudioError

    monkeypatch.setattr(models, "POCKET_DIR", tmp_path / "pocket-sd")
    with pytest.raises(StudioError, match="built-in model is missing"):
        models.resolve("builtin")


def test_the_runtime_never_imports_the_training_code():
    """The pocket package (world, nets, fit, quality) trains and measures the shipped weights; the studio only
    loads them. No import statement anywhere in studio/, lazy ones inside functions included, names it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert not (root / "studio" / "pocket").exists()
    found = []
    for path in sorted((root / "studio").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names
                      if n.split(".")[0] == "pocket" or n.startswith("studio.pocket")]
    assert not found, found


def test_loading_the_builtin_model_needs_only_the_runtime():
    """In a fresh interpreter, every studio module (the CLI and the UI's included) imported and the built-in
    model resolved and keyed leave no pocket module loaded; the key's version is the shipped weights' own."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from studio import models

    code = ("import importlib, pkgutil, sys, studio\n"
            "for m in pkgutil.walk_packages(studio.__path__, 'studio.'): importlib.import_module(m.name)\n"
            "from studio import models\n"
            "models.resolve('builtin'); print(models.builtin_version('builtin'))\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] == 'pocket' or k.startswith('studio.pocket')))\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    key, loaded = out.stdout.strip().splitlines()[-2:]
    assert loaded == "[]", loaded
    shipped = json.loads((models.POCKET_DIR / models.BUILTIN_MARKER).read_text())["version"]
    assert key == f"pocket-v{shipped}" == f"pocket-v{models.POCKET_VERSION}"
