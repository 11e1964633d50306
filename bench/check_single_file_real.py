"""Real-size single-file check: an SD 1.5 / SD 2.1 / SDXL architecture with random weights (the published
configs in assets/single-file), written as one fp16 LDM-layout file by tests/ldm_files.py (diffusers'
published conversion rules), loaded through the studio offline, and compared output by output.

    python bench/check_single_file_real.py sd1 sd2      # ~5 GB of memory each; SDXL needs ~16 GB

Prints, per family: file size, seconds to write, seconds to resolve + load, and the largest absolute
difference of the UNet, VAE decoder and text encoder outputs against the model the file was written from.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(family: str):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = REPO / "assets" / "single-file" / family

    def cfg(name):
        return json.loads((root / name / "config.json").read_text())

    class Pipe:
        pass

    torch.manual_seed(0)
    pipe = Pipe()
    pipe.unet = UNet2DConditionModel.from_config(cfg("unet"))
    pipe.vae = AutoencoderKL.from_config(cfg("vae"))
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))
    pipe.text_encoder_2 = (CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2")))
                           if family == "sdxl" else None)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        if module is not None:
            module.half().float().eval()  # the values an fp16 file holds exactly
    return pipe


def outputs(pipe) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    ids[0, 0], ids[0, 20] = 49406, 49407
    out, texts, pooled = {}, [], None
    with torch.no_grad():
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, name, None)
            if encoder is None:
                continue
            result = encoder.eval()(ids, output_hidden_states=True)
            out[name] = result.hidden_states[-1]
            texts.append(result.hidden_states[-2])
            pooled = getattr(result, "text_embeds", None)
        extra = {}
        if pooled is not None:
            extra = dict(added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])})
        out["unet"] = pipe.unet.eval()(latents, torch.tensor([500]), encoder_hidden_states=torch.cat(texts, -1), **extra).sample
        out["vae"] = pipe.vae.eval().decode(latents).sample
    return out


def check(family: str, folder: Path) -> None:
    import gc

    import torch

    from studio import models, single_file
    from tests import ldm_files

    source = build(family)
    path = folder / f"real-{family}.safetensors"
    start = time.perf_counter()
    ldm_files.write(source, "sd1" if family == "sd1" else family, path, dtype=torch.float16)
    written = time.perf_counter() - start
    expected = outputs(source)
    del source
    gc.collect()
    start = time.perf_counter()
    ref = models.resolve(str(path))
    loaded = models.load_pipeline(ref)
    took = time.perf_counter() - start
    got = outputs(loaded)
    diffs = {k: float((expected[k] - got[k]).abs().max()) for k in expected}
    print(f"{family}: {path.stat().st_size / 2**30:.2f} GiB, written in {written:.0f} s, resolved + loaded in {took:.0f} s; "
          f"{single_file.describe(single_file.read_header(path))}; sample_size {loaded.unet.config.sample_size}; "
          f"max |diff| " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()), flush=True)
    path.unlink()


def main(argv: list[str]) -> int:
    families = argv or ["sd1"]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("STUDIO_CACHE", str(Path(tmp) / "cache"))
        for family in families:
            check(family, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
