"""Crops that keep the subject, captioners built from configs, the audit, and the kohya/imagefolder formats."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from studio.data import crops
from studio.data.audit import duplicates, outliers, phash, hamming
from studio.data.captions import find_replace, tag_caption
from studio.data.dataset import PrepOptions, load_dataset, prepare_photos
from studio.data.formats import export
from studio.data.prep import CaptionOptions, caption_all, prep_folder
from studio.data.sources import read_source
from studio.errors import StudioError
from tests.test_data import one_sentence


def on_background(subject: Image.Image, size: tuple[int, int], at: tuple[int, int], seed: int = 0) -> Image.Image:
    """A real photo pasted on a plain, slightly noisy wall: the subject's box is known exactly."""
    rng = np.random.default_rng(seed)
    wall = (rng.normal(0, 6, (size[1], size[0], 3)) + np.array([150, 160, 150])).clip(0, 255).astype(np.uint8)
    canvas = Image.fromarray(wall)
    canvas.paste(subject, at)
    return canvas


@pytest.mark.parametrize("size, at", [((480, 200), (360, 40)), ((480, 200), (10, 60)), ((200, 480), (40, 350)),
                                      ((200, 480), (60, 5)), ((400, 300), (290, 150))])
def test_subject_aware_crop_contains_the_subject(dreambench_photos, size, at):
    duck = dreambench_photos("duck_toy", 110)[0]
    duck = duck.crop((5, 5, duck.width - 5, duck.height - 5))
    image = on_background(duck, size, at)
    subject = (at[0], at[1], at[0] + duck.width, at[1] + duck.height)

    box, note = crops.choose_box(image, "subject")
    centre, _ = crops.choose_box(image, "center")

    assert note == "" and box[2] - box[0] == box[3] - box[1] == min(size)  # the largest square, not a zoom
    assert crops.contains(box, subject), (box, subject)
    assert not crops.contains(centre, subject)  # a centre crop would cut this subject off


def test_subject_crop_with_buckets_has_the_bucket_shape_and_keeps_the_subject(tmp_path, dreambench_photos):
    bear = dreambench_photos("bear_plushie", 100)[1]
    image = on_background(bear, (600, 200), (480, 50))
    image.save(tmp_path / "wide.png")
    (item,), problems = prepare_photos([(tmp_path / "wide.png", "wide.png")], 64, PrepOptions(buckets=True))
    assert problems == [] and item.size == (80, 48)
    assert crops.contains(item.crop, (480, 50, 480 + bear.width, 50 + bear.height))


def drawn_face(width=420, height=240, cx=340, cy=120, s=60) -> Image.Image:
    """A simple drawn face (skin oval, dark eyes and brows, nose, mouth, hair) that OpenCV's cascade finds."""
    im = Image.new("RGB", (width, height), (70, 110, 160))
    d = ImageDraw.Draw(im)
    d.ellipse((cx - s, cy - 1.3 * s, cx + s, cy + 1.3 * s), fill=(225, 185, 160))
    for ex in (cx - 0.4 * s, cx + 0.4 * s):
        d.ellipse((ex - 0.2 * s, cy - 0.35 * s, ex + 0.2 * s, cy - 0.15 * s), fill=(40, 30, 30))
        d.rectangle((ex - 0.25 * s, cy - 0.6 * s, ex + 0.25 * s, cy - 0.5 * s), fill=(60, 40, 30))
    d.rectangle((cx - 0.07 * s, cy - 0.1 * s, cx + 0.07 * s, cy + 0.3 * s), fill=(200, 150, 130))
    d.ellipse((cx - 0.12 * s, cy + 0.25 * s, cx + 0.12 * s, cy + 0.4 * s), fill=(150, 100, 90))
    d.rectangle((cx - 0.35 * s, cy + 0.6 * s, cx + 0.35 * s, cy + 0.7 * s), fill=(150, 60, 60))
    d.ellipse((cx - s, cy - 1.4 * s, cx + s, cy - 0.7 * s), fill=(50, 35, 20))
    # a bright, busy object on the left that draws a saliency map's eye, but is not a face
    d.rectangle((10, 20, 120, 220), fill=(250, 240, 20))
    d.rectangle((30, 40, 100, 200), fill=(240, 20, 200))
    return im.filter(ImageFilter.GaussianBlur(2))


def test_face_aware_crop_keeps_the_face(tmp_path):
    pytest.importorskip("cv2")
    image = drawn_face()
    faces = crops.face_boxes(image)
    assert len(faces) == 1
    left, top, right, bottom = faces[0]  # around the drawn face: centre (340, 120), 120 x 156 px
    assert abs((left + right) / 2 - 340) < 20 and abs((top + bottom) / 2 - 120) < 30 and 80 < right - left < 200
    box, note = crops.choose_box(image, "face")
    assert note == "" and crops.contains(box, faces[0])
    assert not crops.contains(crops.choose_box(image, "center")[0], faces[0])


def test_face_mode_without_a_face_falls_back_and_says_so(dreambench_photos):
    pytest.importorskip("cv2")
    box, note = crops.choose_box(dreambench_photos("duck_toy", 128)[0], "face", name="duck.jpg")
    assert "no face found in 'duck.jpg'" in note


def test_face_mode_without_opencv_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    monkeypatch.setattr(crops, "_face_cascade", [])
    with pytest.raises(StudioError) as err:
        crops.choose_box(Image.new("RGB", (100, 80)), "face")
    assert "opencv-python-headless" in str(err.value) and "\n" not in str(err.value)


def test_pad_keeps_every_pixel_and_fills_the_border(tmp_path, dreambench_photos):
    wide = dreambench_photos("robot_toy", 200)[0].crop((0, 50, 200, 150))  # 200x100
    wide.save(tmp_path / "wide.png")
    (item,), _ = prepare_photos([(tmp_path / "wide.png", "wide.png")], 64, PrepOptions(crop="pad", border="#ff00ff"))
    assert item.crop == (0, -50, 200, 150)
    out = np.asarray(item.image)
    assert (np.abs(out[:14].astype(int) - (255, 0, 255)).max(axis=-1) < 8).all()  # top margin is the border colour
    assert (np.abs(out[-14:].astype(int) - (255, 0, 255)).max(axis=-1) < 8).all()
    middle = np.asarray(wide.resize((64, 32), Image.Resampling.LANCZOS), dtype=np.int16)
    assert np.abs(out[16:48].astype(np.int16) - middle).mean() < 6  # the whole photo, uncut, in the middle


# ----------------------------------------------------------------------------- tiny transformers models

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A BLIP captioner, a ViT tagger and a YOLOS detector built from configs and saved as folders: loaded
    through the same loader as hub ids."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, ViTConfig, ViTForImageClassification, ViTImageProcessor,
                              YolosConfig, YolosForObjectDetection, YolosImageProcessor)

    root = tmp_path_factory.mktemp("tiny_models")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "stuffed", "animal", "on", "bed"]
    (root / "vocab.txt").write_text("\n".join(words), encoding="utf-8")
    torch.manual_seed(0)
    text = dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64, bos_token_id=2, sep_token_id=3, pad_token_id=0, encoder_hidden_size=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    blip = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    blip.save_pretrained(root / "blip")
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=BertTokenizer(str(root / "vocab.txt"))).save_pretrained(root / "blip")

    labels = ["stuffed_animal", "brown", "bed", "teddy_bear", "outdoors"]
    tagger = ViTForImageClassification(ViTConfig(
        **vision, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={l: i for i, l in enumerate(labels)}, problem_type="multi_label_classification"))
    with torch.no_grad():  # scores fixed by the bias: stuffed_animal, brown, teddy_bear, bed on; outdoors off
        tagger.classifier.weight.zero_()
        tagger.classifier.bias.copy_(torch.tensor([4.0, 3.0, 1.0, 2.0, -4.0]))
    tagger.save_pretrained(root / "tagger")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "tagger")

    yolos = YolosForObjectDetection(YolosConfig(**{**vision, "image_size": [32, 32]}, num_detection_tokens=3,
                                                num_labels=2))
    with torch.no_grad():  # every detection: class 0, box centred at (0.8, 0.5), 0.3 x 0.4 of the image
        last = yolos.bbox_predictor.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.logit(torch.tensor([0.8, 0.5, 0.3, 0.4])))
        yolos.class_labels_classifier.layers[-1].weight.zero_()
        yolos.class_labels_classifier.layers[-1].bias.copy_(torch.tensor([6.0, -6.0, -6.0]))
    yolos.save_pretrained(root / "yolos")
    YolosImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(root / "yolos")
    return root


def test_blip_captioner_by_path_writes_captions_with_the_trigger_word(tiny_models, photos_dir):
    prepared, _ = prepare_photos([(photos_dir / "00.jpg", "00.jpg"), (photos_dir / "01.jpg", "01.jpg")], 64)
    texts = caption_all(prepared, "sks", "stuffed animal",
                        CaptionOptions(captioner=str(tiny_models / "blip"), suffix=", studio light"))
    assert len(texts) == 2
    for text in texts:
        assert text.startswith("sks ") and text.endswith(", studio light")
        body = text.removeprefix("sks stuffed animal, ").removesuffix(", studio light")
        assert body and set(body.replace("sks", "").split()) <= {"a", "photo", "of", "stuffed", "animal", "on", "bed"}


def test_tagger_captions_drop_tags_inherent_to_the_concept(tiny_models, photos_dir):
    prepared, _ = prepare_photos([(photos_dir / "00.jpg", "00.jpg")], 64)
    opts = CaptionOptions(captioner=str(tiny_models / "tagger"), captioner_kind="tags", remove_tags="teddy bear")
    assert caption_all(prepared, "sks", "stuffed animal", opts) == ["sks, brown, bed"]
    keep_all = CaptionOptions(captioner=str(tiny_models / "tagger"), captioner_kind="tags")
    assert caption_all(prepared, "sks", "toy", keep_all) == ["sks, stuffed animal, brown, teddy bear, bed"]


def test_detector_by_path_places_the_subject_crop(tiny_models, tmp_path):
    image = on_background(Image.new("RGB", (10, 10), (150, 160, 150)), (400, 200), (0, 0))
    ImageDraw.Draw(image).rectangle((10, 10, 120, 190), fill=(250, 20, 20))  # salient, but not what was detected
    image.save(tmp_path / "scene.png")
    (item,), _ = prepare_photos([(tmp_path / "scene.png", "scene.png")], 64,
                                PrepOptions(detector=str(tiny_models / "yolos")))
    detected = (260, 60, 380, 140)  # (0.8 +- 0.15) * 400, (0.5 +- 0.2) * 200
    assert crops.contains(item.crop, detected) and item.crop[0] > 120


@pytest.mark.parametrize("model_id, kind", [("Salesforce/blip-image-captioning-base", "caption"),
                                             ("no/such-tagger", "tags")])
def test_a_captioner_that_cannot_load_is_one_sentence(model_id, kind, photos_dir):
    prepared, _ = prepare_photos([(photos_dir / "00.jpg", "00.jpg")], 64)
    with pytest.raises(StudioError) as err:
        caption_all(prepared, "sks", "toy", CaptionOptions(captioner=model_id, captioner_kind=kind))
    one_sentence(str(err.value), f"'{model_id}'")


def test_a_folder_that_is_not_a_captioner_is_one_sentence(tiny_models, photos_dir):
    prepared, _ = prepare_photos([(photos_dir / "00.jpg", "00.jpg")], 64)
    with pytest.raises(StudioError, match="could not be loaded"):
        caption_all(prepared, "sks", "toy", CaptionOptions(captioner=str(tiny_models / "tagger")))


def test_tag_caption_and_find_replace():
    assert tag_caption("sks", ["Teddy_Bear", "brown", "brown", "sks"], ["teddy bear"]) == "sks, brown"
    new, changed = find_replace(["a photo of sks dog", "sks dog"], "a photo of", "a picture of")
    assert new == ["a picture of sks dog", "sks dog"] and changed == 1
    with pytest.raises(StudioError, match="not a valid regular expression"):
        find_replace(["x"], "([", "", regex=True)


# ----------------------------------------------------------------------------- audit

def test_perceptual_hash_finds_duplicates_and_near_duplicates(dreambench_photos):
    bears = dreambench_photos("bear_plushie", 160)
    original = bears[0]
    resized = original.resize((120, 120))
    brighter = Image.eval(original, lambda v: min(255, v + 12))
    hashes = [phash(im) for im in (original, resized, brighter, *bears[1:])]
    assert hamming(hashes[0], hashes[1]) <= 4 and hamming(hashes[0], hashes[2]) <= 6
    assert min(hamming(hashes[0], h) for h in hashes[3:]) > 10  # other shots of the same bear differ
    names = ["a.jpg", "b.jpg", "c.jpg"] + [f"other{i}.jpg" for i in range(len(bears) - 1)]
    found = duplicates(names, hashes, digests=["x", "y", "z"] + [str(i) for i in range(len(bears) - 1)])
    assert {f.names for f in found} == {("a.jpg", "b.jpg"), ("a.jpg", "c.jpg"), ("b.jpg", "c.jpg")}


def test_outlier_flags_the_image_far_from_the_rest():
    rng = np.random.default_rng(0)
    centre = rng.normal(size=16)
    close = [centre + 0.1 * rng.normal(size=16) for _ in range(6)]
    far = -centre + 0.1 * rng.normal(size=16)
    found = outliers([f"{i}.jpg" for i in range(6)] + ["stranger.jpg"], np.stack(close + [far]))
    assert [f.names for f in found] == [("stranger.jpg",)]
    assert outliers([f"{i}.jpg" for i in range(6)], np.stack(close)) == []


def test_outlier_check_through_the_evaluation_embedder(photos_dir, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from studio import models

    clip = tmp_path / "clip"  # a tiny CLIP folder, loaded by path like any CLIP id
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, max_position_embeddings=77),
                         vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2),
                         projection_dim=16)).save_pretrained(clip)
    CLIPTokenizer.from_pretrained(models.TOKENIZER_DIR).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(photos_dir.glob("*.jpg")):
        (src / p.name).write_bytes(p.read_bytes())
    result = prep_folder(src, tmp_path / "ds", "sks", "toy", 64, audit_model=str(clip))
    assert result.note == "" and len(result.spec.items) == 5
    assert all(f.kind == "outlier" for f in result.findings)  # it ran: no duplicates among five different shots


# ----------------------------------------------------------------------------- formats

def test_kohya_and_imagefolder_round_trip(dataset_dir, tmp_path):
    (dataset_dir.parent / "unused").mkdir(exist_ok=True)
    kohya = export(dataset_dir, tmp_path / "kohya", "kohya")
    folder = kohya / "1_sks-stuffed-animal"
    assert sorted(p.name for p in folder.iterdir())[:2] == ["0001.png", "0001.txt"]
    (folder / "0002.txt").write_text("sks stuffed animal asleep", encoding="utf-8")
    files, fmt = read_source(kohya)
    assert fmt == "kohya" and len(files) == 5 and files[1].caption == "sks stuffed animal asleep"

    hf = export(dataset_dir, tmp_path / "hf", "imagefolder")
    rows = [json.loads(line) for line in (hf / "train" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[0] == {"file_name": "0001.png", "text": "a photo of sks stuffed animal", "repeats": 1}
    result = prep_folder(hf, tmp_path / "again", "sks", "stuffed animal", 32, PrepOptions(crop="center"))
    assert [i.caption for i in result.spec.items] == ["a photo of sks stuffed animal"] * 5
    assert (tmp_path / "again" / "images" / "metadata.jsonl").is_file()


def test_metadata_pointing_outside_its_folder_is_one_sentence(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "../../etc/passwd", "text": "x"}\n', encoding="utf-8")
    with pytest.raises(StudioError, match="points outside its folder"):
        read_source(tmp_path)


def test_prep_command_line(tmp_path, photos_dir):
    src = tmp_path / "src"
    (src / "3_bear").mkdir(parents=True)
    for p in sorted(photos_dir.glob("*.jpg"))[:2]:
        (src / p.name).write_bytes(p.read_bytes())
    (src / "3_bear" / "x.jpg").write_bytes((photos_dir / "02.jpg").read_bytes())
    (src / "dup.jpg").write_bytes((photos_dir / "00.jpg").read_bytes())
    (src / "bad.png").write_text("no")
    run = lambda *a: subprocess.run([sys.executable, "-m", "studio", "prep", *map(str, a)], capture_output=True,
                                    text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    out = run(src, "--out", tmp_path / "ds", "--token", "sks", "--class-word", "bear", "--resolution", "64",
              "--crop", "pad", "--suffix", ", soft light", "--export", "kohya", "--audit-model", "off")
    assert out.returncode == 0, out.stderr
    assert "skipped: 'bad.png'" in out.stderr and "'00.jpg' and 'dup.jpg' are the same picture" in out.stderr
    spec = load_dataset(tmp_path / "ds")
    assert [i.repeats for i in spec.items] == [1, 1, 1, 3] and spec.items[-1].source == "3_bear/x.jpg"
    assert spec.items[0].caption == "a photo of sks bear, soft light" and spec.items[0].mode == "pad"
    assert (tmp_path / "ds-kohya" / "3_sks-bear").is_dir()
    again = run(tmp_path / "ds", "--out", tmp_path / "ds96", "--resolution", "96")
    assert again.returncode == 0, again.stderr
    assert [i.crop for i in load_dataset(tmp_path / "ds96").items] == [i.crop for i in spec.items]
