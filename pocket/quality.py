"""How well the pocket models work, measured on the held-out combinations (bench/bench_pocket.py prints
these; tests/test_pocket.py checks a few of them on a small scale).

- `caption_retrieval`: the pocket CLIP ranks every held-out caption for each held-out scene;
- `generation_match`: the pocket model draws held-out captions; the pocket CLIP names the shape and
  colour of each image among the captions that differ from its own only in shape and colour (30-36),
  and the full caption among all held-out captions;
- `demo_dataset`: the demo concept's images as a studio dataset, for the LoRA walkthrough;
- `walkthrough_commands`: the README walkthrough's commands, which the walkthrough test and the bench run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pocket import world

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "assets" / "demo-concept"
DEMO_TOKEN, DEMO_CLASS = "sks", "shape"
README = REPO / "README.md"
WALKTHROUGH_HEADING = "### Walkthrough: teach it a shape it has never seen"


def demo_recipe() -> dict:
    """The walkthrough's training settings: presets/demo.yaml (`--preset demo`), which says why each is so."""
    from studio.config import load_preset

    return load_preset("demo")


# The preset's settings without its method (always a LoRA) and its samples: what the tests train with.
DEMO_RECIPE = {k: v for k, v in demo_recipe().items() if k != "method" and not k.startswith("sample_")}


def walkthrough_commands(readme: Path = README) -> list[list[str]]:
    """The README walkthrough's commands, as the words after `python -m studio`, read from the first code
    block under its heading (continuation lines joined). The walkthrough test and the bench run exactly
    these, so what the README tells a user to type is what is measured."""
    import shlex

    text = readme.read_text(encoding="utf-8")
    if WALKTHROUGH_HEADING not in text:
        raise ValueError(f"{readme} has no section '{WALKTHROUGH_HEADING}'")
    section = text.split(WALKTHROUGH_HEADING, 1)[1]
    block = section.split("```", 2)[1].split("\n", 1)[1]  # the first fenced block, without its info string
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        if not words:
            continue
        if words[:3] != ["python", "-m", "studio"]:
            raise ValueError(f"walkthrough line is not a studio command: {line!r}")
        commands.append(words[3:])
    return commands


@dataclass
class Retrieval:
    n: int
    top1: float  # the exact caption ranked first
    shape: float  # the first-ranked caption names the right shape
    colour: float

    def line(self) -> str:
        return f"top-1 {self.top1:.1%} (shape {self.shape:.1%}, colour {self.colour:.1%}) over {self.n}"


def held_out_scenes(n: int | None = None, seed: int = 0) -> list[world.Scene]:
    """The held-out combinations (all, or a seeded sample of n)."""
    _, held = world.split()
    return held if n is None or n >= len(held) else random.Random(seed).sample(held, n)


def _rank(embedder, images, captions: list[str]) -> torch.Tensor:
    """Index of the best caption for each image."""
    return (embedder.embed_images(images) @ embedder.embed_texts(captions).T).argmax(dim=1)


def caption_retrieval(embedder, scenes: list[world.Scene], seed: int = 0) -> Retrieval:
    """Each scene rendered once (seeded jitter), ranked against the full captions of all `scenes`."""
    rng = random.Random(seed)
    images = [world.render(s, rng) for s in scenes]
    best = _rank(embedder, images, [s.caption() for s in scenes]).tolist()
    return _score(scenes, [scenes[i] for i in best])


def _score(truth: list[world.Scene], picked: list[world.Scene]) -> Retrieval:
    n = len(truth)
    return Retrieval(n, sum(t == p for t, p in zip(truth, picked)) / n,
                     sum(t.shape == p.shape for t, p in zip(truth, picked)) / n,
                     sum(t.colour == p.colour for t, p in zip(truth, picked)) / n)


def shape_colour_alternatives(scene: world.Scene) -> list[world.Scene]:
    """The scene with every shape x colour (the colour never that of the background): its full caption
    and the captions that differ from it only in shape and colour."""
    return [replace(scene, shape=s, colour=c) for s in world.SHAPES for c in world.COLOURS if c != scene.background]


def name_shape_colour(embedder, images, scenes: list[world.Scene]) -> list[tuple[str, str]]:
    """The pocket CLIP's (shape, colour) for each image: the best of the full captions that differ from
    its scene's caption only in shape and colour (30 or 36 candidates)."""
    named = []
    image_embeddings = embedder.embed_images(images)
    for embedding, scene in zip(image_embeddings, scenes):
        options = shape_colour_alternatives(scene)
        best = int((embedder.embed_texts([o.caption() for o in options]) @ embedding).argmax())
        named.append((options[best].shape, options[best].colour))
    return named


@dataclass
class GenerationMatch:
    n: int
    shape_and_colour: float  # both named right among the captions that differ only in shape and colour
    shape: float
    colour: float
    full_caption: float  # the exact caption first among the held-out captions drawn

    def line(self) -> str:
        return (f"shape+colour top-1 {self.shape_and_colour:.1%} (shape {self.shape:.1%}, colour {self.colour:.1%}); "
                f"full caption top-1 {self.full_caption:.1%} among {self.n}")


def match(embedder, images, scenes: list[world.Scene]) -> GenerationMatch:
    named = name_shape_colour(embedder, images, scenes)
    n = len(scenes)
    full = _score(scenes, [scenes[i] for i in _rank(embedder, images, [s.caption() for s in scenes]).tolist()])
    return GenerationMatch(n, sum((s.shape, s.colour) == x for s, x in zip(scenes, named)) / n,
                           sum(s.shape == x[0] for s, x in zip(scenes, named)) / n,
                           sum(s.colour == x[1] for s, x in zip(scenes, named)) / n, full.top1)


@torch.no_grad()
def reconstruct(pipe, images):
    """The images passed through the pipeline's VAE (encoded to the posterior mean, decoded): every image
    the model draws goes through that decoder, so the judge's score on these bounds what generation shows."""
    pixels = pipe.image_processor.preprocess(images).to(pipe.vae.dtype)
    return pipe.image_processor.postprocess(pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample,
                                            output_type="pil")


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 25, guidance: float = 5.0, batch: int = 64):
    """Images for the prompts, seed + i for prompt i, in batches (each image's noise is its own)."""
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                       height=world.RESOLUTION, width=world.RESOLUTION).images
    return images


def demo_dataset(out: Path):
    """The demo concept's images as a studio dataset folder ('a photo of sks shape'); returns its spec."""
    from studio.data.dataset import prep_folder

    spec, problems = prep_folder(DEMO_DIR, out, DEMO_TOKEN, DEMO_CLASS, world.RESOLUTION)
    if problems:
        raise RuntimeError(f"demo concept images did not import: {problems}")
    return spec
