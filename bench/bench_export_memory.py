"""What a training run costs after its last step: memory and time of the export, its checks and the final
sample, beside the training loop's own peak. Prints figures; asserts nothing about time.

    python bench/bench_export_memory.py                        # the built-in model, LoRA, 64 px (~1 min)
    python bench/bench_export_memory.py --method loha --steps 20
    python bench/bench_export_memory.py --sd15 --resolution 256 # SD 1.5's real sizes, random weights (GBs;
                                                               # a GPU or a machine with 32 GB and time)

Figures: peak resident memory (RSS, and on CUDA the allocator's peak) during the loop and after it (from
the last step until the run finishes), seconds after the last step, and how many UNets were built and
modules deep-copied while the export ran (the target: none, one base UNet when a LoRA is extracted from
a full fine-tune).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="lora")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--sd15", action="store_true", help="a random-weight model with SD 1.5's configs (assets/single-file/sd1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    import psutil
    import torch
    from diffusers import UNet2DConditionModel

    from studio import events, train
    from studio.config import build_config
    from studio.data.dataset import prep_folder

    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    os.environ.setdefault("STUDIO_CACHE", str(tmp / "cache"))
    photos = REPO.parent / "shared" / "data" / "dreambench" / "bear_plushie"
    dataset = tmp / "dataset"
    prep_folder(photos, dataset, "sks", "stuffed animal", args.resolution)
    model = _sd15(tmp / "sd15") if args.sd15 else "builtin"

    proc, samples, phase = psutil.Process(), {"loop": 0, "after": 0}, {"now": "setup", "last_step_at": None}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if phase["now"] in samples:
                samples[phase["now"]] = max(samples[phase["now"]], proc.memory_info().rss)
            time.sleep(0.02)

    counts = {"unets": 0, "deepcopies": 0}
    real_init, real_deepcopy = torch.nn.Module.__init__, copy.deepcopy
    cuda_peaks = {}

    def init(self, *a, **k):  # every module passes here; diffusers' own __init__ stays as it is
        counts["unets"] += phase["now"] == "after" and isinstance(self, UNet2DConditionModel)
        real_init(self, *a, **k)

    def deepcopy(obj, *a, **k):
        counts["deepcopies"] += phase["now"] == "after" and isinstance(obj, torch.nn.Module)
        return real_deepcopy(obj, *a, **k)

    def on_event(event) -> None:
        if isinstance(event, events.Step):
            if event.step == 1:
                phase["now"] = "loop"
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
            if event.step == cfg.steps:
                if torch.cuda.is_available():
                    cuda_peaks["loop"] = torch.cuda.max_memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                phase["now"], phase["last_step_at"] = "after", time.perf_counter()

    torch.nn.Module.__init__, copy.deepcopy = init, deepcopy
    cfg = build_config(values=dict(model=model, dataset=str(dataset), method=args.method, steps=args.steps,
                                   resolution=args.resolution, sample_every=0, checkpoint_minutes=0),
                       overrides=args.overrides)
    threading.Thread(target=sample, daemon=True).start()
    result = train.run(cfg, tmp / "run", on_event=on_event)
    after_s = time.perf_counter() - phase["last_step_at"] if phase["last_step_at"] else float("nan")
    if torch.cuda.is_available():
        cuda_peaks["after"] = torch.cuda.max_memory_allocated()
    stop.set()
    gib = 2 ** 30
    print(f"run: {result.status}, {args.method}, {args.steps} steps at {args.resolution} px, model {model}")
    print(f"peak RSS during the loop   {samples['loop'] / gib:7.2f} GiB")
    print(f"peak RSS after the loop    {samples['after'] / gib:7.2f} GiB  (export, checks, final sample)")
    if cuda_peaks:
        print(f"CUDA peak during the loop  {cuda_peaks['loop'] / gib:7.2f} GiB")
        print(f"CUDA peak after the loop   {cuda_peaks.get('after', 0) / gib:7.2f} GiB")
    print(f"seconds after the last step {after_s:6.1f}")
    print(f"UNets built after the loop  {counts['unets']}   modules deep-copied {counts['deepcopies']}")
    met = samples["after"] <= samples["loop"] * 1.02 and counts["deepcopies"] == 0
    print(f"target (after <= during, no copies): {'met' if met else 'NOT met'}")


def _sd15(out: Path) -> str:
    """A diffusers folder with SD 1.5's component configs and random weights (written once)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (out / "model_index.json").exists():
        return str(out)
    configs = REPO / "assets" / "single-file" / "sd1"
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(REPO / "assets" / "clip-tokenizer"),
        scheduler=DDIMScheduler.from_config(DDIMScheduler.load_config(configs / "scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return str(out)


if __name__ == "__main__":
    main()
