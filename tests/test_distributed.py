"""Data-parallel training: two processes (torchrun, gloo on CPU) match one process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from studio import distributed, events
from studio.paths import LORA_WEIGHTS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(dataset_dir, out, method):
    return ["-m", "studio", "train", "--model", "tiny", "--dataset", str(dataset_dir), "--method", method,
            "--steps", "4", "--out", str(out), "--set", "batch_size=2", "--set", "learning_rate=1e-2",
            "--set", "sample_every=0", "--set", "sample_prompts=[]", "--set", "checkpoint_every=2"]


def _initial_row(model_dir, word: str):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(model_dir), subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(str(model_dir), subfolder="text_encoder")
    return encoder.get_input_embeddings().weight[tokenizer.encode(word, add_special_tokens=False)[0]].detach()


def _losses(run):
    return [e.loss for e in events.read_events(run / "events.jsonl") if isinstance(e, events.Step)]


@pytest.mark.parametrize("method", ["lora", "embedding"])
def test_two_processes_match_one_on_the_same_global_batch(dataset_dir, tiny_model, tmp_path, method):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *_train_args(dataset_dir, tmp_path / "one", method)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          *_train_args(dataset_dir, tmp_path / "two", method)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("Finished 4 steps.") == 1  # rank 0 speaks for both
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
    file = LORA_WEIGHTS if method == "lora" else "learned_embeds.safetensors"
    single, parallel = load_file(str(tmp_path / "one" / "adapter" / file)), load_file(str(tmp_path / "two" / "adapter" / file))
    assert single.keys() == parallel.keys()
    # Summing gradients across ranks reorders float additions, and Adam divides each update by the
    # gradient's running size, which magnifies such differences where gradients are near zero. The
    # tolerance is therefore set against how far training moved the weights (LoRA B starts at 0; an
    # embedding row at its initializer word): within 1% of that movement.
    start = {k: torch.zeros_like(v) for k, v in single.items() if "lora_B" in k}
    if method == "embedding":
        start = {"sks": _initial_row(tiny_model, "animal")}
    moved = max((single[k] - v).abs().max().item() for k, v in start.items())
    worst = max((parallel[k] - single[k]).abs().max().item() for k in single)
    assert moved > 1e-3  # training really moved the weights, so the tolerance below means something
    assert worst <= 0.01 * moved, (worst, moved)


def test_the_global_batch_is_split_evenly():
    assert distributed.shard(4, distributed.World(1, 2, 1)).tolist() == [2, 3]
    assert distributed.shard(4, distributed.World()).tolist() == [0, 1, 2, 3]


def test_a_batch_that_does_not_split_is_one_sentence(dataset_dir, monkeypatch, tmp_path):
    from studio import train
    from studio.config import build_config
    from studio.errors import StudioError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(StudioError, match="multiple of the 2 training processes; choose 2"):
        train.prepare(build_config(values=dict(model="tiny", dataset=str(dataset_dir), batch_size=3)),
                      tmp_path / "run")
