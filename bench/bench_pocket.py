"""Measure the shipped pocket models (assets/pocket-sd, assets/pocket-clip) on what the model card claims.

    python bench/bench_pocket.py              # everything: ~10 min on 2 CPU cores
    python bench/bench_pocket.py --skip-lora  # retrieval and generation only
    python bench/bench_pocket.py --walkthrough-only  # the README walkthrough only

Three figures, printed with their targets (nothing is asserted; a target missed prints MISSED):

1. Caption retrieval: each held-out scene (a combination no model saw in training) rendered once,
   ranked by the pocket CLIP against the full captions of all held-out scenes. Target: top-1 >= 90%.
2. Generation: the pocket model draws every held-out caption (one seed each); the pocket CLIP picks,
   for each image, the best of the full captions that differ from its own only in shape and colour
   (30-36 of them). Target: both right >= 70%.
   The same measure on the real renderings of those scenes is printed beside it as the ceiling, and on
   those renderings passed through the pocket VAE (encoded and decoded), which bounds what generation shows.
3. The README's walkthrough (prep, train with --preset demo, two generate commands, evaluate), its commands
   read out of README.md and run word for word in a fresh working directory: each command's time, the
   estimate training printed, the two images, the training samples, and the evaluation's image similarity
   to the concept and prompt similarity, base model against the LoRA: the figures the README quotes.

The script sets HF_HUB_OFFLINE=1 and uses a temporary STUDIO_CACHE and workspace it deletes at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per generated image")
    parser.add_argument("--guidance", type=float, nargs="+", default=[5.0],
                        help="classifier-free guidance scales to measure generation at")
    parser.add_argument("--skip-lora", action="store_true", help="leave out the README walkthrough (3.)")
    parser.add_argument("--walkthrough-only", action="store_true", help="only the README walkthrough (3.)")
    parser.add_argument("--clip", default="builtin", help="the judging CLIP: 'builtin' (assets/pocket-clip) or a folder")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pocket-"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["STUDIO_CACHE"] = str(tmp / "cache")
    import torch

    torch.set_num_threads(args.threads)
    from studio import models
    from studio.evaluate.embedders import ClipEmbedder
    from pocket import quality

    print(f"torch threads {args.threads}; model {models.builtin_dir()}")
    if args.walkthrough_only:
        demo_lora(args, tmp)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return 0
    clip = ClipEmbedder(args.clip)
    held = quality.held_out_scenes()
    t0 = time.perf_counter()
    retrieval = quality.caption_retrieval(clip, held)
    print(f"\n1. pocket CLIP caption retrieval, held-out scenes: {retrieval.line()} captions "
          f"[{time.perf_counter() - t0:.1f} s]  target top-1 >= 90%: {_verdict(retrieval.top1 >= 0.9)}")

    pipe = models.load_pipeline(models.resolve("builtin"))
    import random

    from pocket import world

    rng = random.Random(1)
    rendered = [world.render(s, rng) for s in held]
    ceiling = quality.match(clip, rendered, held)
    through_vae = quality.match(clip, quality.reconstruct(pipe, rendered), held)
    print(f"\n2. pocket model on the {len(held)} held-out captions, one seed each, {args.steps} DDIM steps"
          f"\n   rendered scenes (the ceiling): {ceiling.line()}"
          f"\n   the same through the pocket VAE (what generation can show): {through_vae.line()}")
    for guidance in args.guidance:
        t0 = time.perf_counter()
        images = quality.generate(pipe, [s.caption() for s in held], seed=0, steps=args.steps, guidance=guidance)
        seconds = time.perf_counter() - t0
        drawn = quality.match(clip, images, held)
        print(f"   generated, guidance {guidance:g} ({seconds / len(held):.2f} s per image): {drawn.line()}"
              f"  target shape+colour >= 70%: {_verdict(drawn.shape_and_colour >= 0.7)}")
        # eight of each shape, one shape a row (the held-out list is ordered by shape)
        shown = [i for shape in world.SHAPES for i in [k for k, s in enumerate(held) if s.shape == shape][:8]]
        _save_grid([images[i] for i in shown], Path(tempfile.gettempdir()) / f"bench-pocket-generated-g{guidance:g}.png",
                   cols=8)
    if not args.skip_lora:
        demo_lora(args, tmp)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def demo_lora(args, tmp: Path) -> None:
    """The README's walkthrough, command for command (read out of README.md), in a fresh working directory
    that holds the clone's assets/ as a user's checkout does: the figures it prints are what a user gets."""
    import csv
    import subprocess

    from pocket import quality

    cwd = tmp / "user"
    cwd.mkdir()
    (cwd / "assets").symlink_to(REPO / "assets", target_is_directory=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads))
    print(f"\n3. the README walkthrough, as a user types it (in {cwd}):")
    for words in quality.walkthrough_commands():
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "studio", *words], cwd=cwd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        print(f"   python -m studio {' '.join(words[:1])} ... [{seconds:.0f} s, exit {done.returncode}]")
        if done.returncode:
            print(done.stdout[-2000:], done.stderr[-2000:])
            return
        if words[0] in ("generate",):
            name = words[words.index("--out") + 1]
            shown = Path(tempfile.gettempdir()) / f"bench-pocket-walkthrough-{name}"
            shown.write_bytes((cwd / name).read_bytes())
            print(f"      {shown}")
        if words[0] == "train":
            run = cwd / words[words.index("--out") + 1]
            for line in done.stdout.splitlines():
                if line.startswith("About "):
                    print(f"      told before training: {line}")
        if words[0] == "evaluate":
            out = cwd / words[words.index("--out") + 1]
    rows = {r["point"]: r for r in csv.DictReader((out / "summary.csv").open(encoding="utf-8"))}
    base = rows["base model"]
    lora = next(r for r in rows.values() if r["kind"] == "run")
    number = lambda row, key: float(row[key])  # noqa: E731
    print(f"   image similarity {number(base, 'image_similarity'):.3f} -> {number(lora, 'image_similarity'):.3f} "
          f"(the dataset against itself: {number(rows['dataset'], 'image_similarity'):.3f}); prompt similarity "
          f"{number(base, 'prompt_similarity'):.3f} -> {number(lora, 'prompt_similarity'):.3f}; "
          f"{lora['n_images']} images a point")
    samples = sorted((run / "samples").glob("*.png"))
    if samples:
        _save_grid([Image.open(f).convert("RGB") for f in samples],
                   Path(tempfile.gettempdir()) / "bench-pocket-walkthrough-samples.png", cols=len(samples))


def _save_grid(images, path: Path, cols: int = 12) -> None:
    grid = Image.new("RGB", (64 * cols, 64 * ((len(images) + cols - 1) // cols)))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * 64, (i // cols) * 64))
    grid.save(path)
    print(f"   {len(images)} generated images: {path}")


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


if __name__ == "__main__":
    raise SystemExit(main())
