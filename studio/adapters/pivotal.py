"""Pivotal tuning: a new token's embedding (textual inversion) and a LoRA, trained together.

The embedding gives the concept a word of its own; the LoRA adds what one vector cannot hold. Both
live in one adapter folder: the LoRA files of studio.adapters.lora and the embedding files of
studio.adapters.embedding. The scale applies to the LoRA; the token stays loaded while the adapter is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from studio.adapters import embedding, lora
from studio.adapters.base import Capabilities, LowRank, Setup
from studio.paths import LORA_WEIGHTS


@dataclass
class Settings(LowRank, embedding.Settings):
    """The LoRA's settings and the embedding's initializer word."""

    def __post_init__(self) -> None:
        LowRank.__post_init__(self)


KINDS = ("pivotal",)
# The scale applies to the LoRA (peft); the embedding row learns, so captions are encoded every step. No
# weight decay: decoupled decay would move the frozen vocabulary rows (see embedding.py); the LoRA part
# trains without it too, which LoRA trainers commonly do. LORA_WEIGHTS is the file whose change means a
# new version.
CAPABILITIES = {"pivotal": Capabilities("peft", trains_text=True, adds_tokens=True, weights_file=LORA_WEIGHTS,
                                        weight_decay=0.0)}
SETTINGS = {"pivotal": Settings}


def attach(pipe, setup: Setup) -> None:
    embedding.attach(pipe, setup)  # freezes the whole model but for the new row
    lora.add_adapters(pipe, setup.settings)  # not lora.attach: its freeze would stop the new row training


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


# ---------------------------------------------------------------------------- taking a run home

def client_files(kind: str, folder: Path, name: str, token: str) -> list[tuple]:
    return lora.client_files("lora", folder, name, token) + embedding.client_files("embedding", folder, name, token)


def diffusers_code(kind: str, folder: Path, token: str, base: str, scale: float, prompt: str) -> str:
    from studio.adapters.base import pipeline_code

    return pipeline_code(base, embedding.load_lines(folder, token) + "\n" + lora.load_lines(folder, scale), prompt)
