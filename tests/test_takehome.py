"""Taking a run home: the files to copy, the AUTOMATIC1111 prompt, the ComfyUI workflow's graph and values.

The node table below is ComfyUI's `nodes.py` (INPUT_TYPES "required" and RETURN_TYPES of each class the
workflow uses); every node of the workflow must give exactly those inputs, and every link must point at
an existing node's output of the type the input takes.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from studio import takehome
from studio.adapters import AdapterMeta, write_meta
from studio.errors import StudioError

# class -> ({input: type, a link for an upper-case type}, output types)
COMFY_NODES = {
    "CheckpointLoaderSimple": ({"ckpt_name": "name"}, ["MODEL", "CLIP", "VAE"]),
    "LoraLoader": ({"model": "MODEL", "clip": "CLIP", "lora_name": "name", "strength_model": "float",
                    "strength_clip": "float"}, ["MODEL", "CLIP"]),
    "CLIPTextEncode": ({"text": "str", "clip": "CLIP"}, ["CONDITIONING"]),
    "EmptyLatentImage": ({"width": "int", "height": "int", "batch_size": "int"}, ["LATENT"]),
    "KSampler": ({"model": "MODEL", "seed": "int", "steps": "int", "cfg": "float", "sampler_name": "str",
                  "scheduler": "str", "positive": "CONDITIONING", "negative": "CONDITIONING",
                  "latent_image": "LATENT", "denoise": "float"}, ["LATENT"]),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ["IMAGE"]),
    "SaveImage": ({"images": "IMAGE", "filename_prefix": "str"}, []),
}
SAMPLERS = {"euler", "euler_ancestral", "ddim", "dpmpp_2m", "lms", "uni_pc"}  # comfy.samplers.KSampler.SAMPLERS
SCHEDULERS = {"normal", "karras", "ddim_uniform"}  # comfy.samplers.KSampler.SCHEDULERS (a subset)


def check_graph(graph: dict) -> None:
    """Every node is a known class with exactly its inputs, and every link reaches an output of the right type."""
    for node_id, node in graph.items():
        inputs, _ = COMFY_NODES[node["class_type"]]
        assert set(node["inputs"]) == set(inputs), (node_id, node["class_type"])
        for name, value in node["inputs"].items():
            kind = inputs[name]
            if kind.isupper():
                source, index = value
                assert COMFY_NODES[graph[source]["class_type"]][1][index] == kind, (node_id, name)
            else:
                assert not isinstance(value, list), (node_id, name)
    assert graph["4"]["inputs"]["sampler_name"] in SAMPLERS and graph["4"]["inputs"]["scheduler"] in SCHEDULERS
    json.dumps(graph)  # API-format JSON


def settings(**kw) -> takehome.Settings:
    values = dict(prompt="a photo of sks stuffed animal", negative="blurry", scale=0.8, seed=42, steps=25,
                  guidance=6.5, size=512, scheduler="DDIMScheduler")
    return takehome.Settings(**{**values, **kw})


def test_lora_run_files_prompt_and_workflow(trained_run, tmp_path):
    plan = takehome.plan(trained_run, "bear-lora", settings())
    (lora,) = plan.files
    assert lora.source.name == "pytorch_lora_weights_kohya.safetensors" and lora.name == "bear-lora.safetensors"
    assert lora.comfyui == "ComfyUI/models/loras/bear-lora.safetensors"
    assert lora.a1111 == "stable-diffusion-webui/models/Lora/bear-lora.safetensors"
    assert plan.a1111_prompt == "a photo of sks stuffed animal <lora:bear-lora:0.8>"

    graph = plan.workflow
    check_graph(graph)
    assert [n["class_type"] for n in graph.values()].count("LoraLoader") == 1
    assert graph["10"]["inputs"] == {"model": ["1", 0], "clip": ["1", 1], "lora_name": "bear-lora.safetensors",
                                     "strength_model": 0.8, "strength_clip": 0.8}
    sampler = graph["4"]["inputs"]
    assert sampler["model"] == ["10", 0]  # the LoRA's model, not the bare checkpoint
    assert (sampler["seed"], sampler["steps"], sampler["cfg"]) == (42, 25, 6.5)
    assert (sampler["sampler_name"], sampler["scheduler"]) == ("ddim", "ddim_uniform")
    assert graph["2"]["inputs"] == {"text": "a photo of sks stuffed animal", "clip": ["10", 1]}
    assert graph["3"]["inputs"] == {"text": "blurry", "clip": ["10", 1]}
    assert graph["5"]["inputs"] == {"width": 512, "height": 512, "batch_size": 1}
    assert graph["1"]["inputs"]["ckpt_name"].endswith(".safetensors")
    assert any("only inside the studio" in n for n in plan.notes)  # trained on 'tiny'

    written = plan.write(tmp_path / "home")
    assert [p.name for p in written] == ["bear-lora.safetensors", "bear-lora-comfyui-workflow.json"]
    assert written[0].read_bytes() == lora.source.read_bytes()
    assert json.loads(written[1].read_text()) == graph
    assert "<lora:bear-lora:0.8>" in plan.markdown() and "ComfyUI/models/loras" in plan.markdown()


def test_checkpoint_names_for_known_bases_and_files():
    assert takehome.checkpoint_name("stable-diffusion-v1-5/stable-diffusion-v1-5") == "v1-5-pruned-emaonly.safetensors"
    assert takehome.checkpoint_name("/home/me/models/dreamshaper_8.safetensors") == "dreamshaper_8.safetensors"


def test_embedding_run_uses_the_word_and_no_lora_loader(tmp_path):
    folder = tmp_path / "run" / "adapter"
    folder.mkdir(parents=True)
    (folder / "embeddings_a1111").mkdir()
    save_file({"emb_params": torch.zeros(1, 32)}, str(folder / "embeddings_a1111" / "sks.safetensors"))
    write_meta(folder, AdapterMeta(kind="embedding", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                   token="sks", class_word="shape", step=10, has_scale=False))
    plan = takehome.plan(tmp_path / "run", "sks-ti", settings(prompt="a photo of sks shape", scale=1.0))
    (emb,) = plan.files
    assert emb.name == "sks.safetensors" and emb.a1111 == "stable-diffusion-webui/embeddings/sks.safetensors"
    assert emb.comfyui == "ComfyUI/models/embeddings/sks.safetensors"
    assert plan.a1111_prompt == "a photo of sks shape"  # AUTOMATIC1111: the file name is the word
    graph = plan.workflow
    check_graph(graph)
    assert "LoraLoader" not in [n["class_type"] for n in graph.values()]
    assert graph["2"]["inputs"]["text"] == "a photo of embedding:sks shape"
    assert graph["4"]["inputs"]["model"] == ["1", 0]
    assert graph["1"]["inputs"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"


def test_a_run_without_client_files_is_one_sentence(tmp_path):
    folder = tmp_path / "run" / "adapter"
    folder.mkdir(parents=True)
    write_meta(folder, AdapterMeta(kind="lora", base_model="tiny", token="sks", class_word="shape", step=1))
    with pytest.raises(StudioError, match="no file for ComfyUI or AUTOMATIC1111"):
        takehome.plan(tmp_path / "run", "empty", settings())
