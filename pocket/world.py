"""Procedural scenes: one shape on a plain background, rendered with PIL, captioned exactly.

A scene is six attributes (shape, colour, size, texture, position, background). Every combination
is enumerated in a fixed order and a seeded 10% of them is held out: the models never see those
combinations in training, and the benchmark asks them about exactly those.

Rendering draws at twice the size and downsamples (a box filter), so edges are anti-aliased; a small
seeded jitter in place and size keeps two renderings of one caption from being identical.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

RESOLUTION = 64
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {"red": (215, 38, 38), "orange": (245, 135, 20), "yellow": (240, 215, 30),
           "green": (40, 160, 60), "blue": (35, 75, 215), "purple": (135, 45, 185)}
BACKGROUNDS = {"white": (242, 242, 242), "black": (18, 18, 18), "grey": (128, 128, 128),
               "red": (200, 45, 45), "blue": (40, 80, 200)}
SIZES = {"small": 9.0, "big": 17.0}  # radius in pixels at 64 px
TEXTURES = ("plain", "striped")
POSITIONS = {"on the left": 20.0, "in the middle": 32.0, "on the right": 44.0}  # centre x at 64 px
PREFIXES = ("a", "a photo of a", "a picture of a")
HELD_OUT_FRACTION = 0.1
SPLIT_SEED = 6


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    texture: str
    position: str
    background: str

    def caption(self, prefix: str = "a") -> str:
        """The full caption, e.g. 'a big striped red star on a white background, on the left'."""
        texture = "striped " if self.texture == "striped" else ""
        return f"{prefix} {self.size} {texture}{self.colour} {self.shape} on a {self.background} background, {self.position}"


def all_scenes() -> list[Scene]:
    """Every combination, in a fixed order; a shape never has the colour of its background."""
    return [Scene(*c) for c in itertools.product(SHAPES, COLOURS, SIZES, TEXTURES, POSITIONS, BACKGROUNDS)
            if c[1] != c[5]]


def split(seed: int = SPLIT_SEED) -> tuple[list[Scene], list[Scene]]:
    """(training combinations, held-out combinations)."""
    scenes = all_scenes()
    rng = random.Random(seed)
    held = set(rng.sample(range(len(scenes)), round(HELD_OUT_FRACTION * len(scenes))))
    return ([s for i, s in enumerate(scenes) if i not in held], [s for i, s in enumerate(scenes) if i in held])


def partial_caption(scene: Scene, rng: random.Random, drop: float) -> str:
    """A caption that names only some attributes (each left out with probability `drop`), the way people
    write prompts; the shape becomes the word 'shape' when left out. Never wrong, only less specific."""
    return named_caption(scene, rng, drop)[0]


def named_caption(scene: Scene, rng: random.Random, drop: float) -> tuple[str, set[str]]:
    """partial_caption and the attributes it names (the same draws from `rng`). 'Plain' is never a word:
    the texture counts as named when the caption says 'striped', or when a plain scene's caption names
    every other attribute (a full caption without 'striped' means plain)."""
    words, named = [rng.choice(PREFIXES)], set()
    if rng.random() > drop:
        words.append(scene.size)
        named.add("size")
    if scene.texture == "striped" and rng.random() > drop:
        words.append("striped")
        named.add("texture")
    if rng.random() > drop:
        words.append(scene.colour)
        named.add("colour")
    if rng.random() > drop / 3:
        words.append(scene.shape)
        named.add("shape")
    else:
        words.append("shape")
    text = " ".join(words)
    if rng.random() > drop:
        text += f" on a {scene.background} background"
        named.add("background")
    if rng.random() > drop:
        text += f", {scene.position}"
        named.add("position")
    if scene.texture == "plain" and named >= {"size", "colour", "shape", "background", "position"}:
        named.add("texture")
    return text, named


# ---------------------------------------------------------------------------- drawing

def _points(kind: str, cx: float, cy: float, r: float, angle0: float = -90.0) -> list[tuple[float, float]]:
    if kind == "square":
        h = r * 0.82
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        return [(cx + r * math.cos(math.radians(a)), cy + 0.15 * r + r * math.sin(math.radians(a)))
                for a in (-90, 30, 150)]
    if kind == "star":
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(math.radians(angle0 + 36 * i)),
                 cy + (r if i % 2 == 0 else 0.45 * r) * math.sin(math.radians(angle0 + 36 * i))) for i in range(10)]
    if kind == "cross":
        a, w = r, r * 0.36
        return [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w),
                (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w),
                (cx - a, cy - w), (cx - w, cy - w)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    raise ValueError(f"unknown polygon shape {kind!r}")


def _mask(kind: str, cx: float, cy: float, r: float, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind == "crescent":  # the demo concept's shape: a disc with an offset disc cut out
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        draw.ellipse((cx - r * 0.35, cy - r * 1.05, cx + r * 1.45, cy + r * 0.75), fill=0)
    else:
        draw.polygon(_points(kind, cx, cy, r), fill=255)
    return mask


def _stripes(colour: tuple[int, int, int], size: int, period: float) -> Image.Image:
    """Diagonal stripes: the colour and a darker shade of it, half a period each."""
    dark = tuple(int(c * 0.45) for c in colour)
    layer = Image.new("RGB", (size, size), colour)
    draw = ImageDraw.Draw(layer)
    for k in range(-size, size, int(period)):
        draw.polygon([(k, 0), (k + period / 2, 0), (k + period / 2 + size, size), (k + size, size)], fill=dark)
    return layer


def render(scene: Scene, rng: random.Random | None = None, resolution: int = RESOLUTION) -> Image.Image:
    """The scene as an RGB image; `rng` adds a jitter of up to 3 px in place and 1 px in radius."""
    rng = rng or random.Random(0)
    k = 2 * resolution / RESOLUTION  # drawn at twice the size, then downsampled
    big = int(resolution * 2)
    cx = (POSITIONS[scene.position] + rng.uniform(-3, 3)) * k
    cy = (32.0 + rng.uniform(-3, 3)) * k
    r = (SIZES[scene.size] + rng.uniform(-1, 1)) * k
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    colour = COLOURS[scene.colour]
    fill = _stripes(colour, big, 6 * k) if scene.texture == "striped" else Image.new("RGB", (big, big), colour)
    canvas.paste(fill, mask=_mask(scene.shape, cx, cy, r, big))
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


def sample_scene(rng: random.Random, scenes: list[Scene]) -> Scene:
    return scenes[rng.randrange(len(scenes))]


# ---------------------------------------------------------------------------- the demo concept

DEMO_COLOUR = COLOURS["orange"]


def render_demo(rng: random.Random, background: str, size: str, position: str,
                resolution: int = RESOLUTION) -> Image.Image:
    """The demo concept: an orange crescent. The pocket world has no crescent, so a model that draws one
    has learnt it from the concept's images.

    It is one flat colour of the world's palette because the pocket VAE, trained on the world alone,
    cannot carry anything else through its latents: a crescent with a yellow-and-teal checkerboard came
    back as a brown smear (foreground L1 0.54 on [-1, 1] pixels, against 0.14 for this one), and a LoRA
    cannot teach the UNet latents the VAE does not produce."""
    k = 2 * resolution / RESOLUTION
    big = int(resolution * 2)
    cx = (POSITIONS[position] + rng.uniform(-2, 2)) * k
    cy = (32.0 + rng.uniform(-2, 2)) * k
    r = (SIZES[size] + 1.5 + rng.uniform(-1, 1)) * k
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[background])
    canvas.paste(Image.new("RGB", (big, big), DEMO_COLOUR), mask=_mask("crescent", cx, cy, r, big))
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


DEMO_VIEWS = (("white", "big", "in the middle"), ("grey", "big", "on the left"), ("black", "big", "on the right"),
              ("white", "small", "on the right"), ("grey", "small", "in the middle"), ("black", "big", "in the middle"))


def demo_images(seed: int = 0) -> list[Image.Image]:
    """The demo concept's six images, on white, grey and black only (never on red or blue), so that
    'on a red background' afterwards is a new context for it."""
    rng = random.Random(seed)
    return [render_demo(rng, *view) for view in DEMO_VIEWS]


# Every attribute of a scene and its values, in caption order (hard negatives and training read-outs).
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "texture": TEXTURES,
              "position": tuple(POSITIONS), "background": tuple(BACKGROUNDS)}


def hard_negative(scene: Scene, rng: random.Random, field: str | None = None) -> Scene:
    """The same scene with one attribute changed (`field`, else one at random): a caption that is wrong in
    exactly one word."""
    field = field or rng.choice(tuple(ATTRIBUTES))
    value = rng.choice([o for o in ATTRIBUTES[field] if o != getattr(scene, field)])
    return replace(scene, **{field: value})
