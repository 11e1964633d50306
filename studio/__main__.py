"""Command line: python -m studio {prep,train,generate,evaluate,extract-lora,builtin-model,ui}.

The same core functions the UI calls. Errors a user can cause print one sentence and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from studio.errors import StudioError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


MODEL_HELP = "hub id, local diffusers folder, single-file .safetensors checkpoint (SD 1.x/2.x/SDXL), or 'builtin'"
VAE_HELP = "a separate VAE (.safetensors file or diffusers folder) instead of the model's own"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studio", description="Concept Studio: teach Stable Diffusion a concept.")
    sub = p.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prep", help="turn a folder of photos (or a kohya / imagefolder folder, or a studio "
                                        "dataset to re-export) into a dataset folder")
    prep.add_argument("src", type=Path, help="photos, kohya 'N_name' folders, a folder with metadata.jsonl, or a dataset")
    prep.add_argument("--out", type=Path, required=True)
    prep.add_argument("--token", default=None, help="trigger word, e.g. sks (required unless SRC is a dataset)")
    prep.add_argument("--class-word", default=None, help="what the concept is, e.g. 'stuffed animal'")
    prep.add_argument("--resolution", type=int, default=512)
    prep.add_argument("--template", default="a photo of {token} {class}")
    prep.add_argument("--crop", default="subject", choices=["subject", "center", "face", "pad"],
                      help="subject-aware (default), centre, face-aware (people), or pad to square")
    prep.add_argument("--buckets", action="store_true", help="aspect-ratio buckets instead of squares")
    prep.add_argument("--background", default="white", help="colour behind transparent pixels")
    prep.add_argument("--border", default="white", help="colour of the margins when --crop pad")
    prep.add_argument("--detector", default="", help="transformers object-detection model id for subject crops")
    prep.add_argument("--captioner", default="", help="caption with this model (hub id or folder)")
    prep.add_argument("--captioner-kind", default="caption", choices=["caption", "tags"])
    prep.add_argument("--remove-tags", default="", help="comma-separated tags inherent to the concept (tagger)")
    prep.add_argument("--prefix", default="")
    prep.add_argument("--suffix", default="")
    prep.add_argument("--find", default="")
    prep.add_argument("--replace", default="")
    prep.add_argument("--export", choices=["kohya", "imagefolder"], default=None,
                      help="also write the finished dataset in this layout to OUT-kohya / OUT-imagefolder")
    prep.add_argument("--audit-model", default=None, metavar="CLIP",
                      help="flag outliers with this CLIP id or folder ('off' to skip; default: the evaluation's "
                           "CLIP when the hub is reachable)")
    prep.set_defaults(func=cmd_prep)

    train = sub.add_parser("train", help="train an adapter; prints progress")
    train.add_argument("--model", default="", help=MODEL_HELP)
    train.add_argument("--vae", default="", help=VAE_HELP)
    train.add_argument("--dataset", type=Path, help="required unless --resume")
    train.add_argument("--method", default=None)
    train.add_argument("--steps", type=int, default=None)
    train.add_argument("--out", type=Path, help="run folder to create (required unless --resume)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR",
                       help="continue this run from its last checkpoint (--steps sets a new total)")
    train.add_argument("--preset", default=None)
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="render one image with the base model and adapters")
    gen.add_argument("--model", default="", help=MODEL_HELP + "; empty: the base the first --adapter run was trained on")
    gen.add_argument("--vae", default="", help=VAE_HELP)
    gen.add_argument("--adapter", action="append", default=[], metavar="RUN_DIR[:SCALE]")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--out", type=Path, required=True)
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("evaluate", help="concept fidelity (CLIP-I, DINO) and prompt fidelity (CLIP-T) of runs, "
                                         "swept over checkpoints and scales, against baselines")
    _add_eval_flags(ev)
    ev.add_argument("--out", type=Path, help="folder for images, results.csv, summary.csv, plots")
    ev.add_argument("--rescore", type=Path, default=None,
                    help="recompute metrics and plots of an evaluation folder from its saved embeddings")
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser("extract-lora", help="extract a kohya LoRA from a full fine-tune (DreamBooth) run by truncated "
                                             "SVD of its difference to the base, and report what it costs")
    ex.add_argument("run", type=Path, metavar="RUN", help="the run folder of a finished method 'full' run")
    ex.add_argument("--rank", type=int, required=True, help="LoRA rank (32-128 is common; higher is closer and larger)")
    ex.set_defaults(func=cmd_extract_lora)

    bm = sub.add_parser("builtin-model", help="write the built-in model as a diffusers folder")
    bm.add_argument("out", type=Path)
    bm.set_defaults(func=cmd_builtin)

    ui = sub.add_parser("ui", help="start the studio in the browser")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--share", action="store_true")
    ui.set_defaults(func=cmd_ui)
    return p


# EvalConfig's fields spelled otherwise than --<name> taking one value: repeated flags for lists whose items
# may hold commas (prompts), several values after one flag for folders; every other list is comma-separated.
EVAL_FLAGS = {"prompts": "--prompt", "contexts": "--context"}
EVAL_REPEATED = ("prompts", "contexts")
EVAL_NARGS = ("runs",)


class _Repeated(argparse.Action):
    """--context A --context B: the values given, in place of the default (argparse's 'append' adds to it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, self.dest)
        setattr(namespace, self.dest, (given if given is not self.default else []) + [values])


def _add_eval_flags(ev: argparse.ArgumentParser) -> None:
    """One flag per EvalConfig field: its help, default, type and choices come from the dataclass."""
    from studio import fields
    from studio.evaluate.settings import EvalConfig, text_of

    defaults = fields.defaults_of(EvalConfig)
    helps = fields.help_of(EvalConfig)
    for name, tp in fields.types_of(EvalConfig).items():
        base, choices = fields.kind(tp)
        default = defaults.get(name)
        shown = ", ".join(repr(v) for v in default) if name in EVAL_REPEATED else text_of(default)
        text = helps[name] + (f" (default: {shown})" if shown else "")
        if name in EVAL_REPEATED:
            text += " (repeatable)"
        kw = dict(dest=name, default=default, help=text.replace("%", "%%"))
        if name in EVAL_REPEATED:
            kw.update(action=_Repeated, metavar=_eval_flag(name).lstrip("-").upper())
        elif name in EVAL_NARGS:
            kw.update(nargs="+")
        elif choices:
            kw.update(choices=choices)
        elif base in (int, float):
            kw.update(type=base)
        ev.add_argument(_eval_flag(name), **kw)


def _eval_flag(name: str) -> str:
    return EVAL_FLAGS.get(name, "--" + name.replace("_", "-"))


def cmd_prep(args) -> int:
    from studio.data import prep

    if (args.src / "dataset.yaml").exists():
        result = prep.PrepResult(prep.reexport(args.src, args.out, args.resolution, args.buckets or None), [], [])
    else:
        if not args.token or not args.class_word:
            raise StudioError("Give --token and --class-word (e.g. --token sks --class-word 'stuffed animal').")
        options = prep.PrepOptions(args.crop, args.buckets, args.background, args.border, args.detector)
        captions = prep.CaptionOptions(args.template, args.prefix, args.suffix, args.find, args.replace,
                                       args.captioner, args.captioner_kind, args.remove_tags)
        result = prep.prep_folder(args.src, args.out, args.token, args.class_word, args.resolution, options,
                                  captions, args.audit_model)
    for problem in result.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    for finding in result.findings:
        print(f"warning: {finding.message}", file=sys.stderr)
    if result.note:
        print(result.note, file=sys.stderr)
    spec = result.spec
    if args.export:
        from studio.data.formats import export

        where = export(args.out, args.out.with_name(f"{args.out.name}-{args.export}"), args.export)
        print(f"Exported a {args.export} copy to {where}")
    print(f"Wrote {len(spec.items)} images to {args.out} ({args.resolution}px, captions like "
          f"'{spec.items[0].caption}').")
    return 0


def cmd_train(args) -> int:
    from studio import distributed, events, launch
    from studio.config import build_config

    if args.resume is None and (args.dataset is None or args.out is None):
        raise StudioError("Give --dataset and --out for a new run, or --resume RUN_DIR to continue one.")
    values = {"model": args.model, "dataset": str(args.dataset)}
    if args.vae:
        values["vae"] = args.vae
    if args.method:
        values["method"] = args.method
    if args.steps is not None:  # --steps 0 is an error to report, not "the default"
        values["steps"] = args.steps
    def show(event) -> None:
        if isinstance(event, events.Step):
            rate = event.elapsed_s / event.step
            eta = rate * (event.total_steps - event.step)
            if event.step == 1 or event.step % 10 == 0 or event.step == event.total_steps:
                print(f"step {event.step}/{event.total_steps}  loss {event.loss:.4f}  lr {event.lr:.2e}  "
                      f"{rate:.2f}s/step  eta {eta:.0f}s", flush=True)
        elif isinstance(event, (events.Sample, events.Checkpoint)):
            print(f"{event.kind} at step {event.step}: {getattr(event, 'images', None) or event.path}", flush=True)
        elif isinstance(event, (events.Progress, events.Estimate, events.Phase)):
            print(events.describe(event), flush=True)

    if args.resume is None:
        cfg = build_config(args.preset, values, args.overrides)  # every setting checked before any import of torch
    _stop_on_sigterm()
    if args.resume is not None:
        result = launch.start(None, args.resume, on_event=show, resume=True, steps=args.steps)
    else:
        if distributed.world().main:
            print(_forecast(cfg, Path(args.out)), flush=True)
        result = launch.start(cfg, args.out, on_event=show)
    if not distributed.world().main:  # under torchrun / accelerate launch, rank 0 speaks for all
        return 0 if result.status != "failed" else 2
    print(result.message)
    if result.status == "failed":
        print(f"error: {result.message}", file=sys.stderr)
        return 2
    if result.status == "interrupted":
        return 128 + signal.SIGTERM  # the shell's convention for "ended by SIGTERM"; the checkpoint is saved
    print(f"Adapter: {result.adapter_dir}")
    return 0


def _stop_on_sigterm() -> None:
    """SIGTERM (a container stopping, a scheduler's time limit) ends training after its current step
    with a checkpoint to resume from, instead of killing it wherever it is."""
    from studio import train

    signal.signal(signal.SIGTERM, lambda signum, frame: train.TERMINATE.set())


def cmd_generate(args) -> int:
    from studio import limits, preflight

    limits.check_render(args.steps, args.seed, args.guidance)  # before torch and the model load
    if args.model:
        preflight.check_hub_model(args.model, "Base model")
    for text in args.adapter:
        path = Path(text.rpartition(":")[0] if ":" in text and not Path(text).exists() else text)
        if path.is_file() and path.suffix.lower() == ".safetensors":
            preflight.check_safetensors(path, "Adapter file")
    from studio.generate import NOTICE, GenerateRequest, Playground, parse_adapter_arg

    req = GenerateRequest(args.prompt, args.model, [parse_adapter_arg(a) for a in args.adapter],
                          args.negative_prompt, args.seed, args.steps, args.guidance, vae=args.vae)
    image = Playground().generate(req)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    if image.info.get(NOTICE):
        print(image.info[NOTICE])
    print(f"Wrote {args.out}")
    return 0


def _forecast(cfg, out: Path) -> str:
    """How long the run should take, from the newest run beside it at the same settings (studio.timings)."""
    from studio.data.dataset import load_dataset
    from studio.timings import train_forecast

    settings = cfg.to_dict()
    try:
        settings["resolution"] = cfg.resolution or load_dataset(Path(cfg.dataset)).resolution
    except StudioError:
        pass  # the run itself says what is wrong with the dataset, in its own sentence
    return train_forecast(out.expanduser().resolve().parent, settings).message


def _eval_forecast(cfg, out: Path) -> str:
    """'40 images (2 points × 10 prompts × 2 seeds). About …': the size of an evaluation and, from the newest
    evaluation beside it at the same settings, its time (studio.timings)."""
    from studio.evaluate.protocol import count_images
    from studio.timings import eval_forecast

    try:
        images, points, prompts = count_images(cfg)
    except StudioError:
        return ""  # the evaluation itself says what is wrong, in its own sentence
    size = f"{images} images ({points} points × {prompts} prompts × {cfg.seeds} seeds)."
    return f"{size} {eval_forecast(out.expanduser().resolve().parent, vars(cfg), images).message}"


def cmd_evaluate(args) -> int:
    from studio.evaluate.protocol import evaluate, rescore

    if args.rescore:
        result = rescore(args.rescore)
    else:
        if not args.dataset or not args.out:
            raise StudioError("Give --dataset and --out (or --rescore EVAL_DIR to rescore a finished evaluation).")
        from studio import limits, preflight

        limits.check_render(args.steps, 0, args.guidance)  # before any model loads
        limits.check_range("seeds", args.seeds, 1, 64, "--seeds (images per prompt)")
        for what, name in (("Base model", args.model), ("CLIP model", args.clip), ("DINO model", args.dino)):
            preflight.check_hub_model(name, what)
        cfg = _eval_config(args)
        last = {"pct": -1}

        def show(event) -> None:
            from studio import events

            if event.kind == "progress" and event.total:
                pct = 100 * event.done // event.total
                if pct // 10 != last["pct"] // 10:
                    print(f"{pct}%  {events.describe(event)}", flush=True)
                    last["pct"] = pct
            elif event.kind in ("progress", "estimate", "phase"):
                print(events.describe(event), flush=True)

        print(_eval_forecast(cfg, Path(args.out)), flush=True)
        result = evaluate(cfg, args.out, on_event=show)
    if result.status != "completed":
        print(result.message)
        return 1
    shown = ["point", "clip_i", "dino", "clip_t", "image_similarity", "prompt_similarity", "preservation", "kid", "vendi"]
    print(result.table[shown].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for warning in sorted({w for w in result.table["warning"].fillna("") if w}):
        print(f"Note: {warning}")
    if result.recommendation:
        print(f"Recommended: {result.recommendation['reason']}")
    print(f"Results: {Path(result.out_dir) / 'results.csv'} (one row per image), summary.csv; "
          f"plots: {', '.join(f.name for f in result.plots)}")
    return 0


def _eval_config(args):
    """The EvalConfig of the flags: comma-separated lists parsed as the Evaluate tab parses them."""
    from studio import fields
    from studio.evaluate.settings import EvalConfig, parse_list

    values = {name: getattr(args, name) for name in fields.types_of(EvalConfig)}
    for name, value in values.items():
        if isinstance(value, str) and fields.kind(fields.types_of(EvalConfig)[name])[0] is list:
            values[name] = parse_list(name, value, _eval_flag(name))
    return EvalConfig(**values)


def cmd_extract_lora(args) -> int:
    from studio.adapters import extract

    report = extract.extract_from_run(args.run, args.rank)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_builtin(args) -> int:
    from studio.models import write_builtin

    out = write_builtin(args.out)
    print(f"Wrote the built-in model to {out}")
    return 0


def cmd_ui(args) -> int:
    from studio.ui import launch

    launch(host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
