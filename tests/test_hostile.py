"""Hostile input, as a corpus: malformed files under hostile names in one import, names for datasets and
runs, prompts and captions of any unicode and length, and the rules that keep pickles and remote code
out. Every bad item gets one sentence; nothing good is lost; nothing reaches a path it should not."""

from __future__ import annotations

import io
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.data.dataset import PrepOptions, prepare_photos, save_dataset
from studio.paths import DatasetPaths, Workspace, safe_name
from tests.test_data import one_sentence

REPO = Path(__file__).resolve().parents[1]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _good_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _malformed(good_jpeg: bytes) -> dict[str, bytes]:
    """File name -> bytes: each must be refused with one sentence naming it."""
    png = _good_png()
    ihdr = lambda w, h: b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))  # noqa: E731
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # inside IHDR's CRC
    return {
        "empty.jpg": b"",
        "one-byte.png": b"\x89",
        "half.jpg": good_jpeg[: len(good_jpeg) // 2],
        "header-only.jpg": good_jpeg[:20],
        "bomb.png": ihdr(20000, 20000) + _png_chunk(b"IEND", b""),
        "wide-bomb.png": ihdr(200000, 1) + _png_chunk(b"IEND", b""),
        "zero-size.png": ihdr(0, 0) + _png_chunk(b"IEND", b""),
        "bad-crc.png": bytes(bad_crc),
        "no-idat.png": ihdr(64, 64) + _png_chunk(b"IEND", b""),
        "text.png": b"shopping list: milk, eggs\n",
        "page.jpg": b"<html><body><img src=x onerror=alert(1)></body></html>",
        "archive.png": b"PK\x03\x04" + b"\x00" * 60,
        "script.webp": b"#!/bin/sh\nrm -rf /\n",
        "gif-header.gif": b"GIF89a\x10\x00\x10\x00",
        "bmp-header.bmp": b"BM" + b"\x00" * 12,
        "tiff-header.tif": b"II*\x00\x08\x00\x00\x00",
        "riff.webp": b"RIFF\x10\x00\x00\x00WEBPVP8 ",
        "pickle.png": b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94.",
    }


def _tiny(kind: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1) if kind == "dot" else (4, 300), (200, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


HOSTILE_NAMES = [
    "../../escape.jpg", "/etc/passwd.jpg", "C:\\Windows\\win.ini.jpg", "a\x00b.jpg", "x" * 4000 + ".jpg",
    "\u202egpj.exe", "ｆｕｌｌｗｉｄｔｈ.jpg", "e\u0301\u0301\u0301.jpg", "CON.jpg", "NUL", ".", "..", "",
    " ", ".hidden.jpg", "a/b/c.jpg", "new\nline.jpg", "😀🧸.jpg", "%2e%2e%2fescape.jpg", "~/.ssh/id_rsa",
    "name:stream.jpg", "<script>alert(1)</script>.jpg", "'; rm -rf / #.jpg", "\t\r.jpg", "ѕks.jpg",
]


def test_a_corpus_of_malformed_files_under_hostile_names(tmp_path, photos_dir):
    good_jpeg = (photos_dir / "00.jpg").read_bytes()
    uploads, expected_bad = [], []
    for i, (name, data) in enumerate({**_malformed(good_jpeg), "dot.png": _tiny("dot"), "sliver.png": _tiny("sliver")}.items()):
        path = tmp_path / f"upload-{i}.bin"  # Gradio's temp copy; the user's name travels as text
        path.write_bytes(data)
        uploads.append((path, name))
        expected_bad.append(name)
    for i, name in enumerate(HOSTILE_NAMES):  # good photos under hostile names
        path = tmp_path / f"good-{i}.bin"
        shutil.copy(photos_dir / f"0{i % 5}.jpg", path)
        uploads.append((path, name))
    assert len(uploads) >= 30

    prepared, problems = prepare_photos(uploads, 64, PrepOptions(crop="center"))

    assert len(prepared) == len(HOSTILE_NAMES)  # every good photo was kept, whatever its name
    assert len(problems) == len(expected_bad)
    for name, message in zip(expected_bad, problems):
        assert "Traceback" not in message
        one_sentence(message, f"'{name}'")

    root = tmp_path / "ds"
    save_dataset(DatasetPaths(root), prepared, ["x"] * len(prepared), "sks", "toy", 64)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
                     and not p.name.startswith(("upload-", "good-")))
    n = len(prepared)
    originals = [w for w in written if w.startswith("ds/originals/")]
    assert sorted(set(written) - set(originals)) == sorted(
        ["ds/dataset.yaml", "ds/images/metadata.jsonl"] + [f"ds/images/{i:04d}.png" for i in range(1, n + 1)]
        + [f"ds/images/{i:04d}.txt" for i in range(1, n + 1)])
    # originals are named by number; the suffix is kept only when it is a known image type
    assert [o.rsplit(".", 1)[0] for o in originals] == [f"ds/originals/{i:04d}" for i in range(1, n + 1)]
    assert all(o.rsplit(".", 1)[1] in ("jpg", "img") for o in originals)
    assert not (tmp_path.parent / "escape.jpg").exists()


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_dataset_and_run_names_stay_inside_the_workspace(tmp_path, name):
    ws = Workspace(tmp_path)
    for folder, parent in ((ws.dataset(name).root, ws.datasets), (ws.run(name).root, ws.runs),
                           (ws.runs / ws.new_run_id(name), ws.runs)):
        assert folder.parent == parent
        assert folder.name and folder.name not in (".", "..") and not folder.name.startswith(".")
        assert folder.name.isascii() and "/" not in folder.name and "\\" not in folder.name and "\x00" not in folder.name
        assert len(folder.name) <= 64
    assert safe_name(name) == safe_name(safe_name(name))  # stable: a sanitised name maps to itself


PROMPTS = ["a photo of sks toy 🧸✨", "\u202eyot sks", "a sks\u200b toy", "ẗöÿ ŝķš", "一个玩具的照片",
           "a sks toy " + "very " * 200 + "detailed"]


def test_prompts_of_any_unicode_and_length_render_and_long_ones_are_noticed(tiny_model):
    from studio.generate import NOTICE, GenerateRequest, Playground

    playground = Playground()
    for prompt in PROMPTS:
        image = playground.generate(GenerateRequest(prompt, "tiny", [], seed=0, steps=2))
        assert image.size == (64, 64)
        note = image.info.get(NOTICE)
        if len(prompt) > 500:
            assert note and "tokens long and the text encoder reads 77" in note and "\n" not in note
        else:
            assert note is None


def test_long_captions_are_noticed_when_training(dataset_dir, tiny_model, tmp_path):
    from studio import events, train
    from studio.config import build_config

    data = tmp_path / "ds"
    shutil.copytree(dataset_dir, data)
    caption = next((data / "images").glob("*.txt"))
    caption.write_text("a photo of sks stuffed animal " + "with a long story " * 40, encoding="utf-8")
    seen = []
    result = train.run(build_config(values=dict(model="tiny", dataset=str(data), steps=1, sample_every=0,
                                                checkpoint_every=0)), tmp_path / "run", on_event=seen.append)
    assert result.status == "completed", result.message
    notes = [e.message for e in seen if isinstance(e, events.Progress) and "longer than the text encoder" in e.message]
    assert len(notes) == 1 and notes[0].startswith("1 caption(s)")


def test_no_pickle_loading_and_no_remote_code_in_the_studio():
    """torch.load only with weights_only=True (the studio's own optimizer state), no pickle module,
    and trust_remote_code is never switched on."""
    offenders = []
    for path in sorted((REPO / "studio").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for line_no, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{line_no}: {line.strip()}")
            if re.search(r"\bimport pickle\b|\bpickle\.loads?\(|trust_remote_code\s*=\s*True", code):
                offenders.append(f"{path.name}:{line_no}: {line.strip()}")
    assert offenders == []
