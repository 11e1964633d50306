"""Pivotal tuning: a new token's embedding (textual inversion) and a LoRA, trained together.

The embedding gives the concept a word of its own; the LoRA adds what one vector cannot hold. Both
live in one adapter folder: the LoRA files of studio.adapters.lora and the embedding files of
studio.adapters.embedding. The scale applies to the LoRA; the token stays loaded while the adapter is.
"""

from __future__ import annotations

import os
from pathlib import Path

from studio.adapters import embedding, lora
from studio.paths import LORA_WEIGHTS

KINDS = ("pivotal",)
HAS_SCALE = True
TRAINS_TEXT = True  # the embedding row learns: captions are encoded every step
# No weight decay: decoupled decay would move the frozen vocabulary rows (see embedding.py). The
# LoRA part trains without it too, which LoRA trainers commonly do.
WEIGHT_DECAY = 0.0
WEIGHTS = LORA_WEIGHTS  # the file whose change means a new version (the Playground watches it)


def attach(pipe, cfg) -> None:
    embedding.attach(pipe, cfg)  # freezes the whole model but for the new row
    lora.add_adapters(pipe, cfg)  # not lora.attach: its freeze would stop the new row training


def trainable_parameters(pipe) -> list:
    return embedding.trainable_parameters(pipe) + lora.trainable_parameters(pipe)


def save(pipe, out_dir: Path) -> Path:
    from safetensors.torch import save_file

    out_dir = lora.save(pipe, out_dir)
    tmp = out_dir / f"{embedding.WEIGHTS}.tmp-{os.getpid()}"
    save_file(embedding.file_contents(pipe), str(tmp))  # one row, or one per encoder on SDXL
    os.replace(tmp, out_dir / embedding.WEIGHTS)
    return out_dir


def load_into(pipe, adapter_dir: Path, name: str) -> None:
    from studio.adapters import read_meta

    token = read_meta(adapter_dir).token
    if token in pipe.tokenizer.get_vocab():  # an older version of this adapter left its token loaded
        embedding.unload(pipe, adapter_dir)
    embedding.load_weights(pipe, Path(adapter_dir) / embedding.WEIGHTS, token)
    lora.load_into(pipe, adapter_dir, name)


def export(adapter_dir: Path, pipe) -> list:
    return lora.export(adapter_dir, pipe) + embedding.export(adapter_dir, pipe)
