"""Train the pocket models from a seed and write them where the studio ships them.

    python scripts/train_pocket.py --work /tmp/pocket-work                # all stages, resumable
    python scripts/train_pocket.py --work /tmp/pocket-work --stage clip   # one stage
    python scripts/train_pocket.py --work /tmp/pocket-work --stage write  # assets/pocket-sd, assets/pocket-clip
    python scripts/train_pocket.py --demo                                 # assets/demo-concept/*.png

Stages run in the order of ORDER. clip trains both towers contrastively; clip_text sharpens its text tower
alone, which becomes the SD text encoder; clip_shapes continues clip with the weight on shapes, and
clip_robust continues that on partly degraded images: it is the evaluation CLIP. vae_decoder trains the
VAE's decoder further with its encoder frozen, so the latents do not change; the UNet needs the clip_text
tower and the VAE's encoder. clip and vae are independent and may run at the same time in two processes.
A stage that was interrupted continues from its last checkpoint in --work when started again; a
finished stage is not rerun.
Step counts and batch sizes are in pocket/fit.py (STAGES); --steps overrides a stage's count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ASSETS = REPO / "assets"
ORDER = ("clip", "clip_text", "clip_shapes", "clip_robust", "vae", "vae_decoder", "unet", "write")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pocket-work"), help="checkpoints and logs")
    parser.add_argument("--stage", choices=ORDER + ("all",), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=None, help="override the stage's step count")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="UNet: stop at this checkpointed step, keeping the schedule of the full step count")
    parser.add_argument("--pool", type=int, default=20000, help="training scenes the UNet stage encodes once")
    parser.add_argument("--out", type=Path, default=ASSETS, help="where pocket-sd/ and pocket-clip/ are written")
    parser.add_argument("--demo", action="store_true", help="write the demo concept's images and stop")
    args = parser.parse_args(argv)
    if args.demo:
        return write_demo(args.out / "demo-concept")

    import torch

    from studio.models import quiet_libraries
    from pocket import fit

    torch.set_num_threads(args.threads)
    quiet_libraries()
    args.work.mkdir(parents=True, exist_ok=True)
    log = fit.Log(args.work / f"{args.stage}.log")
    stages = ORDER if args.stage == "all" else (args.stage,)
    for stage in stages:
        globals()[f"stage_{stage}"](args, fit, log)
    return 0


def _schedule(fit, name: str, steps: int | None):
    from dataclasses import replace

    return replace(fit.STAGES[name], steps=steps) if steps else fit.STAGES[name]


def _done(args, name: str) -> Path:
    return args.work / f"{name}-final"


def _record(args, name: str, stage, seconds: float) -> None:
    """What trained the stage; `phases` lists the step count of each invocation (see _finished)."""
    path = _done(args, name) / "trained.json"
    before = json.loads(path.read_text()) if path.exists() else {}
    kept = {k: before[k] for k in ("carried_over",) if k in before}  # where an earlier phase's weights came from
    path.write_text(json.dumps(
        {"steps": stage.steps, "batch": stage.batch, "lr": stage.lr, "seconds": round(seconds), "seed": args.seed,
         "threads": args.threads, "phases": before.get("phases", []) + [stage.steps], **kept}))


def _finished(args, name: str, log) -> bool:
    """A stage is done unless --steps asks for more steps than it trained: then it continues from its last
    checkpoint with a cosine schedule stretched to the new count (a warm restart at that step's rate)."""
    path = _done(args, name) / "trained.json"
    if not path.exists():
        return False
    if args.steps and args.steps > json.loads(path.read_text())["steps"]:
        log(f"{name}: continuing to {args.steps} steps")
        return False
    log(f"{name}: already trained")
    return True


def stage_clip(args, fit, log) -> None:
    if _finished(args, "clip", log):
        return
    stage = _schedule(fit, "clip", args.steps)
    clip, seconds = fit.train_clip(args.work, stage, args.seed, log)
    clip.save_pretrained(_done(args, "clip"), safe_serialization=True)
    _record(args, "clip", stage, seconds)


def stage_clip_text(args, fit, log) -> None:
    """The text tower sharpened to name every attribute (see fit.train_clip_text); it is the SD text encoder."""
    from transformers import CLIPModel

    if _finished(args, "clip_text", log):
        return
    stage = _schedule(fit, "clip_text", args.steps)
    clip, seconds = fit.train_clip_text(args.work, stage, args.seed + 20, log,
                                        start=CLIPModel.from_pretrained(_done(args, "clip")))
    clip.save_pretrained(_done(args, "clip_text"), safe_serialization=True)
    _record(args, "clip_text", stage, seconds)


def stage_clip_shapes(args, fit, log) -> None:
    """clip continued with shape-weighted negatives and read-outs (fit.SHAPES_FOCUS)."""
    _continue_clip(args, fit, log, "clip_shapes", "clip", 30, fit.SHAPES_FOCUS)


def stage_clip_robust(args, fit, log) -> None:
    """clip_shapes continued with half its images degraded (fit.ROBUST): the evaluation CLIP."""
    _continue_clip(args, fit, log, "clip_robust", "clip_shapes", 40, fit.ROBUST)


def _continue_clip(args, fit, log, name: str, start: str, seed_offset: int, focus: dict) -> None:
    """A joint CLIP stage (fit.train_clip) that starts from stage `start`'s model."""
    from transformers import CLIPModel

    if _finished(args, name, log):
        return
    stage = _schedule(fit, name, args.steps)
    clip, seconds = fit.train_clip(args.work, stage, args.seed + seed_offset, log,
                                   start=CLIPModel.from_pretrained(_done(args, start)), name=name, **focus)
    clip.save_pretrained(_done(args, name), safe_serialization=True)
    _record(args, name, stage, seconds)


def stage_vae(args, fit, log) -> None:
    if _finished(args, "vae", log):
        return
    stage = _schedule(fit, "vae", args.steps)
    vae, seconds = fit.train_vae(args.work, stage, args.seed, log)
    vae.save_pretrained(_done(args, "vae"), safe_serialization=True)
    _record(args, "vae", stage, seconds)


def stage_vae_decoder(args, fit, log) -> None:
    """The vae stage's decoder trained further, its encoder frozen (fit.train_vae_decoder): what ships."""
    from diffusers import AutoencoderKL

    if _finished(args, "vae_decoder", log):
        return
    stage = _schedule(fit, "vae_decoder", args.steps)
    vae, seconds = fit.train_vae_decoder(args.work, stage, args.seed, log,
                                         start=AutoencoderKL.from_pretrained(_done(args, "vae")))
    vae.save_pretrained(_done(args, "vae_decoder"), safe_serialization=True)
    _record(args, "vae_decoder", stage, seconds)


def stage_unet(args, fit, log) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTokenizer

    from studio.models import TOKENIZER_DIR

    if _finished(args, "unet", log):
        return
    vae = AutoencoderKL.from_pretrained(_done(args, "vae")).eval()  # only its encoder is used: vae_decoder's is the same
    text_encoder = fit.text_encoder_from(CLIPModel.from_pretrained(_done(args, "clip_text")))
    stage = _schedule(fit, "unet", args.steps)
    unet, seconds = fit.train_unet(args.work, stage, args.seed, log, vae, text_encoder,
                                   CLIPTokenizer.from_pretrained(TOKENIZER_DIR), pool_size=args.pool, stop_at=args.stop_at)
    unet.save_pretrained(_done(args, "unet"), safe_serialization=True)
    _record(args, "unet", stage, seconds)
    if args.stop_at:
        record = json.loads((_done(args, "unet") / "trained.json").read_text())
        (_done(args, "unet") / "trained.json").write_text(json.dumps({**record, "stopped_at": args.stop_at}))


def stage_write(args, fit, log) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel

    from studio.models import POCKET_VERSION

    names = ORDER[:-1]
    trained = {n: json.loads((_done(args, n) / "trained.json").read_text()) for n in names}
    info = {"version": POCKET_VERSION, "written": time.strftime("%Y-%m-%d"), "training": trained}
    fit.write_clip(CLIPModel.from_pretrained(_done(args, "clip_robust")), args.out / "pocket-clip", info)
    # The SD text encoder is the text tower after the text-only stage, the one the UNet trained with; the VAE
    # is the vae stage's encoder with the vae_decoder stage's decoder.
    fit.write_pipeline(AutoencoderKL.from_pretrained(_done(args, "vae_decoder")),
                       fit.text_encoder_from(CLIPModel.from_pretrained(_done(args, "clip_text"))),
                       UNet2DConditionModel.from_pretrained(_done(args, "unet")), args.out / "pocket-sd", info)
    log(f"wrote {args.out / 'pocket-sd'} and {args.out / 'pocket-clip'}")


def write_demo(out: Path) -> int:
    from pocket.world import demo_images

    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(demo_images()):
        image.save(out / f"{i:02d}.png")
    print(f"wrote {len(list(out.glob('*.png')))} images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
