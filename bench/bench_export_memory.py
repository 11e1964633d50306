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

    # RSS counts the weights' file pages once they are read (the model is memory-mapped: a part first used
    # after the loop, such as the VAE's decoder at the final sample, is read then); those pages are the
    # file's and the kernel drops them under pressure. Anonymous memory (RSS less file-backed pages) is
    # what the process itself allocates: the figure that runs a machine out of memory.
    proc, phase = psutil.Process(), {"now": "setup", "last_step_at": None}
    samples = {"loop": [0, 0], "after": [0, 0]}  # phase -> [peak RSS, peak anonymous]
    parts: dict[str, list] = {}  # after the loop: part -> [peak RSS, peak anonymous, seconds]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if phase["now"] in samples:
                m = proc.memory_info()
                now = (m.rss, m.rss - m.shared)
                samples[phase["now"]][:] = [max(a, b) for a, b in zip(samples[phase["now"]], now)]
                if phase["now"] == "after" and phase.get("part"):
                    parts[phase["part"]][:2] = [max(a, b) for a, b in zip(parts[phase["part"]][:2], now)]
            time.sleep(0.02)

    def label(owner, name: str, part: str | None = None) -> None:
        """Time and peak of one function of the after-loop phase (the outermost labelled call counts)."""
        real = getattr(owner, name)

        def labelled(*a, **k):
            if phase["now"] != "after" or phase.get("part"):
                return real(*a, **k)
            key = part or name
            if name == "check_file":
                key = f"client check {a[2] if len(a) > 2 else k.get('client')}"
            parts.setdefault(key, [0, 0, 0.0])
            phase["part"], began = key, time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                parts[key][2] += time.perf_counter() - began
                phase["part"] = None
        setattr(owner, name, labelled)

    from studio.adapters import clients, lora, lycoris, metadata
    for owner, name in ((train, "_save"), (train, "_checkpoint"), (train, "_samples"), (lora, "check_kohya_file"),
                        (lora, "check_kohya_text"), (lora, "export_dora_diff"), (lycoris, "check_export"),
                        (clients, "check_file"), (metadata, "stamp_reports")):
        label(owner, name)

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
    print(f"peak RSS during the loop   {samples['loop'][0] / gib:7.2f} GiB   anonymous {samples['loop'][1] / gib:6.2f} GiB")
    print(f"peak RSS after the loop    {samples['after'][0] / gib:7.2f} GiB   anonymous {samples['after'][1] / gib:6.2f} GiB"
          "  (export, checks, final sample)")
    if cuda_peaks:
        print(f"CUDA peak during the loop  {cuda_peaks['loop'] / gib:7.2f} GiB")
        print(f"CUDA peak after the loop   {cuda_peaks.get('after', 0) / gib:7.2f} GiB")
    print(f"seconds after the last step {after_s:6.1f}")
    for part, (peak, anon, seconds) in parts.items():
        print(f"  {part:30s} peak RSS {peak / gib:6.2f} GiB  anonymous {anon / gib:6.2f} GiB  {seconds:6.1f} s")
    print(f"UNets built after the loop  {counts['unets']}   modules deep-copied {counts['deepcopies']}")
    met = samples["after"][1] <= samples["loop"][1] * 1.02 and counts["deepcopies"] == 0
    print(f"target (anonymous memory after <= during, no copies): {'met' if met else 'NOT met'}")
    if samples["after"][0] > samples["loop"][0] * 1.02:
        print("  RSS after is above RSS during: weights first read after the loop (file pages)")


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
