"""Aspect-ratio buckets and per-image repeats: chosen at prep time, stored, and honoured by training."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import yaml
from PIL import Image

from studio import train
from studio.config import build_config
from studio.data.crops import bucket_for, bucket_sizes
from studio.data.dataset import ConceptDataset, PrepOptions, load_dataset, prep_folder, reexport
from studio.paths import DatasetPaths


def test_bucket_sizes_keep_the_area_and_the_step():
    for resolution, step in [(64, 16), (512, 64), (1024, 128)]:
        sizes = bucket_sizes(resolution)
        assert (resolution, resolution) in sizes
        for w, h in sizes:
            assert w % step == 0 and h % step == 0
            assert w * h <= resolution * resolution
            assert max(w / h, h / w) <= 2.0
            assert (h, w) in sizes  # portrait and landscape alike
    assert bucket_for(300, 150, 512, True)[0] > bucket_for(300, 150, 512, True)[1]
    assert bucket_for(150, 300, 512, True)[0] < bucket_for(150, 300, 512, True)[1]
    assert bucket_for(300, 150, 512, False) == (512, 512)


@pytest.fixture(scope="module")
def bucket_dir(dreambench_photos, tmp_path_factory):
    src = tmp_path_factory.mktemp("wide_tall")
    bears = dreambench_photos("bear_plushie", 256)
    for i, im in enumerate(bears[:4]):
        im.crop((0, 64, 256, 192)).save(src / f"wide{i}.jpg", quality=92)  # 2:1 landscape
    for i, im in enumerate(bears[:2]):
        im.crop((64, 0, 192, 256)).save(src / f"tall{i}.jpg", quality=92)  # 1:2 portrait
    (src / "2_extra").mkdir()  # a kohya repeat folder: its image counts twice per epoch
    bears[4].save(src / "2_extra" / "square.jpg", quality=92)
    out = tmp_path_factory.mktemp("buckets") / "ds"
    spec, problems = prep_folder(src, out, "sks", "stuffed animal", 64, options=PrepOptions(buckets=True))
    assert problems == []
    return out


def test_buckets_are_stored_per_image_and_shown_sizes_are_what_trains(bucket_dir):
    spec = load_dataset(bucket_dir)
    by_source = {i.source: i for i in spec.items}
    assert spec.buckets is True
    assert all(by_source[f"wide{i}.jpg"].size == (80, 48) for i in range(4))
    assert all(by_source[f"tall{i}.jpg"].size == (48, 80) for i in range(2))
    assert by_source["2_extra/square.jpg"].size == (64, 64) and by_source["2_extra/square.jpg"].repeats == 2
    for item in spec.items:
        with Image.open(DatasetPaths(bucket_dir).images / item.file) as im:
            assert im.size == item.size
        left, top, right, bottom = item.crop  # the crop has the bucket's aspect (within a pixel)
        assert abs((right - left) / (bottom - top) - item.size[0] / item.size[1]) < 0.05

    data = ConceptDataset(bucket_dir, 64)
    assert isinstance(data.pixels, list)
    assert sorted(tuple(p.shape) for p in data.pixels) == sorted([(3, 48, 80)] * 4 + [(3, 80, 48)] * 2 + [(3, 64, 64)])
    assert sorted(data.repeats) == [1, 1, 1, 1, 1, 1, 2]


def test_a_micro_batch_keeps_to_one_bucket_and_repeats_weight_the_draws():
    cfg = build_config(values=dict(model="tiny", dataset="x", batch_size=4, seed=3))
    groups = ["a", "a", "a", "b", "b", "c"]
    for step in range(1, 40):
        picks = train.batch_indices(cfg, 6, step, 0, groups=groups).tolist()
        assert len({groups[p] for p in picks}) == 1, picks
    slots = torch.tensor([0, 1, 2, 2, 2])  # image 2 has repeats 3
    one = build_config(values=dict(model="tiny", dataset="x", batch_size=1, seed=3))
    counts = Counter(int(train.batch_indices(one, 3, step, 0, slots)[0]) for step in range(1, 501))
    assert counts[2] == 300 and counts[0] == counts[1] == 100  # exactly, epoch by epoch
    plain = [int(train.batch_indices(one, 3, s, 0)[0]) for s in range(1, 30)]
    assert plain == [int(train.batch_indices(one, 3, s, 0, torch.arange(3))[0]) for s in range(1, 30)]


def test_training_on_buckets_runs_at_each_images_own_size(bucket_dir, tiny_model, tmp_path, monkeypatch):
    shapes = []
    real = train._Stepper._loss

    def spy(self, index, g):
        shapes.append({tuple(self.frozen.latent_mean[torch.zeros(1, dtype=torch.long), index[:1]].shape[-2:])})
        return real(self, index, g)

    monkeypatch.setattr(train._Stepper, "_loss", spy)
    cfg = build_config(values=dict(model="tiny", dataset=str(bucket_dir), steps=6, batch_size=2,
                                   sample_every=0, sample_prompts=[], checkpoint_every=0, sample_steps=1))
    result = train.run(cfg, tmp_path / "run")
    assert result.status == "completed", result.message
    sizes = {next(iter(s)) for s in shapes}
    assert len(sizes) >= 2  # more than one bucket trained, each at its own latent size
    assert all(h != w for h, w in sizes if (h, w) != (32, 32))


def test_buckets_with_prior_preservation_is_one_sentence(bucket_dir, tiny_model, tmp_path):
    cfg = build_config(values=dict(model="tiny", dataset=str(bucket_dir), steps=2, prior_preservation=True))
    with pytest.raises(Exception, match="buckets cannot be combined with prior preservation"):
        train.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_reexport_at_another_resolution_keeps_crops_captions_and_repeats(bucket_dir, tmp_path):
    (DatasetPaths(bucket_dir).images / "0001.txt").write_text("sks stuffed animal, edited by hand", encoding="utf-8")
    spec = reexport(bucket_dir, tmp_path / "big", 128)
    old = load_dataset(bucket_dir)
    assert spec.resolution == 128
    assert [i.crop for i in spec.items] == [i.crop for i in old.items]
    assert [i.repeats for i in spec.items] == [i.repeats for i in old.items]
    assert spec.items[0].caption == "sks stuffed animal, edited by hand"
    for new, before in zip(spec.items, old.items):
        assert new.size == (before.size[0] * 2, before.size[1] * 2)  # the 64-px buckets, doubled
        with Image.open(tmp_path / "big" / "images" / new.file) as im:
            assert im.size == new.size
    squares = reexport(bucket_dir, tmp_path / "square", 64, buckets=False)
    assert {i.size for i in squares.items} == {(64, 64)}
    meta = yaml.safe_load((tmp_path / "big" / "dataset.yaml").read_text(encoding="utf-8"))
    assert meta["items"][0]["original"] == "0001.jpg"
