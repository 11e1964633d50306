"""Measure the shipped pocket models (assets/pocket-sd, assets/pocket-clip) on what the model card claims.

    python bench/bench_pocket.py              # everything: ~10 min on 2 CPU cores
    python bench/bench_pocket.py --skip-lora  # retrieval and generation only

Three figures, printed with their targets (nothing is asserted; a target missed prints MISSED):

1. Caption retrieval: each held-out scene (a combination no model saw in training) rendered once,
   ranked by the pocket CLIP against the full captions of all held-out scenes. Target: top-1 >= 90%.
2. Generation: the pocket model draws every held-out caption (one seed each); the pocket CLIP picks,
   for each image, the best of the full captions that differ from its own only in shape and colour
   (30-36 of them). Target: both right >= 70%.
   The same measure on the real renderings of those scenes is printed beside it as the ceiling, and on
   those renderings passed through the pocket VAE (encoded and decoded), which bounds what generation shows.
3. The demo concept: a LoRA trained with the studio's own loop (studio.train.run) on
   assets/demo-concept within 3 minutes, then the studio's evaluation protocol
   (studio.evaluate.protocol.evaluate): image similarity to the concept should rise clearly above
   the base model's, prompt similarity should stay near the base model's.

The script sets HF_HUB_OFFLINE=1 and uses a temporary STUDIO_CACHE and workspace it deletes at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEMO_CONTEXTS = ["on a red background", "on a blue background", "on a white background, on the left"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per generated image")
    parser.add_argument("--guidance", type=float, nargs="+", default=[5.0],
                        help="classifier-free guidance scales to measure generation at; the first one serves the demo")
    from studio.pocket.quality import DEMO_RECIPE

    parser.add_argument("--lora-steps", type=int, default=DEMO_RECIPE["steps"])
    parser.add_argument("--lora-lr", type=float, default=DEMO_RECIPE["learning_rate"])
    parser.add_argument("--lora-batch", type=int, default=DEMO_RECIPE["batch_size"])
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt in the demo evaluation")
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument("--clip", default="builtin", help="the judging CLIP: 'builtin' (assets/pocket-clip) or a folder")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pocket-"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["STUDIO_CACHE"] = str(tmp / "cache")
    import torch

    torch.set_num_threads(args.threads)
    from studio import models
    from studio.evaluate.embedders import ClipEmbedder
    from studio.pocket import quality

    print(f"torch threads {args.threads}; model {models.builtin_dir()}")
    clip = ClipEmbedder(args.clip)
    held = quality.held_out_scenes()
    t0 = time.perf_counter()
    retrieval = quality.caption_retrieval(clip, held)
    print(f"\n1. pocket CLIP caption retrieval, held-out scenes: {retrieval.line()} captions "
          f"[{time.perf_counter() - t0:.1f} s]  target top-1 >= 90%: {_verdict(retrieval.top1 >= 0.9)}")

    pipe = models.load_pipeline(models.resolve("builtin"))
    import random

    from studio.pocket import world

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
    from studio import train
    from studio.config import build_config
    from studio.evaluate.protocol import EvalConfig, evaluate
    from studio.pocket import quality

    data = tmp / "demo"
    quality.demo_dataset(data)
    recipe = dict(quality.DEMO_RECIPE, steps=args.lora_steps, learning_rate=args.lora_lr, batch_size=args.lora_batch)
    cfg = build_config(values=dict(model="builtin", dataset=str(data), method="lora", **recipe, rank=args.lora_rank,
                                   alpha=float(args.lora_rank), sample_every=0, checkpoint_every=0, sample_prompts=[]))
    t0 = time.perf_counter()
    result = train.run(cfg, tmp / "runs" / "demo-lora")
    seconds = time.perf_counter() - t0
    print(f"\n3. LoRA on the demo concept: {result.status}, {result.step} steps, rank {args.lora_rank}, "
          f"lr {args.lora_lr}, batch {args.lora_batch}, {seconds:.0f} s including loading  target <= 180 s: {_verdict(seconds <= 180)}")
    ev = evaluate(EvalConfig(dataset=str(data), runs=[str(result.run_dir)], model="builtin", clip=args.clip,
                             dino="none", kinds=["context"], contexts=DEMO_CONTEXTS, seeds=args.seeds,
                             steps=args.steps, guidance=args.guidance[0]), tmp / "eval")
    table = ev.table.set_index("point")
    print(table[["kind", "image_similarity", "prompt_similarity", "n_images"]].to_string(float_format="%.3f"))
    base, run = table.loc["base model"], table[table["kind"] == "run"].iloc[0]
    ceiling = table.loc["dataset", "image_similarity"]
    rise = run["image_similarity"] - base["image_similarity"]
    change = run["prompt_similarity"] - base["prompt_similarity"]
    print(f"   image similarity {base['image_similarity']:.3f} -> {run['image_similarity']:.3f} ({rise:+.3f}; "
          f"the dataset against itself: {ceiling:.3f}); prompt similarity {base['prompt_similarity']:.3f} -> "
          f"{run['prompt_similarity']:.3f} ({change:+.3f})")
    print(f"   contexts: {DEMO_CONTEXTS}; {args.seeds} seeds per prompt")


def _save_grid(images, path: Path, cols: int = 12) -> None:
    from PIL import Image

    grid = Image.new("RGB", (64 * cols, 64 * ((len(images) + cols - 1) // cols)))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * 64, (i // cols) * 64))
    grid.save(path)
    print(f"   {len(images)} generated images: {path}")


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


if __name__ == "__main__":
    raise SystemExit(main())
